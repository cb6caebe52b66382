//! The machine image files: the rendered user-data is valid cloud-config whose values cannot
//! break out of their quoting, the bootstrap script is shellcheck-clean, and a user-data boot
//! under the emulator downloads the agent with the machine's token, starts it as specified and
//! loses every process when the instance is terminated.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{InstanceType, ResourceType, ShutdownBehavior, Tag, TagSpecification};
use common::boot::{remap, BootEmulator};
use common::moto::Moto;
use paddock_provisioners::ec2::userdata::{render, BootVars};
use paddock_provisioners::ec2::{TAG_CLUSTER, TAG_MACHINE, TAG_POOL};
use paddock_provisioners::local::processes_with_key;
use serde_yaml_ng::Value;

const ENV_FILE: &str = "/etc/paddock/agent.env";
const BOOTSTRAP_PATH: &str = "/usr/local/sbin/paddock-bootstrap";

fn images_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("images")
}

fn sample(token: &str) -> BootVars<'_> {
    BootVars {
        master_url: "https://ci.example.com:8010",
        token,
        machine_id: 7,
        pool: "linux-small",
        cluster: "prod",
        imds_url: "http://169.254.169.254",
    }
}

/// Runs a tool the tests need, failing with how to install it when it is missing.
fn tool(program: &str, args: &[&str], install: &str) -> std::process::Output {
    match Command::new(program).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} is not installed: run .ci/test once, or `apt-get install {install}`")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

fn parse(user_data: &str) -> Value {
    serde_yaml_ng::from_str(user_data).expect("user-data is YAML")
}

fn write_file_entry<'a>(config: &'a Value, path: &str) -> &'a Value {
    config["write_files"]
        .as_sequence()
        .expect("write_files list")
        .iter()
        .find(|f| f["path"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("no write_files entry for {path}"))
}

/// Every string scalar in `v`, with where it is.
fn strings(v: &Value, at: String, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) => out.push((at, s.clone())),
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{at}[{i}]"), out);
            }
        }
        Value::Mapping(map) => {
            for (k, item) in map {
                strings(item, format!("{at}.{}", k.as_str().unwrap_or("?")), out);
            }
        }
        _ => {}
    }
}

