//! Page and API latency with 100,000 builds in the database: the real master (in this
//! process, on loopback) serving the console, a build page and `/api/builds` to a load
//! generator; p50/p99 per target, with one client and with four at once. Prints the figures.
//!
//! The builds (5,000 changes × 20 builders on 5 branches, run on 500 machines, each with its
//! steps; the newest build of every builder with a 200-line log) are written through the store
//! once and kept under `target/bench-data/`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use paddock::core::MachineId;
use paddock::core::Ts;
use paddock::store::{MachinePrice, NewChange, Store};

const CHANGES: i64 = 5_000;
const PYS: [&str; 5] = ["3.0", "3.1", "3.2", "3.3", "3.4"];
const DBS: [&str; 4] = ["0", "1", "2", "3"];
const BRANCHES: [&str; 5] = ["main", "stable/1", "stable/2", "stable/3", "stable/4"];
const MACHINES: i64 = 500;
const SEC: i64 = 1_000;
const START: i64 = 1_763_942_400_000;

fn builders() -> Vec<String> {
    PYS.iter().flat_map(|p| DBS.iter().map(move |d| format!("py{p}-db{d}"))).collect()
}

/// Writes the history through the store, as the master would.
async fn generate(store: &Store) -> Result<i64, paddock::store::StoreError> {
    let builders = builders();
    let price = MachinePrice::default();
    for m in 1..=MACHINES {
        let token = format!("token-{m}");
        store.insert_machine(MachineId(m), "local", "local", &token, Ts(START)).await?;
        store.machine_launched(MachineId(m), &format!("local-{m}"), None, "on-demand", &price, Ts(START)).await?;
        store.claim_token(&token, Ts(START)).await?;
    }
    let mut t = START;
    let mut builds = 0;
    let steps = ["checkout".to_string(), "install".to_string(), "test".to_string()];
    for n in 0..CHANGES {
        let branch = BRANCHES[(n % 5) as usize];
        let change = NewChange {
            repo: "app".into(),
            branch: branch.into(),
            revision: format!("{n:040x}"),
            author: format!("Committer {} <c{}@example.com>", n % 30, n % 30),
            committed_at: None,
            message: format!("Change {n}: make <things> & stuff faster\n\nA longer body."),
            files: vec!["src/lib.rs".into(), "tests/x.rs".into()],
            source: "poller".into(),
        };
        let ids: Vec<i64> = store.record_changes(&[change], None, Ts(t)).await?.iter().map(|c| c.id).collect();
        for (i, b) in builders.iter().enumerate() {
            t += SEC;
            let rev = format!("{n:040x}");
            let build = store.create_request(b, "app", branch, &rev, "branch", "bench", &ids, Ts(t)).await?;
            let machine = 1 + (builds % MACHINES);
            store.start_build(build.id, MachineId(machine), &steps, Ts(t)).await?;
            let last = n >= CHANGES - 5;
            if last {
                for line in 0..200 {
                    store.append_log(build.id, 3, &format!("test_{line} ... ok <{i}> & more\n"), Ts(t)).await?;
                }
            }
            use paddock::core::build::BuildState;
            let result = match builds % 50 {
                0..=3 => BuildState::Failure,
                4 => BuildState::Exception,
                _ => BuildState::Success,
            };
            // Every step reports its result (a success with a silent step would be stored as an
            // exception); a failed build's last step failed.
            for (idx, _) in steps.iter().enumerate() {
                let failed = result != BuildState::Success && idx + 1 == steps.len();
                let state = if failed { "failure" } else { "success" };
                store.step_finished(build.id, idx as i64, state, Some(i32::from(failed)), Ts(t + 60 * SEC)).await?;
            }
            store.finish_build(build.id, MachineId(machine), result, Ts(t + 60 * SEC)).await?;
            builds += 1;
        }
    }
    Ok(builds)
}

fn cached_db() -> std::path::PathBuf {
    const GENERATOR: u32 = 1;
    let schema = paddock::store::MIGRATIONS.len();
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-data")
        .join(format!("web-100k-g{GENERATOR}-s{schema}.db"))
}

fn config(dir: &std::path::Path, db: &std::path::Path) -> String {
    format!(
        "[master]\nurl = \"http://127.0.0.1:0\"\ndatabase = \"sqlite://{db}\"\nstate_dir = \"{state}\"\n\n\
         [web]\naccess = \"public\"\n\n\
         [[repo]]\nname = \"app\"\nurl = \"{repo}\"\nbranches = [\"main\", \"stable/*\"]\npoll = \"0s\"\n\n\
         [pool.local]\nmax_instances = 2\nisolation = \"none\"\n\n\
         [[builder]]\nname = \"py{{py}}-db{{db}}\"\nrepo = \"app\"\npool = \"local\"\n\
         matrix = {{ py = [{pys}], db = [{dbs}] }}\nsteps = [\"make install\", \"make test\"]\n",
        db = db.display(),
        state = dir.join("state").display(),
        repo = dir.join("repo").display(),
        pys = PYS.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", "),
        dbs = DBS.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(", "),
    )
}

