//! Mail against a real SMTP server on loopback (aiosmtpd from the test venv, storing what it
//! receives in a maildir): a build that breaks mails its committer and the list, with the
//! failing step and the end of the log; the fix mails again; a second failure mails nobody.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Bed, DEADLINE};

/// aiosmtpd on 127.0.0.1:`port`, writing each message to `maildir/new`.
struct SmtpServer {
    child: Child,
    maildir: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmtpServer {
    fn start() -> (SmtpServer, u16) {
        SmtpServer::start_with(&[])
    }

    /// With `extra` arguments, such as `--tlscert` for STARTTLS or `--smtpscert` for TLS.
    fn start_with(extra: &[&std::ffi::OsStr]) -> (SmtpServer, u16) {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run .ci/test once, which makes the venv with aiosmtpd (.ci/requirements.txt)",
            python.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let maildir = dir.path().join("mail");
        let port = free_port();
        let child = Command::new(&python)
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .args(extra)
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start aiosmtpd");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "aiosmtpd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        (SmtpServer { child, maildir, _dir: dir }, port)
    }

    /// Every message received, oldest first.
    fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else { return Vec::new() };
        let mut files: Vec<(std::time::SystemTime, String, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| {
                let at = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                (at, e.file_name().to_string_lossy().to_string(), e.path())
            })
            .collect();
        files.sort();
        files.into_iter().filter_map(|(_, _, p)| std::fs::read_to_string(p).ok()).collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn header<'a>(mail: &'a str, name: &str) -> Option<&'a str> {
    mail.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

#[test]
fn a_transition_mails_the_committers_and_the_list_with_the_failing_step_and_the_log() {
    let (smtp, port) = SmtpServer::start();
    let mut bed = Bed::new(&[]);
    bed.config(
        "",
        &format!(
            "[pool.local]\nmax_instances = 2\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\n\n\
             [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\n\
             steps = [\"echo collecting; echo 'FAILED test_widget'\", {{ name = \"tests\", run = \"! grep -q broken a.txt\" }}]\n\n\
             [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n\n\
             [[notifier]]\nkind = \"email\"\nsmtp = \"127.0.0.1:{port}\"\nsecurity = \"none\"\n\
             from = \"Paddock CI <ci@paddock.test>\"\nto = [\"dev-list@paddock.test\"]\n"
        ),
    );
    bed.start_with_env(&["main"], &[("PADDOCK_NOTIFY_RETRY_MS", "200")]);
    bed.build_file("fine\n", "first");
    let broken = bed.build_file("broken\n", "break it");
    let mails = bed.wait("the failure's mail", || Some(smtp.messages()).filter(|m| m.len() == 1));
    let mail = &mails[0];
    assert_eq!(header(mail, "X-RcptTo"), Some("dev-list@paddock.test, ada@example.com"), "{mail}");
    assert_eq!(header(mail, "X-MailFrom"), Some("ci@paddock.test"));
    assert_eq!(header(mail, "Subject"), Some("b on main: failure"));
    let url = format!("{}/builds/{}", bed.url(), broken["id"]);
    for expected in [
        format!("b on main is now failure (was success) at {}", &broken["revision"].as_str().unwrap_or("")[..10]),
        "Failing step: tests".to_string(),
        format!("Build: {url}"),
        "Committers: Ada Tester <ada@example.com>".to_string(),
        "The end of the log:".to_string(),
        "FAILED test_widget".to_string(),
    ] {
        assert!(mail.contains(&expected), "{expected:?} in\n{mail}");
    }

    // Still failing: no mail. Fixed: one more.
    bed.build_file("still broken\n", "still broken");
    bed.build_file("all good\n", "fix it");
    let mails = bed.wait("the fix's mail", || Some(smtp.messages()).filter(|m| m.len() >= 2));
    bed.notifications_settled();
    assert_eq!(smtp.messages().len(), 2, "a second failure mails nobody");
    assert_eq!(header(&mails[1], "Subject"), Some("b on main: success"));
    assert!(mails[1].contains("is now success (was failure)"), "{}", mails[1]);
}

#[test]
fn over_starttls_and_tls_the_mail_goes_to_servers_signed_by_the_configured_ca_only_and_to_allowed_domains() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = common::tls::TestCa::make(certs.path());
    let (cert, key) = (ca.cert.as_os_str(), ca.key.as_os_str());
    // aiosmtpd refuses MAIL before STARTTLS when given `--tlscert`, so a mail received there
    // came over TLS; the `--smtpscert` one speaks only TLS.
    let (starttls, starttls_port) = SmtpServer::start_with(&["--tlscert".as_ref(), cert, "--tlskey".as_ref(), key]);
    let (smtps, smtps_port) = SmtpServer::start_with(&["--smtpscert".as_ref(), cert, "--smtpskey".as_ref(), key]);
    // Signed by the trusted CA, but for another name than the one dialled.
    let (other_cert, other_key) = ca.issue("elsewhere", "DNS:mail.elsewhere.test");
    let (misnamed, misnamed_port) = SmtpServer::start_with(&[
        "--tlscert".as_ref(),
        other_cert.as_os_str(),
        "--tlskey".as_ref(),
        other_key.as_os_str(),
    ]);
    let mut bed = Bed::new(&[]);
    std::fs::copy(&ca.ca, bed.path().join("private-ca.pem")).expect("copy the CA");
    // The committer (ada@example.com) is mailed only where her domain is allowed.
    let notifier = |name: &str, port: u16, security: &str, domain: &str, ca_file: &str| {
        format!(
            "[[notifier]]\nname = \"{name}\"\nkind = \"email\"\nsmtp = \"127.0.0.1:{port}\"\nsecurity = \"{security}\"\n\
             from = \"ci@paddock.test\"\nto = [\"{name}@paddock.test\"]\ncommitter_domains = [\"{domain}\"]\n{ca_file}\n"
        )
    };
    let preamble = common::ONE_BUILDER_FAILING_ON_BROKEN;
    bed.config(
        "",
        &format!(
            "{preamble}{}{}{}{}",
            notifier("starttls", starttls_port, "starttls", "paddock.test", "ca_file = \"private-ca.pem\""),
            notifier("smtps", smtps_port, "tls", "Example.com", "ca_file = \"private-ca.pem\""),
            // Trusts only the system's CAs: the same STARTTLS server must be refused.
            notifier("untrusting", starttls_port, "starttls", "example.com", ""),
            notifier("misnamed", misnamed_port, "starttls", "example.com", "ca_file = \"private-ca.pem\""),
        ),
    );
    bed.start_with_env(&["main"], &[("PADDOCK_NOTIFY_RETRY_MS", "200")]);
    let broken = bed.build_file("broken\n", "break it");
    assert_eq!(broken["state"], "failure");

