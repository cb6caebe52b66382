//! The generic webhook: the delivery's JSON POSTed to a URL, signed with HMAC-SHA256 so the
//! receiver can check it came from this master.
//!
//! Headers: `X-Paddock-Event` (started, finished, transition), `X-Paddock-Delivery` (the
//! delivery's id: the same on every retry, so receivers can drop repeats) and, with a secret,
//! `X-Paddock-Signature-256: sha256=<hex of HMAC-SHA256(secret, body)>`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long one POST may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a delivery did not go through, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth another try later (the receiver is down, slow, or said so).
    #[error("{0}")]
    Retry(String),
    /// The receiver refused the message itself; sending it again changes nothing.
    #[error("{0}")]
    Refused(String),
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// POSTs one delivery.
pub async fn send(
    http: &reqwest::Client,
    url: &str,
    secret: Option<&[u8]>,
    delivery: i64,
    event: &str,
    body: &str,
) -> Result<(), SendError> {
    let mut req = http
        .post(url)
        .timeout(TIMEOUT)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::USER_AGENT, concat!("paddock/", env!("CARGO_PKG_VERSION")))
        .header("X-Paddock-Event", event)
        .header("X-Paddock-Delivery", delivery.to_string())
        .body(body.to_string());
    if let Some(secret) = secret {
        req = req.header("X-Paddock-Signature-256", signature(secret, body.as_bytes()));
    }
    // Webhook URLs often carry a secret in their path: no error names the URL.
    let resp = req.send().await.map_err(|e| {
        SendError::Retry(format!("cannot reach the receiver: {}", crate::tls::error_chain(&e.without_url())))
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let why = format!("the receiver answered {status}");
    match status.as_u16() {
        408 | 425 | 429 | 500..=599 => Err(SendError::Retry(why)),
        _ => Err(SendError::Refused(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::signature;

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
