//! `/metrics` and `/readyz` of a real master: the exposition is read back by the Prometheus
//! reference parser (`prometheus_client`, installed by `.ci/test` into `.venv`) and its numbers
//! match what happened: a build run, a machine launched, launches failing in a broken pool.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use common::Bed;

/// Parses an exposition with the reference parser; returns sample name + sorted labels → value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    assert!(
        std::path::Path::new(python).exists(),
        "{python} is missing: run .ci/test once (it creates the venv with prometheus_client)"
    );
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the parser");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed the parser");
    let out = child.wait_with_output().expect("parser output");
    assert!(out.status.success(), "not valid Prometheus text: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("parser's JSON")
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let mut bed = Bed::new(&[]);
    bed.config(
        "",
        "[pool.local]\nhourly_price = 3.6\n\n\
         [pool.broken]\nagent_command = \"/nonexistent/paddock\"\nmax_instances = 1\n\n\
         [[builder]]\nname = \"ok\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"true\"]\n\n\
         [[builder]]\nname = \"stuck\"\nrepo = \"app\"\npool = \"broken\"\nsteps = [\"true\"]\n\n\
         [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"ok\", \"stuck\"]\n",
    );
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "x\n", "first");
    bed.wait("the ok build to succeed", || {
        bed.builds().iter().any(|b| b["builder"] == "ok" && b["state"] == "success").then_some(())
    });
    let scrape = || {
        let resp = bed.http.get(format!("{}/metrics", bed.url())).send().expect("GET /metrics");
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
        parse(&resp.text().expect("body"))
    };
    let m = bed.wait("a failed launch in the broken pool", || {
        let m = scrape();
        m.get("paddock_launch_failures_total{pool=broken}").filter(|n| **n >= 1.0)?;
        Some(m)
    });
    assert_eq!(m["paddock_builds{state=success}"], 1.0, "{m:?}");
    assert_eq!(m["paddock_builds{state=queued}"], 1.0, "{m:?}");
    assert_eq!(m["paddock_queue_depth{pool=broken}"], 1.0);
    assert_eq!(m["paddock_queue_depth{pool=local}"], 0.0);
    assert_eq!(m["paddock_machines_launched_total{pool=local}"], 1.0);
    assert!(!m.contains_key("paddock_machines_launched_total{pool=broken}"), "{m:?}");
    assert_eq!(m["paddock_cloud_throttled_calls_total{provider=ec2}"], 0.0);
    assert_eq!(m["paddock_spend_capped{pool=local}"], 0.0);
    // The local machine has run a few seconds at $0.001 a second, and still runs.
    let spent = m["paddock_spend_dollars{pool=local,window=day}"];
    assert!(spent > 0.0 && spent < 1.0, "{spent}");
    assert!(m["paddock_spend_dollars{pool=local,window=hour}"] <= spent);
    assert_eq!(m["paddock_spend_dollars{pool=broken,window=day}"], 0.0);
    let machines: f64 = m.iter().filter(|(k, _)| k.starts_with("paddock_machines{pool=local,")).map(|(_, v)| v).sum();
    assert_eq!(machines, 1.0, "the local machine is idle (not gone yet): {m:?}");

    let ready = bed.http.get(format!("{}/readyz", bed.url())).send().expect("GET /readyz");
    assert_eq!(ready.status().as_u16(), 200);
    assert_eq!(ready.text().expect("body"), "ready\n");
}

#[test]
fn readyz_says_not_ready_while_the_master_drains() {
    let mut bed = Bed::new(&[]);
    // The step waits for a file the test writes, so the drain lasts as long as the test wants.
    let release = bed.flag("release");
    bed.config(
        "",
        &format!(
            "[pool.local]\n\n[[builder]]\nname = \"slow\"\nrepo = \"app\"\npool = \"local\"\n\
             steps = [\"while [ ! -e {} ]; do sleep 0.2; done\"]\n\n\
             [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"slow\"]\n",
            release.display()
        ),
    );
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "x\n", "first");
    bed.wait("the build running", || bed.builds().iter().any(|b| b["state"] == "running").then_some(()));
    let readyz = |bed: &Bed| {
        let r = bed.http.get(format!("{}/readyz", bed.url())).send().expect("GET /readyz");
        (r.status().as_u16(), r.text().expect("body"))
    };
    assert_eq!(readyz(&bed), (200, "ready\n".to_string()));
    bed.term_master();
    let (status, body) = bed.wait("/readyz to say the master is draining", || {
        let (status, body) = readyz(&bed);
        (status == 503).then_some((status, body))
    });
    assert_eq!((status, body.as_str()), (503, "shutting down: no new builds\n"));
    std::fs::write(&release, "").expect("release the build");
    assert!(bed.wait_master_exit().success());
    let done = bed.db_scalar("SELECT COUNT(*) FROM builds WHERE state = 'success'");
    assert_eq!(done, Some(1), "the running build finished during the drain");
}
