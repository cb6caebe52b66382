//! A small TCP load balancer for tests of several masters, health-checking as real ones do:
//! every 200 ms each backend is asked `GET /healthz` (half a second to answer); a connection
//! goes to the first healthy backend, in order. A standby master does not listen, and a frozen
//! one does not answer: neither gets traffic.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running balancer; stops when dropped.
pub struct Balancer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Balancer {
    /// Listens on 127.0.0.1:`port` and forwards to the first of `backends` (ports on
    /// 127.0.0.1) that accepts each connection.
    pub fn start(port: u16, backends: Vec<u16>) -> Balancer {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("balancer: bind");
        let stop = Arc::new(AtomicBool::new(false));
        let healthy: Arc<Mutex<Vec<u16>>> = Arc::new(Mutex::new(Vec::new()));
        {
            let (stop, healthy, backends) = (stop.clone(), healthy.clone(), backends.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let up: Vec<u16> = backends.iter().copied().filter(|p| answers_healthz(*p)).collect();
                    *healthy.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = up;
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let up = healthy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                std::thread::spawn(move || forward(client, &up));
            }
        });
        Balancer { port, stop, thread: Some(thread) }
    }
}

/// Whether the master on `port` answers `GET /healthz` with 200 within half a second.
fn answers_healthz(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

fn forward(client: TcpStream, backends: &[u16]) {
    let upstream = backends.iter().find_map(|p| {
        let addr = SocketAddr::from(([127, 0, 0, 1], *p));
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
    });
    let Some(upstream) = upstream else {
        // Nobody answers: the client sees the connection closed, as behind a real balancer.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else { return };
    let up = std::thread::spawn(move || pipe(c2, u2));
    pipe(upstream, client);
    let _ = up.join();
}

/// Copies `from` to `to` until either end closes, then closes both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