    let over_starttls = bed.wait("the STARTTLS mail", || Some(starttls.messages()).filter(|m| !m.is_empty()));
    let over_tls = bed.wait("the TLS mail", || Some(smtps.messages()).filter(|m| !m.is_empty()));
    for (mail, to) in
        [(&over_starttls[0], "starttls@paddock.test"), (&over_tls[0], "smtps@paddock.test, ada@example.com")]
    {
        assert_eq!(header(mail, "X-RcptTo"), Some(to), "{mail}");
        assert_eq!(header(mail, "Subject"), Some("b on main: failure"), "{mail}");
        assert!(mail.contains(&format!("Build: {}/builds/{}", bed.url(), broken["id"])), "{mail}");
    }
    let failed_try = |notifier: &str| {
        bed.wait(&format!("a failed try of {notifier}"), || {
            bed.get("/api/deliveries")["deliveries"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["notifier"] == notifier && d["attempts"].as_i64().unwrap_or(0) > 0)
                .cloned()
        })
    };
    for (notifier, reason) in
        [("untrusting", "UnknownIssuer"), ("misnamed", "certificate not valid for name \"127.0.0.1\"")]
    {
        let refused = failed_try(notifier);
        assert_eq!(refused["state"], "pending", "retried later: {refused}");
        assert!(refused["last_error"].as_str().unwrap_or_default().contains(reason), "{refused}");
    }
    assert_eq!(starttls.messages().len(), 1, "nothing reached the server from the untrusting notifier");
    assert!(misnamed.messages().is_empty(), "nothing reached the server with a certificate for another name");
}
