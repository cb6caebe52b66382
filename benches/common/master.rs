//! Running the real master binary from a benchmark, and reading its CPU time.
// Each benchmark uses only part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `paddock run` of the real binary on a config written to a folder of its own.
pub struct Master {
    /// The master's process.
    pub child: Child,
    /// Its base URL.
    pub url: String,
}

impl Drop for Master {
    fn drop(&mut self) {
        // SIGTERM first: it stops its machines; then make sure.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP client with Paddock's TLS settings (reqwest has no crypto provider of its
/// own here).
pub fn http() -> reqwest::blocking::Client {
    let tls = paddock::tls::client_config(None).expect("TLS client settings");
    reqwest::blocking::Client::builder().use_preconfigured_tls(tls).build().expect("HTTP client")
}

/// GETs `url` as JSON (null when the master does not answer).
pub fn get(url: &str) -> serde_json::Value {
    http().get(url).send().and_then(|r| r.json()).unwrap_or_default()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Runs git in `dir`, failing loudly when it is missing.
pub fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .output()
        .expect("git must be installed (apt-get install git)");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A git repository in `dir/repo` with one commit of `file`; returns its path.
pub fn new_repo(dir: &Path, file: &str) -> std::path::PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir(&repo).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join(file), "0\n").expect("write");
    git(&repo, &["add", file]);
    git(&repo, &["commit", "-q", "-m", "start"]);
    repo
}

/// The `[master]` and `[[repo]]` sections of a bench master on `port`, its database in `dir`,
/// the repository at `repo` polled every `poll`.
pub fn head(port: u16, dir: &Path, repo: &Path, poll: &str) -> String {
    format!(
        "[master]\nurl = \"http://127.0.0.1:{port}\"\ndatabase = \"{}\"\n\n\
         [[repo]]\nname = \"app\"\nurl = \"{}\"\npoll = \"{poll}\"\n\n",
        database(dir),
        repo.display()
    )
}

/// The master's database: `paddock.db` in `dir`, or the (empty) PostgreSQL database named by
/// `PADDOCK_BENCH_DATABASE` (its password and CA in `PGPASSWORD` and `PGSSLROOTCERT`).
pub fn database(dir: &Path) -> String {
    std::env::var("PADDOCK_BENCH_DATABASE").unwrap_or_else(|_| format!("sqlite://{}", dir.join("paddock.db").display()))
}

/// CPU seconds (user + system) of the PostgreSQL server processes serving database `name`
/// (their titles say `postgres: USER NAME …`), for a master on PostgreSQL.
pub fn postgres_cpu_seconds(name: &str) -> f64 {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(title) = std::fs::read_to_string(entry.path().join("cmdline")) else { continue };
        let serves = title.starts_with("postgres: ") && title.split_whitespace().nth(2) == Some(name);
        if let (true, Ok(pid)) = (serves, entry.file_name().to_string_lossy().parse::<u32>()) {
            total += cpu_seconds(pid).0;
        }
    }
    total
}

/// Starts the master on `config` (written into `dir` as paddock.toml) and waits for /healthz.
pub fn start_master(dir: &Path, config: &str, port: u16) -> Master {
    let path = dir.join("paddock.toml");
    std::fs::write(&path, config).expect("write config");
    let log = std::fs::File::create(dir.join("master.log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_paddock"))
        .arg("run")
        .arg(&path)
        // PADDOCK_BENCH_LOG lets a profiling run see what the master does (e.g. paddock=debug).
        .env("RUST_LOG", std::env::var("PADDOCK_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start paddock run");
    let master = Master { child, url: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = http().get(format!("{}/healthz", master.url)).send().is_ok_and(|r| r.status().is_success());
        if up {
            return master;
        }
        assert!(Instant::now() < deadline, "the master did not come up; see {}", dir.join("master.log").display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU time (user + system) of process `pid` alone, and of its waited-for children.
pub fn cpu_seconds(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces), counted from field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    let tick = clock_ticks();
    // utime, stime, cutime, cstime are fields 14..=17, i.e. indexes 11..=14 here.
    let own = (f[11] + f[12]) / tick;
    (own, (f[13] + f[14]) / tick)
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().expect("getconf (libc-bin) is installed");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLK_TCK is a number")
}
