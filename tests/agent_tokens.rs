//! Resume tokens die once their successor is in use: a token an agent already spent cannot take
//! over its connection, even while a Welcome lost in transit still lets the agent back in.
//! The test plays the agent over the real master's `/agent/ws`.

mod common;

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;

use common::Bed;
use paddock::agent::protocol::{AgentMsg, MasterMsg, Secret};
use paddock::core::{BuildId, MachineId};
use tokio_tungstenite::tungstenite::{self, stream::MaybeTlsStream, Message, WebSocket};

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

fn open(bed: &Bed) -> Ws {
    let url = format!("ws://127.0.0.1:{}/agent/ws", bed.port);
    tungstenite::connect(url).expect("connect to /agent/ws").0
}

fn send(ws: &mut Ws, msg: &AgentMsg) {
    ws.send(Message::text(serde_json::to_string(msg).expect("json"))).expect("send");
}

/// The next protocol message from the master (pings skipped); `None` once it closes.
fn recv(ws: &mut Ws) -> Option<MasterMsg> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("master message")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Resumes as `machine` with `token`: the new resume token, or `None` when refused.
fn resume(bed: &Bed, machine: MachineId, token: &str, build: BuildId) -> (Ws, Option<String>) {
    let mut ws = open(bed);
    let msg = AgentMsg::Resume { machine, token: Secret(token.into()), version: "test".into(), build: Some(build) };
    send(&mut ws, &msg);
    match recv(&mut ws) {
        Some(MasterMsg::Welcome { resume_token, .. }) => {
            let t = resume_token.expect("a resume token").expose().to_string();
            (ws, Some(t))
        }
        Some(MasterMsg::Refused { .. }) | None => (ws, None),
        Some(other) => panic!("expected welcome or refused, got {other:?}"),
    }
}

#[test]
fn a_spent_resume_token_never_works_again_once_its_successor_is_in_use() {
    let mut bed = Bed::new(&[]);
    // The machine's process only records its one-time token (in its work folder, all a
    // sandboxed machine may write): this test is its agent.
    let saved = bed.machine_dir("local", 1).join("token.txt");
    let script = bed.path().join("recording-machine.sh");
    std::fs::write(&script, "#!/bin/sh\nprintf '%s' \"$PADDOCK_AGENT_TOKEN\" > token.txt\nexec sleep 300\n")
        .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bed.config_with_master(
        "heartbeat_timeout = \"60s\"\n",
        "",
        &format!(
            "[pool.local]\nagent_command = \"{}\"\nboot_timeout = \"60s\"\n\n[[builder]]\nname = \"b\"\nrepo = \"app\"\n\
             pool = \"local\"\nsteps = [\"true\"]\n\n[[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n",
            script.display()
        ),
    );
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    let token =
        bed.wait("the machine to record its token", || std::fs::read_to_string(&saved).ok().filter(|t| t.len() == 64));

    // The agent says hello and is given the build.
    let mut first = open(&bed);
    send(&mut first, &AgentMsg::Hello { token: Secret(token), version: "test".into() });
    let (machine, t1) = match recv(&mut first) {
        Some(MasterMsg::Welcome { machine, resume_token, .. }) => {
            (machine, resume_token.expect("token").expose().to_string())
        }
        other => panic!("expected welcome, got {other:?}"),
    };
    let build = match recv(&mut first) {
        Some(MasterMsg::Run(job)) => job.build,
        other => panic!("expected the build, got {other:?}"),
    };
    drop(first);

    // It reconnects with T1 and gets T2, but its Welcome is lost: T1 must still work.
    let (lost, t2) = resume(&bed, machine, &t1, build);
    let t2 = t2.expect("T1 resumes");
    drop(lost);
    let (mut live, t3) = resume(&bed, machine, &t1, build);
    let t3 = t3.expect("T1 still resumes while its successor was never used");
    assert_ne!(t2, t3);

    // The agent speaks on that connection: T3 is in use, T1 and T2 are dead.
    send(&mut live, &AgentMsg::Heartbeat);
    bed.wait("the earlier tokens to be retired", || {
        (bed.db_scalar(&format!("SELECT resume_prev IS NULL FROM machines WHERE id = {machine}")) == Some(1))
            .then_some(())
    });
    for (name, spent) in [("T1", &t1), ("T2", &t2)] {
        let (_ws, taken) = resume(&bed, machine, spent, build);
        assert!(taken.is_none(), "{name}, already spent, took over the live connection");
    }
    // The live agent is still the machine's agent and is still heard.
    send(&mut live, &AgentMsg::Heartbeat);
    let (mut current, t4) = resume(&bed, machine, &t3, build);
    assert!(t4.is_some(), "the current token still works");
    // The build ends; the master acknowledges the report.
    let finished = AgentMsg::BuildFinished { build, seq: 1, result: paddock::agent::protocol::BuildResult::Failure };
    send(&mut current, &finished);
    let acked = loop {
        match recv(&mut current) {
            Some(MasterMsg::Ack(a)) => break a,
            Some(_) => continue,
            None => panic!("the master closed the connection instead of acknowledging"),
        }
    };
    assert_eq!((acked.build, acked.seq), (build, 1));
    let log = bed.log();
    assert!(log.contains("unknown or already used resume token"), "refusals logged");
    for t in [&t1, &t2, &t3] {
        assert!(!log.contains(t.as_str()), "a resume token reached the log");
    }
}