/// Latencies of `n` GETs of `url` by `clients` concurrent clients, sorted.
async fn load(http: &reqwest::Client, url: &str, token: Option<&str>, n: usize, clients: usize) -> Vec<Duration> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, next) = (http.clone(), url.to_string(), next.clone());
        let token = token.map(str::to_string);
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                let req = http.get(&url);
                let req = match &token {
                    Some(t) => req.bearer_auth(t),
                    None => req,
                };
                let started = Instant::now();
                let resp = req.send().await.expect("request");
                assert!(resp.status().is_success(), "{url}: {}", resp.status());
                let body = resp.bytes().await.expect("body");
                took.push(started.elapsed());
                assert!(!body.is_empty());
            }
            took
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    all.sort();
    all
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!("page and API latency with 100,000 builds");
    let cached = cached_db();
    if cached.exists() {
        println!("  using the builds generated before: {}", cached.display());
    } else {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("tempdir");
        let scratch = dir.path().join("web.db");
        let started = Instant::now();
        let n = rt.block_on(async {
            let store = Store::open(&format!("sqlite://{}", scratch.display())).await.expect("open");
            let n = generate(&store).await.expect("generate");
            store.close().await;
            n
        });
        println!("  generated {n} builds in {:.1} s", started.elapsed().as_secs_f64());
        std::fs::create_dir_all(cached.parent().expect("parent")).expect("bench-data folder");
        std::fs::copy(&scratch, &cached).expect("keep the builds");
    }

    // A copy per run: the master writes (heads, sessions), the cache stays as generated.
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("paddock.db");
    std::fs::copy(&cached, &db).expect("copy");
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).expect("repo");
    let git = std::process::Command::new("git").args(["init", "-q", "-b", "main"]).current_dir(&repo).status();
    assert!(git.is_ok_and(|s| s.success()), "git init");
    let path = dir.path().join("paddock.toml");
    std::fs::write(&path, config(dir.path(), &db)).expect("config");
    let cfg = paddock::config::load(&path).expect("config");

    let token = rt.block_on(async {
        let store = Store::open(&cfg.master.database).await.expect("open");
        let hash = paddock::accounts::hash_password("bench-password").expect("hash");
        store.add_user("bench", paddock::accounts::Role::Admin, &hash, Ts(START)).await.expect("user");
        let token = paddock::accounts::new_secret(paddock::accounts::TOKEN_PREFIX);
        store.create_token("bench", "bench", &paddock::accounts::secret_hash(&token), Ts(START)).await.expect("token");
        token
    });

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = paddock::runtime::RunOptions {
        on_ready: Some(ready_tx),
        ..paddock::runtime::RunOptions::new(
            std::env::current_exe().expect("exe"),
            Arc::new(paddock::clock::SystemClock),
        )
    };
    let master = rt.spawn(paddock::runtime::run(cfg, opts, async {
        let _ = stop_rx.await;
    }));
    let addr = match rt.block_on(ready_rx) {
        Ok(a) => a,
        Err(_) => panic!("the master did not start: {:?}", rt.block_on(master)),
    };
    let base = format!("http://{addr}");
    let http = paddock::tls::http_client(None).expect("HTTP client");
    let newest: serde_json::Value = rt.block_on(async {
        http.get(format!("{base}/api/builds?limit=1"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json")
    });
    let build = newest["builds"][0]["id"].as_i64().expect("a build");
    let targets = [
        ("console  GET /", format!("{base}/"), None),
        ("build    GET /builds/{id}", format!("{base}/builds/{build}"), None),
        ("api      GET /api/builds", format!("{base}/api/builds"), Some(token.as_str())),
        (
            "api      GET /api/builds?builder=…",
            format!("{base}/api/builds?builder=py3.2-db1&limit=100"),
            Some(token.as_str()),
        ),
    ];
    const N: usize = 1000;
    for clients in [1, 4] {
        println!("  {clients} client(s), {N} requests each target (after 50 warm-up):");
        for (name, url, token) in &targets {
            rt.block_on(load(&http, url, *token, 50, clients));
            let started = Instant::now();
            let took = rt.block_on(load(&http, url, *token, N, clients));
            let secs = started.elapsed().as_secs_f64();
            println!(
                "    {name:<36} p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>7.2} ms   {:>6.0} req/s",
                pct(&took, 0.5),
                pct(&took, 0.99),
                pct(&took, 1.0),
                N as f64 / secs
            );
        }
    }
    let _ = stop_tx.send(());
    let _ = rt.block_on(master);
}
