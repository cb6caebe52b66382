//! The master's listener through the real binary and real sockets: slow and idle connections
//! are closed, connections past the cap are closed at once, and sockets on `/agent/ws` that have
//! not authenticated can cost the master neither memory nor places without bound, while a real
//! agent still connects and builds.
//!
//! Timeouts are shortened through the master's hidden test variables so the tests do not wait
//! for production values; every wait is for an event (a close, an answer) with a deadline.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Bed, DEADLINE};

/// A local pool and one builder `b` whose step takes a few seconds, with a branch scheduler.
const SLOW_BUILDER: &str = "[pool.local]\nmax_instances = 1\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\n\n\
    [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"sleep 3\", \"echo built\"]\n\n\
    [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n";

fn connect(bed: &Bed) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", bed.port)).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    s
}

/// Reads until the master closes the connection (end of stream or reset), returning what came;
/// fails if it is still open after [`DEADLINE`].
fn read_until_closed(s: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the master did not close the connection within {DEADLINE:?}")
            }
            Err(_) => return got,
        }
    }
}

/// Reads one HTTP response (head and a Content-Length body) from a kept-alive connection;
/// `None` if the connection closed first.
fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Some(text);
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: paddock\r\n\r\n";

#[test]
fn slow_and_idle_connections_are_closed_and_long_lived_ones_are_not() {
    let mut bed = Bed::new(&[]);
    bed.config("", SLOW_BUILDER);
    bed.start_with_env(
        &["main"],
        &[
            ("PADDOCK_HTTP_HEADER_TIMEOUT_MS", "1000"),
            ("PADDOCK_HTTP_IDLE_TIMEOUT_MS", "500"),
            ("PADDOCK_HTTP_REQUEST_TIMEOUT_MS", "2000"),
        ],
    );
    // The bed's own polling opens a connection per request: the idle timeout is not its business.
    bed.http = common::blocking_client()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(0)
        .default_headers(
            [(reqwest::header::AUTHORIZATION, format!("Bearer {}", bed.token()).parse().expect("header"))]
                .into_iter()
                .collect(),
        )
        .build()
        .expect("client");

    // Connected, and never a byte.
    let mut silent = connect(&bed);
    assert!(read_until_closed(&mut silent, "a silent connection").is_empty());

    // Half a request line, then nothing: no answer, closed after the header timeout.
    let mut half = connect(&bed);
    half.write_all(b"GET /heal").expect("write");
    assert!(read_until_closed(&mut half, "half a request line").is_empty());

    // A whole request is answered; the kept-alive connection is then closed after the idle
    // timeout without a second answer.
    let mut idle = connect(&bed);
    idle.write_all(HEALTHZ).expect("write");
    let answer = read_response(&mut idle).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(read_until_closed(&mut idle, "an idle keep-alive connection").is_empty());

    // A body that trickles in: the handler does not get it within the request timeout, the
    // client gets 408 and the connection is closed.
    let mut trickle = connect(&bed);
    trickle
        .write_all(b"POST /hooks/github HTTP/1.1\r\nHost: paddock\r\nContent-Length: 1000\r\n\r\n{\"ref\":")
        .expect("write");
    let answer = String::from_utf8_lossy(&read_until_closed(&mut trickle, "a trickled body")).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");

    // The master still answers.
    let mut fresh = connect(&bed);
    fresh.write_all(HEALTHZ).expect("write");
    assert!(read_response(&mut fresh).expect("an answer").starts_with("HTTP/1.1 200"));

    // The live log of a build is followed to its end, longer than the request timeout and
    // through a quiet step longer than the idle timeout: a stream is not cut.
    let rev = bed.commit("main", "a.txt", "x\n", "a change");
    let id = bed.wait("the build to start", || {
        bed.builds()
            .into_iter()
            .find(|b| b["revision"] == rev.as_str() && b["state"] == "running")
            .map(|b| b["id"].clone())
    });
    let mut live = connect(&bed);
    live.write_all(format!("GET /builds/{id}/log/stream HTTP/1.1\r\nHost: paddock\r\n\r\n").as_bytes()).expect("write");
    let mut followed = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !String::from_utf8_lossy(&followed).contains("event: done") {
        let n = live.read(&mut buf).expect("the live log stays open until the build is done");
        assert!(n > 0, "the live log was closed before the build was done");
        followed.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&followed).contains("built"), "the log came through the live stream");
    let build = bed.get(&format!("/api/builds/{id}"));
    assert_eq!(build["state"], "success", "{build}");

    // An agent's socket lived through it all, with seconds between its heartbeats and the
    // master's pings: WebSockets are not cut as idle.
    let log = bed.log();
    assert_eq!(log.matches("agent connected").count(), 1, "one connection, never resumed:\n{log}");
    assert!(!log.contains("resumed=true"), "{log}");
}

