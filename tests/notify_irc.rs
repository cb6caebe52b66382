//! The IRC bot against a real IRC server (Debian's ngircd, started here on a free loopback
//! port) watched by a second client in the channel: a failure after a pass is told once, a
//! second failure is not, the fix is; after the server restarts the bot joins again and speaks.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, Bed, DEADLINE};
use serde_json::Value;

const NGIRCD: &str = "/usr/sbin/ngircd";

/// An ngircd on 127.0.0.1:`port`, stopped with the test.
struct Ircd {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Ircd {
    fn start(port: u16) -> Ircd {
        Ircd::start_with(port, "")
    }

    /// Also listens with TLS on `tls_port`, with a certificate from the test CA.
    fn start_tls(port: u16, tls_port: u16, ca: &common::tls::TestCa) -> Ircd {
        let ircd = Ircd::start_with(
            port,
            &format!("[SSL]\nCertFile = {}\nKeyFile = {}\nPorts = {tls_port}\n", ca.cert.display(), ca.key.display()),
        );
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "ngircd did not listen on {tls_port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        ircd
    }

    fn start_with(port: u16, extra: &str) -> Ircd {
        assert!(
            std::path::Path::new(NGIRCD).exists(),
            "{NGIRCD} is missing: the IRC tests need Debian's ngircd (apt-get install ngircd; .ci/test installs it)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("ngircd.conf");
        std::fs::write(
            &conf,
            format!(
                "[Global]\nName = irc.paddock.test\nInfo = Paddock tests\nListen = 127.0.0.1\nPorts = {port}\n\
                 MotdPhrase = \"tests\"\n[Limits]\nPingTimeout = 120\nPongTimeout = 20\n\
                 [Options]\nPAM = no\nIdent = no\nDNS = no\n{extra}"
            ),
        )
        .expect("config");
        let child = Command::new(NGIRCD)
            .args(["-n", "-f"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ngircd");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "ngircd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ircd { child, dir, port }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.dir.path();
    }
}

impl Drop for Ircd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A person in the channel: every line the server sends, kept.
struct Watcher {
    lines: Arc<Mutex<Vec<String>>>,
    stream: TcpStream,
}

impl Watcher {
    fn join(port: u16, channel: &str) -> Watcher {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut w = stream.try_clone().expect("clone");
        let w_for_sync = stream.try_clone().expect("clone");
        write!(w, "NICK watcher\r\nUSER w 0 * :Watcher\r\nJOIN {channel}\r\n").expect("register");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(token) = line.strip_prefix("PING ") {
                    let _ = write!(w, "PONG {token}\r\n");
                }
                keep.lock().expect("lock").push(line);
            }
        });
        let stream = w_for_sync;
        Watcher { lines, stream }
    }