#[test]
fn cloud_init_accepts_the_rendered_user_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = BootVars {
        master_url: "http://x/'\"\\$(id)`id`;\n#c: d\u{2028}",
        token: "t'\"\\\n",
        pool: "p: [q]",
        cluster: "{c}",
        ..sample("t")
    };
    for (name, vars) in [("sample", sample("0123abcd")), ("odd", odd)] {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, render(&vars)).expect("write");
        let out = tool("cloud-init", &["schema", "--config-file", file.to_str().expect("utf-8 path")], "cloud-init");
        assert!(
            out.status.success(),
            "cloud-init rejects the {name} user-data:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn shellcheck_passes_on_the_image_scripts() {
    let mut scripts: Vec<String> = std::fs::read_dir(images_dir())
        .expect("images/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .map(|p| p.display().to_string())
        .collect();
    scripts.sort();
    assert!(!scripts.is_empty(), "no script in images/");
    let args: Vec<&str> = scripts.iter().map(String::as_str).collect();
    let out = tool("shellcheck", &args, "shellcheck");
    assert!(out.status.success(), "shellcheck:\n{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn the_token_is_only_in_the_env_file_which_only_root_reads() {
    let token = "9f8e7d6c5b4a-token";
    let config = parse(&render(&sample(token)));
    let mut all = Vec::new();
    strings(&config, String::new(), &mut all);
    let holders: Vec<&String> = all.iter().filter(|(_, s)| s.contains(token)).map(|(at, _)| at).collect();
    assert_eq!(holders.len(), 1, "token found in {holders:?}");
    let env = write_file_entry(&config, ENV_FILE);
    assert_eq!(env["content"].as_str().map(|c| c.contains(token)), Some(true));
    assert_eq!(env["permissions"].as_str(), Some("0600"));

    let script = write_file_entry(&config, BOOTSTRAP_PATH);
    let bootstrap = std::fs::read_to_string(images_dir().join("bootstrap.sh")).expect("bootstrap.sh");
    assert_eq!(script["content"].as_str(), Some(bootstrap.as_str()), "the script must arrive byte for byte");
    assert_eq!(script["permissions"].as_str(), Some("0755"));
    let runcmd = config["runcmd"].as_sequence().expect("runcmd list");
    assert_eq!(runcmd.len(), 1);
    assert_eq!(runcmd[0][0].as_str(), Some(BOOTSTRAP_PATH));
}

/// The env file of `vars`' user-data as cloud-init's own YAML reader (PyYAML, in the Python
/// that runs cloud-init) reads it.
fn env_file_as_cloud_init_reads_it(user_data_file: &Path) -> String {
    let launcher = tool("sh", &["-c", "command -v cloud-init"], "cloud-init");
    let cloud_init = String::from_utf8_lossy(&launcher.stdout).trim().to_string();
    assert!(!cloud_init.is_empty(), "cloud-init is not installed: run .ci/test once, or `apt-get install cloud-init`");
    let first = BufReader::new(std::fs::File::open(&cloud_init).expect("cloud-init launcher"))
        .lines()
        .next()
        .and_then(Result::ok)
        .unwrap_or_default();
    let python = first.strip_prefix("#!").map(|s| s.split_whitespace().next().unwrap_or_default().to_string());
    let python = python.filter(|p| p.contains("python")).unwrap_or_else(|| "python3".into());
    let code = "import sys, yaml\n\
                d = yaml.safe_load(open(sys.argv[1], encoding='utf-8'))\n\
                e = [f for f in d['write_files'] if f['path'] == sys.argv[2]][0]\n\
                sys.stdout.buffer.write(e['content'].encode('utf-8'))\n";
    let out = tool(&python, &["-c", code, user_data_file.to_str().expect("utf-8 path"), ENV_FILE], "cloud-init");
    assert!(out.status.success(), "PyYAML: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn odd_characters_in_values_stay_inert_for_yaml_and_the_shell() {
    let dir = tempfile::tempdir().expect("tempdir");
    let canary = dir.path().join("pwned");
    let canary_s = canary.display().to_string();
    let url = format!(
        "http://h/a'b\"c\\d$(touch {canary_s})`touch {canary_s}`;touch {canary_s}\n#x: y\u{2028}\u{85}@@TOKEN@@"
    );
    let token = "tok'\"\\$HOME\t\r\nPADDOCK_POOL=evil";
    let pool = "pool: [a, b] # c";
    let cluster = "'; touch ".to_string() + &canary_s + "; '";
    let imds = "http://127.0.0.1:1/?a=1&b=$(id)";
    let vars = BootVars { master_url: &url, token, machine_id: -3, pool, cluster: &cluster, imds_url: imds };
    let user_data = render(&vars);
    let file = dir.path().join("user-data.yaml");
    std::fs::write(&file, &user_data).expect("write");

    let ours = write_file_entry(&parse(&user_data), ENV_FILE)["content"].as_str().expect("content").to_string();
    let theirs = env_file_as_cloud_init_reads_it(&file);
    assert_eq!(ours, theirs, "the two YAML readers disagree on the env file");

    let env_file = dir.path().join("agent.env");
    std::fs::write(&env_file, &ours).expect("write env");
    let show = "set -a; . \"$1\"; set +a; printf '%s\\0' \"$PADDOCK_MASTER_URL\" \"$PADDOCK_AGENT_TOKEN\" \
                \"$PADDOCK_MACHINE_ID\" \"$PADDOCK_POOL\" \"$PADDOCK_CLUSTER\" \"$PADDOCK_IMDS_URL\"";
    let out = tool("sh", &["-c", show, "sh", env_file.to_str().expect("utf-8 path")], "dash");
    assert!(out.status.success(), "sourcing the env file: {}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<String> = String::from_utf8(out.stdout)
        .expect("utf-8")
        .split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let want = [url.as_str(), token, "-3", pool, cluster.as_str(), imds];
    assert_eq!(got, want, "a value changed on its way through YAML and the shell");
    assert!(!canary.exists(), "a value ran a command");
}

#[test]
fn remap_moves_only_whole_written_paths() {
    let paths = ["/usr/local/sbin/boot", "/usr/local/sbin/boot.d"];
    let base = Path::new("/r/i-1");
    assert_eq!(remap("/usr/local/sbin/boot", &paths, base), "/r/i-1/usr/local/sbin/boot");
    assert_eq!(remap("sh -c '/usr/local/sbin/boot.d x'", &paths, base), "sh -c '/r/i-1/usr/local/sbin/boot.d x'");
    assert_eq!(remap("X=/usr/local/sbin/boot;", &paths, base), "X=/r/i-1/usr/local/sbin/boot;");
    assert_eq!(
        remap("/usr/local/sbin/bootx /a/usr/local/sbin/boot", &paths, base),
        "/usr/local/sbin/bootx /a/usr/local/sbin/boot"
    );
}

/// Stands in for `paddock agent`: records how it was started (the token's presence, never its
/// value), then idles like an agent waiting for work.
const FAKE_AGENT: &str = r#"#!/bin/sh
workdir=
prev=
for a in "$@"; do
    if [ "$prev" = --workdir ]; then workdir=$a; fi
    prev=$a
done
{
    printf 'args=%s\n' "$*"
    if [ -n "${PADDOCK_AGENT_TOKEN:-}" ]; then echo token=set; else echo token=unset; fi
    printf 'imds=%s\n' "${PADDOCK_IMDS_URL:-}"
    printf 'cwd=%s\n' "$(pwd)"
    printf 'pid=%s\n' "$$"
} >"$workdir/agent-ran.part"
mv "$workdir/agent-ran.part" "$workdir/agent-ran"
exec sleep 3600
"#;

/// One request the fake master saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
}

/// The master's agent download endpoint and nothing else: `GET /agent/download` with the
/// right bearer token gets [`FAKE_AGENT`], anything else 401.
struct FakeMaster {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl FakeMaster {
    fn start(token: &str) -> FakeMaster {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2, want) = (seen.clone(), stop.clone(), format!("Bearer {token}"));
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Some(req) = serve(stream, &want) {
                            seen2.lock().expect("seen").push(req);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeMaster { port, seen, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for FakeMaster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers one HTTP/1.1 request and closes the connection.
fn serve(mut stream: TcpStream, want_auth: &str) -> Option<Seen> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            }
        }
    }
    let ok = method == "GET" && path == "/agent/download" && authorization.as_deref() == Some(want_auth);
    let (status, ctype, body) = if ok {
        ("200 OK", "application/octet-stream", FAKE_AGENT.as_bytes())
    } else {
        ("401 Unauthorized", "text/plain", &b"unauthorized\n"[..])
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body));
    // Drain whatever the client still sends so closing does not reset the connection early.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = reader.read_to_end(&mut Vec::new());
    Some(Seen { method, path, authorization })
}

/// Launches one instance on moto with `user_data`, tagged as the EC2 provisioner tags them.
fn run_instance(moto: &Moto, cluster: &str, machine_id: i64, user_data: &str) -> String {
    let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let tags = TagSpecification::builder()
        .resource_type(ResourceType::Instance)
        .tags(tag(TAG_CLUSTER, cluster))
        .tags(tag(TAG_POOL, "linux"))
        .tags(tag(TAG_MACHINE, &machine_id.to_string()))
        .build();
    let out = moto
        .block_on(
            moto.client
                .run_instances()
                .image_id(moto.ami())
                .instance_type(InstanceType::T3Micro)
                .min_count(1)
                .max_count(1)
                .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
                .user_data(aws_smithy_types::base64::encode(user_data))
                .tag_specifications(tags)
                .send(),
        )
        .expect("RunInstances on moto");
    out.instances().first().and_then(|i| i.instance_id()).expect("instance id").to_string()
}

/// Polls `f` until it returns `Some`, failing after [`common::DEADLINE`] with `context()`.
fn wait_for<T>(what: &str, context: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < common::DEADLINE, "timed out waiting for: {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` is a live process (not a zombie).
fn live(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !matches!(stat.rsplit(')').next().and_then(|r| r.trim_start().chars().next()), Some('Z') | Some('X') | None)
}

#[test]
fn an_instance_boots_the_agent_from_its_user_data_and_loses_it_when_terminated() {
    let moto = Moto::start();
    let token = "b00t-t0ken-4f2a";
    let master = FakeMaster::start(token);
    let cluster = "images-boot";
    let emu = BootEmulator::start(moto.endpoint(), cluster.into(), Duration::from_millis(300));
    let imds = "http://127.0.0.1:9/imds";
    let user_data =
        render(&BootVars { master_url: &master.url(), token, machine_id: 7, pool: "linux", cluster, imds_url: imds });
    let id = run_instance(&moto, cluster, 7, &user_data);

    let root = emu.instance_root(&id);
    let agent_log = root.join("var/log/paddock-agent.log");
    let context = || {
        format!(
            "--- boot log ---\n{}\n--- agent log ---\n{}",
            emu.boot_log(&id),
            std::fs::read_to_string(&agent_log).unwrap_or_default()
        )
    };
    wait_for("the emulator boots the instance", context, || emu.booted().contains(&id).then_some(()));
    let ran = root.join("var/lib/paddock/agent-ran");
    let record = wait_for("the downloaded agent starts", context, || std::fs::read_to_string(&ran).ok());
    let field = |name: &str| {
        record
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing from {record}"))
            .to_string()
    };

    let workdir = root.join("var/lib/paddock");
    assert_eq!(field("args"), format!("agent --master {} --workdir {}", master.url(), workdir.display()));
    assert_eq!(field("token"), "set", "the agent gets its token from the environment");
    assert_eq!(field("imds"), imds);
    assert_eq!(field("cwd"), workdir.display().to_string());

    let seen = master.seen();
    assert!(!seen.is_empty(), "the agent was not downloaded");
    let last = seen.last().expect("one request");
    assert_eq!((last.method.as_str(), last.path.as_str()), ("GET", "/agent/download"));
    assert_eq!(last.authorization.as_deref(), Some(format!("Bearer {token}").as_str()));

    let agent_bin = root.join("opt/paddock/bin/paddock");
    assert_eq!(std::fs::read(&agent_bin).expect("agent binary"), FAKE_AGENT.as_bytes());
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777;
    assert_eq!(mode(&agent_bin), 0o755);
    assert_eq!(mode(&root.join("etc/paddock/agent.env")), 0o600, "the env file holds the token");
    assert_eq!(mode(&root.join("usr/local/sbin/paddock-bootstrap")), 0o755);

    let key = root.display().to_string();
    let pid: i32 = field("pid").parse().expect("pid");
    let procs = processes_with_key(&key);
    assert!(procs.contains(&pid), "the agent {pid} does not carry the machine key; the machine's processes: {procs:?}");
    for p in &procs {
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains(token), "the token is on the command line of {p}");
    }
    assert!(!emu.boot_log(&id).contains(token), "the token reached the boot log");
    assert!(
        !std::fs::read_to_string(&agent_log).unwrap_or_default().contains(token),
        "the token reached the agent log"
    );
    assert_eq!(emu.alive(), vec![id.clone()]);

    moto.terminate(&id);
    wait_for("the terminated instance's processes are gone", context, || {
        (!live(pid) && processes_with_key(&key).is_empty() && !emu.alive().contains(&id)).then_some(())
    });
    assert_eq!(emu.booted(), vec![id]);
}

#[test]
fn a_refused_token_ends_the_boot_instead_of_waiting() {
    let moto = Moto::start();
    let master = FakeMaster::start("the-right-token");
    let cluster = "images-refused";
    let emu = BootEmulator::start(moto.endpoint(), cluster.into(), Duration::ZERO);
    emu.set_power_off_on_exit(true);
    let user_data = render(&BootVars {
        master_url: &master.url(),
        token: "a-wrong-token",
        machine_id: 8,
        pool: "linux",
        cluster,
        imds_url: "http://127.0.0.1:9",
    });
    let id = run_instance(&moto, cluster, 8, &user_data);
    let context = || format!("--- boot log ---\n{}", emu.boot_log(&id));

    // The bootstrap gives up, exits (it would power off on a real machine), and the
    // emulator's power-off terminates the instance, which ends its life in the emulator too.
    wait_for("the instance is terminated after its boot script gave up", context, || {
        let state = moto.instances().into_iter().find(|i| i.id == id).map(|i| i.state);
        (matches!(state.as_deref(), Some("shutting-down" | "terminated")) && !emu.alive().contains(&id)).then_some(())
    });
    let log = emu.boot_log(&id);
    assert!(log.contains("the master refused this machine's token (401)"), "{log}");
    assert!(!log.contains("a-wrong-token"), "the token reached the boot log");
    let seen = master.seen();
    assert_eq!(seen.len(), 3, "a refused token is retried a few times only: {seen:?}");
    assert!(seen.iter().all(|s| s.authorization.as_deref() == Some("Bearer a-wrong-token")));
    assert!(!emu.instance_root(&id).join("opt/paddock/bin/paddock").exists());
    assert!(processes_with_key(&emu.instance_root(&id).display().to_string()).is_empty());
}

#[test]
fn a_baked_agent_starts_without_a_download() {
    let moto = Moto::start();
    let token = "baked-t0ken";
    let master = FakeMaster::start(token);
    let cluster = "images-baked";
    let emu = BootEmulator::start(moto.endpoint(), cluster.into(), Duration::ZERO);
    let rendered = render(&BootVars {
        master_url: &master.url(),
        token,
        machine_id: 9,
        pool: "linux",
        cluster,
        imds_url: "http://127.0.0.1:9",
    });
    // What an image built with the Packer template has: the agent at its baked path.
    let mut config = parse(&rendered);
    let baked: Value = serde_yaml_ng::from_str(&format!(
        "{{path: /opt/paddock/bin/paddock, permissions: '0755', encoding: b64, content: {}}}",
        aws_smithy_types::base64::encode(FAKE_AGENT)
    ))
    .expect("entry");
    config["write_files"].as_sequence_mut().expect("write_files").insert(0, baked);
    let user_data = format!("#cloud-config\n{}", serde_yaml_ng::to_string(&config).expect("yaml"));
    let id = run_instance(&moto, cluster, 9, &user_data);

    let root = emu.instance_root(&id);
    let ran = root.join("var/lib/paddock/agent-ran");
    let record = wait_for("the baked agent starts", || emu.boot_log(&id), || std::fs::read_to_string(&ran).ok());
    assert!(record.contains("token=set"), "{record}");
    assert!(emu.boot_log(&id).contains("using the agent baked into the image"), "{}", emu.boot_log(&id));
    assert!(master.seen().is_empty(), "a baked agent is not downloaded: {:?}", master.seen());

    moto.terminate(&id);
    let key = root.display().to_string();
    wait_for(
        "the terminated instance's processes are gone",
        || emu.boot_log(&id),
        || processes_with_key(&key).is_empty().then_some(()),
    );
}