#[test]
fn past_the_cap_new_connections_are_closed_at_once_and_healthz_answers_after() {
    let mut bed = Bed::new(&[]);
    bed.config("", "");
    bed.start_with_env(&["main"], &[("PADDOCK_HTTP_MAX_CONNECTIONS", "4")]);
    // The bed's client may still hold one connection of its own: whatever it holds, held
    // connections plus that one never pass the cap.
    let mut held = Vec::new();
    let refused = loop {
        let mut s = connect(&bed);
        // A refused connection may be closed before the request is even written.
        let _ = s.write_all(HEALTHZ);
        match read_response(&mut s) {
            Some(answer) => {
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                held.push(s);
                assert!(held.len() <= 4, "more connections were served than the cap allows");
            }
            None => break s,
        }
    };
    drop(refused);
    assert!(held.len() >= 3, "only {} connections were served under a cap of 4", held.len());
    bed.wait("the warning about the cap", || bed.log().contains("as many as allowed").then_some(()));

    drop(held);
    bed.wait("/healthz answering again", || {
        let mut s = connect(&bed);
        s.write_all(HEALTHZ).ok()?;
        read_response(&mut s).filter(|a| a.starts_with("HTTP/1.1 200"))
    });
}

/// Opens `/agent/ws` by hand; `Ok` with the socket once upgraded, `Err` with the answer if not.
fn upgrade(bed: &Bed) -> Result<TcpStream, String> {
    let mut s = connect(bed);
    s.write_all(
        b"GET /agent/ws HTTP/1.1\r\nHost: paddock\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte, so nothing after the head is consumed.
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return Err(format!("closed after {:?}", String::from_utf8_lossy(&head))),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if head.starts_with("HTTP/1.1 101") {
        return Ok(s);
    }
    let len = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| format!("{head}(body unread: {e})"))?;
    Err(format!("{head}{}", String::from_utf8_lossy(&body)))
}

/// Resident memory and its peak so far, in MiB, of process `pid`.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .expect("field")
    };
    (kib("VmRSS:") / 1024, kib("VmHWM:") / 1024)
}

#[test]
fn agent_sockets_before_hello_are_bounded_in_size_and_number() {
    let mut bed = Bed::new(&[]);
    bed.config("", SLOW_BUILDER.replace("\"sleep 3\", ", "").as_str());
    // Strangers that never say hello stay as long as the test needs them.
    bed.start_with_env(&["main"], &[("PADDOCK_AGENT_HELLO_TIMEOUT_MS", "600000")]);
    let pid = bed.master_pid();
    let (rss_before, _) = memory_mib(pid);

    // As many strangers as allowed are upgraded; the next one is refused with 503.
    let mut strangers = Vec::new();
    let refusal = loop {
        match upgrade(&bed) {
            Ok(s) => strangers.push(s),
            Err(answer) => break answer,
        }
        assert!(strangers.len() <= 64, "more than 64 sockets wait for their hello");
    };
    assert_eq!(strangers.len(), 64, "refused early: {refusal}");
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(refusal.contains("\"error\""), "{refusal}");
    drop(strangers);

    // Twenty strangers each start a 16 MiB message before hello: each is refused after its
    // frame's header, and none of them costs the master its 16 MiB.
    for i in 0..20 {
        let mut s = bed.wait("a place among the strangers", || upgrade(&bed).ok());
        let len: u64 = 16 * 1024 * 1024 - 1024;
        // A text frame that is not the message's last, masked, with a 64-bit length.
        let mut header = vec![0x01, 0x80 | 127];
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0]);
        let _ = s.write_all(&header);
        let chunk = vec![0u8; 1024 * 1024];
        for _ in 0..16 {
            // Fails once the master has closed the socket; that is the point.
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
        read_until_closed(&mut s, &format!("stranger {i}"));
    }
    let (rss_after, peak) = memory_mib(pid);
    eprintln!("master memory: VmRSS {rss_before} MiB before, {rss_after} MiB after; peak (VmHWM) {peak} MiB");
    assert!(peak < rss_before + 200, "VmHWM {peak} MiB against {rss_before} MiB before twenty strangers");

    // A real agent still connects and builds.
    let rev = bed.commit("main", "a.txt", "x\n", "a change");
    let build = bed.wait("the build", || {
        bed.builds().into_iter().find(|b| b["revision"] == rev.as_str() && b["finished_at"].is_string())
    });
    assert_eq!(build["state"], "success", "{build}");
}
