//! The agent reaches an `https://` master over TLS (wss://), trusting the system's CA store,
//! here pointed at a test CA with `SSL_CERT_FILE`. The certificate is made by the openssl CLI.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use paddock::agent::client::{run, AgentOptions};
use paddock::agent::protocol::{AgentMsg, MasterMsg, Secret};
use paddock::core::MachineId;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn the_agent_connects_to_an_https_master_it_trusts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let common::tls::TestCa { ca, cert, key, .. } = common::tls::TestCa::make(dir.path());
    // The only test in this binary: the variable is read by the agent's TLS connector.
    std::env::set_var("SSL_CERT_FILE", &ca);
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&cert).expect("cert").collect::<Result<_, _>>().expect("certs");
    let key = PrivateKeyDer::from_pem_file(&key).expect("key");
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();

    let work = tempfile::tempdir().expect("workdir");
    let opts = AgentOptions {
        master: format!("https://localhost:{port}"),
        token: "tok-tls".into(),
        workdir: work.path().into(),
    };
    let agent = tokio::spawn(run(opts));

    let (tcp, _) = tokio::time::timeout(DEADLINE, listener.accept()).await.expect("agent connects").expect("accept");
    let tls = acceptor.accept(tcp).await.expect("TLS handshake with the agent");
    let ws = tokio_tungstenite::accept_async(tls).await.expect("WebSocket handshake over TLS");
    let (mut sink, mut stream) = ws.split();
    let hello = loop {
        match tokio::time::timeout(DEADLINE, stream.next()).await.expect("agent speaks") {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<AgentMsg>(t.as_str()).expect("json"),
            Some(Ok(_)) => continue,
            other => panic!("connection ended before hello: {other:?}"),
        }
    };
    match hello {
        AgentMsg::Hello { token, .. } => assert_eq!(token.expose(), "tok-tls"),
        other => panic!("expected hello, got {other:?}"),
    }
    let welcome = MasterMsg::Welcome {
        machine: MachineId(1),
        heartbeat_secs: 30,
        resume_token: Some(Secret("r".into())),
        reconnect_secs: 0,
        acked: None,
    };
    sink.send(Message::text(serde_json::to_string(&welcome).expect("json"))).await.expect("welcome");
    sink.send(Message::text(serde_json::to_string(&MasterMsg::Shutdown).expect("json"))).await.expect("shutdown");
    let result = tokio::time::timeout(DEADLINE, agent).await.expect("agent stops").expect("agent task");
    assert!(result.is_ok(), "agent ended with {result:?}");
}
