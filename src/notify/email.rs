//! Email over SMTP: a message per delivery to the build's committers and the configured lists,
//! with the failing step and the end of the log.

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::webhook::{SendError, TIMEOUT};
use crate::config::SmtpSecurity;
use tokio_rustls::rustls::pki_types::CertificateDer;

pub use crate::config::address_of;

/// Everyone a message goes to: the fixed list, then the committers (when wanted, and only
/// those in `domains` unless it is empty), each once.
pub fn recipients(to: &[String], committers: Option<&[String]>, domains: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    // An address the mailer would refuse is dropped here, so it cannot sink the whole mail.
    let valid = |a: &String| a.parse::<Mailbox>().is_ok();
    let allowed = |a: &String| {
        domains.is_empty()
            || a.rsplit_once('@').is_some_and(|(_, d)| domains.iter().any(|allowed| d.eq_ignore_ascii_case(allowed)))
    };
    let committers = committers.unwrap_or_default().iter().filter_map(|s| address_of(s)).filter(allowed);
    for a in to.iter().filter_map(|s| address_of(s)).chain(committers).filter(valid) {
        if !out.iter().any(|o| o.eq_ignore_ascii_case(&a)) {
            out.push(a);
        }
    }
    out
}

/// Where and how to send.
#[derive(Clone)]
pub struct Smtp<'a> {
    pub host: &'a str,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// CA certificates to trust instead of the system's, for a server with a private CA.
    pub roots: Option<&'a [CertificateDer<'static>]>,
}

impl std::fmt::Debug for Smtp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Smtp")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("private_ca", &self.roots.is_some())
            .finish()
    }
}

/// Sends one message.
pub async fn send(smtp: &Smtp<'_>, from: &str, to: &[String], subject: &str, body: &str) -> Result<(), SendError> {
    if to.is_empty() {
        return Err(SendError::Refused("nobody to mail: no list and no committer address".into()));
    }
    let refused = |what: &str, e: &dyn std::fmt::Display| SendError::Refused(format!("{what}: {e}"));
    let mut msg = Message::builder()
        .from(from.parse::<Mailbox>().map_err(|e| refused("bad sender", &e))?)
        .subject(subject.lines().next().unwrap_or_default());
    for t in to {
        msg = msg.to(t.parse::<Mailbox>().map_err(|e| refused("bad recipient", &e))?);
    }
    let msg = msg.body(body.to_string()).map_err(|e| refused("cannot build the message", &e))?;
    let tls = |host: &str| {
        let mut params = TlsParameters::builder(host.to_string());
        if let Some(roots) = smtp.roots {
            params = params.certificate_store(CertificateStore::None);
            for der in roots {
                let ca = Certificate::from_der(der.to_vec()).map_err(|e| refused("`ca_file`", &e))?;
                params = params.add_root_certificate(ca);
            }
        }
        params.build().map_err(|e| refused("TLS settings", &e))
    };
    let mut transport =
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(smtp.host).port(smtp.port).timeout(Some(TIMEOUT));
    transport = match smtp.security {
        SmtpSecurity::None => transport.tls(Tls::None),
        SmtpSecurity::StartTls => transport.tls(Tls::Required(tls(smtp.host)?)),
        SmtpSecurity::Tls => transport.tls(Tls::Wrapper(tls(smtp.host)?)),
    };
    if let (Some(user), Some(pass)) = (smtp.username, smtp.password) {
        transport =
            transport.credentials(Credentials::new(user.to_string(), String::from_utf8_lossy(pass).to_string()));
    }
    match transport.build().send(msg).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_permanent() => Err(SendError::Refused(format!("the SMTP server refused the mail: {e}"))),
        Err(e) => Err(SendError::Retry(format!("cannot send the mail: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_recipients() {
        assert_eq!(address_of("Ada Tester <ada@example.com>").as_deref(), Some("ada@example.com"));
        assert_eq!(address_of("ci@example.com").as_deref(), Some("ci@example.com"));
        for bad in ["Ada Tester", "ada@", "@example.com", "a b@example.com", "<ada@example.com", "x@@y"] {
            assert_eq!(address_of(bad), None, "{bad}");
        }
        let committers = [
            "Ada <ada@example.com>".to_string(),
            "no address".to_string(),
            "ADA@example.com".to_string(),
            "Odd <a,b@example.com>".to_string(),
        ];
        assert_eq!(
            recipients(&["dev@example.com".into()], Some(&committers), &[]),
            ["dev@example.com", "ada@example.com"]
        );
        assert_eq!(recipients(&["dev@example.com".into()], None, &[]), ["dev@example.com"]);
        // The domain list limits the committers, never the fixed list.
        let outsiders = ["Eve <eve@evil.test>".to_string(), "Bob <bob@Example.COM>".to_string()];
        assert_eq!(
            recipients(&["ops@elsewhere.test".into()], Some(&outsiders), &["example.com".into()]),
            ["ops@elsewhere.test", "bob@Example.COM"]
        );
        assert_eq!(recipients(&[], Some(&outsiders), &["sub.example.com".into()]), Vec::<String>::new());
    }
}
