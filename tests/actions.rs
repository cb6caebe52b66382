//! Actions through the API on a real master with real agents: cancel a running build (the
//! agent kills the step, still runs the `always` step, reports it cancelled, and the machine
//! takes the next build), cancel a queued one, rebuild, terminate a busy machine (its build is
//! retried), and pause a pool (kept across a restart) then resume it.

mod common;

use common::Bed;
use serde_json::{json, Value};

fn config(go: &std::path::Path) -> String {
    format!(
        "[pool.local]\nmax_instances = 2\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\n\n\
         [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\n\
         steps = [\"echo started; while [ ! -e {go} ]; do sleep 0.1; done; echo finished\", \"echo second\", \
         {{ name = \"cleanup\", run = \"echo cleaned-up\", always = true }}]\n",
        go = go.display()
    )
}

fn post(client: &reqwest::blocking::Client, bed: &Bed, path: &str, body: Option<Value>) -> (u16, Value) {
    let req = client.post(format!("{}{path}", bed.url()));
    let req = match body {
        Some(b) => req.json(&b),
        None => req,
    };
    let resp = req.send().expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn build(bed: &Bed, id: i64) -> Value {
    bed.get(&format!("/api/builds/{id}"))
}

fn wait_state(bed: &Bed, id: i64, state: &str) -> Value {
    bed.wait(&format!("build {id} to be {state}"), || Some(build(bed, id)).filter(|b| b["state"] == state))
}

fn force(client: &reqwest::blocking::Client, bed: &Bed) -> i64 {
    let (status, body) = post(client, bed, "/api/builds", Some(json!({"builder": "b", "branch": "main"})));
    assert_eq!(status, 201, "{body}");
    body["builds"][0]["id"].as_i64().expect("id")
}

/// `paddock ARGS --master URL` with the bed's admin token; (success, stdout, stderr).
fn cli(bed: &Bed, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(common::paddock_bin())
        .args(args)
        .args(["--master", &bed.url()])
        .env("PADDOCK_TOKEN", bed.token())
        .output()
        .expect("paddock");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn log(bed: &Bed, id: i64) -> String {
    bed.http.get(format!("{}/api/builds/{id}/log", bed.url())).send().expect("log").text().expect("text")
}

#[test]
fn cancel_rebuild_and_terminate() {
    let mut bed = Bed::new(&[]);
    let go = bed.flag("go");
    bed.config("", &config(&go));
    bed.start(&["main"]);
    let carl = Bed::client(Some(&bed.add_user("carl", "committer", "carl-password")));

    // A running build, cancelled: the agent kills the step and says so.
    let first = force(&carl, &bed);
    let running = wait_state(&bed, first, "running");
    bed.wait("the step to start", || log(&bed, first).contains("started").then_some(()));
    let machine = running["machine"].as_i64().expect("machine");
    let (status, body) = post(&carl, &bed, &format!("/api/builds/{first}/cancel"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "stopping");
    let done = wait_state(&bed, first, "cancelled");
    assert_eq!(done["cancelled_by"], "carl");
    assert_eq!(done["steps"][1]["state"], "cancelled", "{done}");
    assert_eq!(done["steps"][2]["state"], "skipped", "{done}");
    assert_eq!(done["steps"][3]["state"], "success", "an `always` step still runs: {done}");
    let text = log(&bed, first);
    assert!(text.lines().any(|l| l == "cleaned-up"), "{text}");
    assert!(text.contains("*** cancel requested by carl"), "{text}");
    assert!(text.contains("*** build cancelled; process group killed"), "{text}");
    assert!(!text.lines().any(|l| l == "finished" || l == "second"), "{text}");
    // Cancelling a finished build is a conflict, with the reason.
    let (status, body) = post(&carl, &bed, &format!("/api/builds/{first}/cancel"), None);
    assert_eq!(status, 409);
    assert!(body["error"].as_str().unwrap_or("").contains("is cancelled"), "{body}");
    assert_eq!(post(&carl, &bed, "/api/builds/999999/cancel", None).0, 404);
    let (ok, _, err) = cli(&bed, &["cancel", &first.to_string()]);
    assert!(!ok && err.contains("409") && err.contains("is cancelled"), "{err}");

    // The machine is still good: the next build runs on it.
    std::fs::write(&go, "").expect("go");
    let second = force(&carl, &bed);
    let ok = wait_state(&bed, second, "success");
    assert_eq!(ok["machine"], machine, "the warm machine took the next build");

    // Rebuild: same builder, branch and revision, a new build.
    let (status, body) = post(&carl, &bed, &format!("/api/builds/{second}/rebuild"), None);
    assert_eq!(status, 201, "{body}");
    let again = body["builds"][0].clone();
    assert_eq!(again["revision"], ok["revision"]);
    assert_eq!(again["reason"], format!("rebuild of build {second} by carl"));
    let again = again["id"].as_i64().expect("id");
    wait_state(&bed, again, "success");
    assert_eq!(post(&carl, &bed, "/api/builds/999999/rebuild", None).0, 404);

    // Terminate a busy machine (admin): its build is retried on another and succeeds.
    std::fs::remove_file(&go).expect("rm go");
    let third = force(&carl, &bed);
    let busy = wait_state(&bed, third, "running");
    bed.wait("the step to start", || log(&bed, third).contains("started").then_some(()));
    let m = busy["machine"].as_i64().expect("machine");
    assert_eq!(post(&carl, &bed, &format!("/api/machines/{m}/terminate"), None).0, 403, "committers cannot");
    let (status, body) = post(&bed.http, &bed, &format!("/api/machines/{m}/terminate"), None);
    assert_eq!(status, 202, "{body}");
    wait_state(&bed, third, "retry");
    bed.wait("the machine to be gone", || {
        bed.machines().into_iter().find(|x| x["id"] == m && x["state"] == "gone").map(|_| ())
    });
    let retried = bed
        .wait("the retry", || bed.builds().into_iter().find(|b| b["attempt"] == 2 && b["request"] == busy["request"]));
    std::fs::write(&go, "").expect("go");
    let retried = wait_state(&bed, retried["id"].as_i64().expect("id"), "success");
    assert_ne!(retried["machine"], m);
    let (status, body) = post(&bed.http, &bed, &format!("/api/machines/{m}/terminate"), None);
    assert_eq!(status, 404, "{body}");
    let events = bed.log();
    assert!(events.contains("admin asked to stop the machine"), "logged with who asked");
}

#[test]
fn a_paused_pool_starts_nothing_across_a_restart_until_resumed() {
    let mut bed = Bed::new(&[]);
    let go = bed.flag("go");
    std::fs::write(&go, "").expect("go");
    bed.config("", &config(&go));
    bed.start(&["main"]);
    let carl = Bed::client(Some(&bed.add_user("carl", "committer", "carl-password")));
    assert_eq!(post(&carl, &bed, "/api/pools/local/pause", None).0, 403, "committers cannot pause");
    let (status, body) = post(&bed.http, &bed, "/api/pools/local/pause", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(post(&bed.http, &bed, "/api/pools/nope/pause", None).0, 404);

    let queued = force(&carl, &bed);
    let pool = bed.wait("the pool to say why the build waits", || {
        bed.get("/api/pools")["pools"].as_array().cloned().unwrap_or_default().into_iter().find(|p| {
            p["name"] == "local"
                && p["waiting_reason"].as_str().is_some_and(|r| r.starts_with("pool paused by bed-admin"))
        })
    });
    assert_eq!(pool["paused"]["by"], "bed-admin");
    assert_eq!(pool["queued"], 1);
    assert!(bed.machines().is_empty(), "nothing launched while paused");

    // A queued build cancelled: at once.
    let (status, body) = post(&carl, &bed, &format!("/api/builds/{queued}/cancel"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "cancelled");
    assert_eq!(body["build"]["state"], "cancelled");
    assert_eq!(body["build"]["cancelled_by"], "carl");

    // Still paused after a restart.
    let waiting = force(&carl, &bed);
    bed.stop_master();
    bed.start(&["main"]);
    let pools = bed.get("/api/pools");
    assert!(pools["pools"][0]["paused"].is_object(), "{pools}");
    assert_eq!(build(&bed, waiting)["state"], "queued");
    assert!(bed.machines().is_empty(), "nothing launched while paused, restart or not");

    // Resumed (from the command line): the build runs.
    let (ok, out, err) = cli(&bed, &["resume", "local"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "pool local resumed");
    wait_state(&bed, waiting, "success");
    assert!(bed.get("/api/pools")["pools"][0]["paused"].is_null());
}

#[test]
fn a_live_log_left_open_does_not_hold_up_the_shutdown() {
    let mut bed = Bed::new(&[]);
    let go = bed.flag("go");
    bed.config("", &config(&go));
    bed.start(&["main"]);
    let (status, _) = post(&bed.http, &bed, "/api/pools/local/pause", None);
    assert_eq!(status, 200);
    let queued = force(&bed.http, &bed);
    // A browser tab following the queued build's log: the stream stays open while it waits.
    let url = format!("{}/builds/{queued}/log/stream", bed.url());
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let resp = common::blocking_client().build().expect("client").get(url).send().expect("stream");
        assert_eq!(resp.status().as_u16(), 200);
        let _ = open_tx.send(());
        resp.text().unwrap_or_default()
    });
    open_rx.recv_timeout(common::DEADLINE).expect("the stream to open");
    bed.term_master();
    let status = bed.wait_master_exit();
    assert!(status.success(), "master exit: {status:?}");
    let seen = reader.join().expect("reader");
    assert!(seen.contains("event: state\ndata: queued"), "{seen}");
}