    /// Round-trips a PING through the server: whatever the server relayed before has then been
    /// read (it handles each connection's lines in order).
    fn sync(&self, port_stream: &mut TcpStream, token: &str) {
        write!(port_stream, "PING :{token}\r\n").expect("ping");
        let start = Instant::now();
        while !self.lines.lock().expect("lock").iter().any(|l| l.contains("PONG") && l.ends_with(token)) {
            assert!(start.elapsed() < DEADLINE, "no PONG {token}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a raw line (`PRIVMSG #ci :paddock: status`).
    fn send(&self, line: &str) {
        let mut w = self.stream.try_clone().expect("clone");
        write!(w, "{line}\r\n").expect("send");
    }

    /// What `nick` said in the channel.
    fn said(&self, nick: &str, channel: &str) -> Vec<String> {
        let prefix = format!(":{nick}!");
        let marker = format!(" PRIVMSG {channel} :");
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.split_once(&marker).map(|(_, text)| text.to_string()))
            .collect()
    }

    /// Whether `nick` is in the channel: seen joining, or listed when the watcher joined.
    fn saw_join(&self, nick: &str, channel: &str) -> bool {
        let prefix = format!(":{nick}!");
        self.lines.lock().expect("lock").iter().any(|l| {
            let joined = l.starts_with(&prefix)
                && (l.ends_with(&format!("JOIN :{channel}")) || l.ends_with(&format!("JOIN {channel}")));
            let listed = l.contains(" 353 ")
                && l.contains(channel)
                && l.rsplit(':')
                    .next()
                    .is_some_and(|names| names.split(' ').any(|n| n.trim_start_matches(['@', '+']) == nick));
            joined || listed
        })
    }
}

/// A master with the pass/fail builder and a plain-text bot `paddock` in #ci, once the
/// watcher has seen it join.
fn bed_with_a_bot(port: u16, watcher: &Watcher) -> Bed {
    let mut bed = Bed::new(&[]);
    let preamble = common::ONE_BUILDER_FAILING_ON_BROKEN;
    bed.config(
        "",
        &format!(
            "{preamble}[[notifier]]\nkind = \"irc\"\nserver = \"127.0.0.1:{port}\"\ntls = false\nchannel = \"#ci\"\n\
             nick = \"paddock\"\n"
        ),
    );
    bed.start_with_env(&["main"], &[("PADDOCK_NOTIFY_RETRY_MS", "200")]);
    bed.wait("the bot to join #ci", || watcher.saw_join("paddock", "#ci").then_some(()));
    bed
}

#[test]
fn the_bot_speaks_on_transitions_only_and_comes_back_after_a_server_restart() {
    let port = free_port();
    let ircd = Ircd::start(port);
    let watcher = Watcher::join(port, "#ci");
    let bed = bed_with_a_bot(port, &watcher);

    let ok = bed.build_file("fine\n", "first");
    assert_eq!(ok["state"], "success");
    let broken = bed.build_file("broken\n", "break it");
    bed.wait("the failure told", || (watcher.said("paddock", "#ci").len() == 1).then_some(()));
    let still = bed.build_file("still broken\n", "still broken");
    assert_eq!(still["state"], "failure");
    bed.notifications_settled();
    let mut sync = watcher.stream.try_clone().expect("clone");
    watcher.sync(&mut sync, "after-still-broken");
    assert_eq!(watcher.said("paddock", "#ci").len(), 1, "a second failure is no news");
    let fixed = bed.build_file("all good\n", "fix it");
    bed.wait("the fix told", || (watcher.said("paddock", "#ci").len() == 2).then_some(()));
    bed.notifications_settled();
    watcher.sync(&mut sync, "after-fix");
    let said = watcher.said("paddock", "#ci");
    let url = |b: &Value| format!("{}/builds/{}", bed.url(), b["id"]);
    let short = |b: &Value| b["revision"].as_str().unwrap_or("")[..10].to_string();
    assert_eq!(
        said,
        [
            format!(
                "b on main is now failure (was success) at {} by Ada Tester <ada@example.com>: {}",
                short(&broken),
                url(&broken)
            ),
            format!(
                "b on main is now success (was failure) at {} by Ada Tester <ada@example.com>: {}",
                short(&fixed),
                url(&fixed)
            ),
        ]
    );

    // The server goes away and comes back: the bot joins again and speaks.
    ircd.stop();
    let ircd = Ircd::start(port);
    let watcher = Watcher::join(port, "#ci");
    bed.wait("the bot to join #ci again", || watcher.saw_join("paddock", "#ci").then_some(()));
    let again = bed.build_file("broken again\n", "break it again");
    bed.wait("the failure told after the restart", || (watcher.said("paddock", "#ci").len() == 1).then_some(()));
    assert!(watcher.said("paddock", "#ci")[0].contains(&url(&again)));
    assert_eq!(ircd.port, port);
}

#[test]
fn over_tls_the_bot_trusts_the_configured_ca_and_nothing_else() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = common::tls::TestCa::make(certs.path());
    let (port, tls_port) = (free_port(), free_port());
    let _ircd = Ircd::start_tls(port, tls_port, &ca);
    let watcher = Watcher::join(port, "#ci");
    let mut bed = Bed::new(&[]);
    std::fs::copy(&ca.ca, bed.path().join("private-ca.pem")).expect("copy the CA");
    // Two bots on the TLS port: one trusts the test CA (a path relative to the config), the
    // other only the system's CAs, so its handshake must fail.
    let preamble = common::ONE_BUILDER_FAILING_ON_BROKEN;
    bed.config(
        "",
        &format!(
            "{preamble}\
             [[notifier]]\nname = \"trusting\"\nkind = \"irc\"\nserver = \"127.0.0.1:{tls_port}\"\nchannel = \"#ci\"\n\
             nick = \"paddock\"\nca_file = \"private-ca.pem\"\n\n\
             [[notifier]]\nname = \"untrusting\"\nkind = \"irc\"\nserver = \"127.0.0.1:{tls_port}\"\nchannel = \"#ci\"\n\
             nick = \"stranger\"\n"
        ),
    );
    bed.start_with_env(&["main"], &[("PADDOCK_NOTIFY_RETRY_MS", "200")]);
    bed.wait("the trusting bot to join #ci over TLS", || watcher.saw_join("paddock", "#ci").then_some(()));
    bed.wait("the untrusting bot to refuse the certificate", || {
        let log = std::fs::read_to_string(&bed.master_log).unwrap_or_default();
        log.lines().any(|l| l.contains("cannot connect to IRC") && l.contains("UnknownIssuer")).then_some(())
    });

    // A first build that fails is news: told over TLS by the bot that trusts the server.
    let broken = bed.build_file("broken\n", "break it");
    assert_eq!(broken["state"], "failure");
    bed.wait("the failure told", || (watcher.said("paddock", "#ci").len() == 1).then_some(()));
    assert!(watcher.said("paddock", "#ci")[0].contains(&format!("{}/builds/{}", bed.url(), broken["id"])));
    let refused = bed.wait("the untrusting bot's delivery to fail", || {
        bed.get("/api/deliveries")["deliveries"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["notifier"] == "untrusting" && d["attempts"].as_i64().unwrap_or(0) > 0)
            .cloned()
    });
    assert_eq!(refused["state"], "pending", "{refused}");
    let why = refused["last_error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("not connected to IRC (cannot connect: TLS: ") && why.contains("UnknownIssuer"),
        "{refused}"
    );
    let mut sync = watcher.stream.try_clone().expect("clone");
    watcher.sync(&mut sync, "after-tls");
    assert!(!watcher.saw_join("stranger", "#ci"));
    assert!(watcher.said("stranger", "#ci").is_empty());
}

#[test]
fn the_bot_answers_status_last_and_help_in_its_channel_only() {
    let port = free_port();
    let _ircd = Ircd::start(port);
    let watcher = Watcher::join(port, "#ci");
    let bed = bed_with_a_bot(port, &watcher);
    bed.build_file("fine\n", "first");
    let broken = bed.build_file("broken\n", "break it");
    let url = format!("{}/builds/{}", bed.url(), broken["id"]);
    let short = &broken["revision"].as_str().unwrap_or("")[..10];
    bed.wait("the failure told", || (watcher.said("paddock", "#ci").len() == 1).then_some(()));

    // Each question waits for its answer, `lines` long (the eight fit in the bot's burst of answers).
    let ask = |line: &str, target: &str, lines: usize| {
        let before = watcher.said("paddock", target).len();
        watcher.send(line);
        bed.wait(&format!("an answer to {line:?}"), || {
            let said = watcher.said("paddock", target);
            (said.len() >= before + lines).then(|| said[before..].to_vec())
        })
    };
    let failing = [format!("watcher: failing: b on main ({url})"), "watcher: 0 passing, 0 building".to_string()];
    assert_eq!(ask("PRIVMSG #ci :paddock: status", "#ci", 2), failing);
    assert_eq!(ask("PRIVMSG #ci :paddock, status main", "#ci", 2), failing);
    assert_eq!(ask("PRIVMSG #ci :paddock: status stable", "#ci", 1), ["watcher: no builds on stable yet"]);
    assert_eq!(
        ask("PRIVMSG #ci :paddock: last b", "#ci", 1),
        [format!("watcher: b on main: failure at {short} by Ada Tester <ada@example.com>: {url}")]
    );
    assert_eq!(ask("PRIVMSG #ci :paddock: last nosuch", "#ci", 1), ["watcher: no finished build of nosuch"]);
    let help = ask("PRIVMSG #ci :paddock: help", "#ci", 1);
    assert!(help[0].starts_with("watcher: Ask me: status [BRANCH]") && help[0].ends_with(&bed.url()), "{help:?}");
    let unknown = ask("PRIVMSG #ci :paddock: force b", "#ci", 1);
    assert!(unknown[0].starts_with("watcher: I do not know \"force b\". Ask me:"), "{unknown:?}");
    let said_in_channel = watcher.said("paddock", "#ci").len();
    // Private questions are not answered: a private channel's members are the audience.
    watcher.send("PRIVMSG paddock :status");
    watcher.send("PRIVMSG #ci :\u{1}VERSION\u{1}");
    // Talk not addressed to the bot gets nothing: the bot reads in order, so by the time it
    // answers the question after them, it has passed over all three.
    watcher.send("PRIVMSG #ci :status please, anyone?");
    let last = ask("PRIVMSG #ci :paddock: last nosuch", "#ci", 1);
    assert_eq!(last, ["watcher: no finished build of nosuch"]);
    let mut sync = watcher.stream.try_clone().expect("clone");
    watcher.sync(&mut sync, "after-chatter");
    assert_eq!(watcher.said("paddock", "#ci").len(), said_in_channel + 1);
    assert!(watcher.said("paddock", "watcher").is_empty());
}
