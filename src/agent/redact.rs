//! Streaming secret redaction for step output.
//!
//! Output arrives in arbitrary chunks: a secret may be split across two reads, and so may a
//! multi-byte UTF-8 character. The [`Redactor`] therefore works in two stages, each holding back
//! only what it cannot decide yet:
//!
//! 1. *matching* (bytes → bytes): at each position the longest secret that matches is replaced by
//!    `<secret:NAME>`; a tail that is still a proper prefix of some secret is held back until more
//!    bytes (or [`Redactor::finish`]) settle it;
//! 2. *decoding* (bytes → text): an incomplete trailing UTF-8 sequence is held back; invalid bytes
//!    become U+FFFD, exactly as [`String::from_utf8_lossy`] would.
//!
//! Because every decision depends only on bytes that are already known, the output is the same
//! however the input is split, which the property tests check.

/// Replaces secret values in a byte stream by `<secret:NAME>` markers.
#[derive(Clone)]
pub struct Redactor {
    /// (value, marker), longest value first so that the first full match is the longest.
    secrets: Vec<(Vec<u8>, String)>,
    /// Bytes not yet matched (a possible secret prefix).
    pending: Vec<u8>,
    /// Matched bytes not yet decoded (an incomplete UTF-8 sequence at most, between calls).
    undecoded: Vec<u8>,
}

// Hand-written so that a stray `{:?}` can never print secret values.
impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor").field("secrets", &self.secrets.len()).finish_non_exhaustive()
    }
}

impl Redactor {
    /// A redactor for these `(name, value)` pairs; empty values are ignored.
    pub fn new(secrets: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut list: Vec<(Vec<u8>, String)> = secrets
            .into_iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| (value.into_bytes(), format!("<secret:{name}>")))
            .collect();
        // Longest first; ties broken by value then marker so the choice is deterministic.
        list.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.cmp(b)));
        // Two names for one value: keep one marker (the first after sorting).
        list.dedup_by(|later, earlier| later.0 == earlier.0);
        Redactor { secrets: list, pending: Vec::new(), undecoded: Vec::new() }
    }

    /// Feeds bytes; returns the redacted text that is safe to emit now.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.step(false)
    }

    /// Whether bytes are held back (a possible start of a secret, or of a UTF-8 character)
    /// waiting for more input or [`Redactor::finish`].
    pub fn holds_back(&self) -> bool {
        !self.pending.is_empty() || !self.undecoded.is_empty()
    }

    /// Flushes everything held back (end of stream).
    pub fn finish(&mut self) -> String {
        self.step(true)
    }

    fn step(&mut self, last: bool) -> String {
        let consumed = self.match_pending(last);
        self.pending.drain(..consumed);
        self.decode(last)
    }

    /// Moves decided bytes of `pending` (with secrets replaced) into `undecoded`; returns how
    /// many bytes of `pending` were consumed.
    fn match_pending(&mut self, last: bool) -> usize {
        let buf = &self.pending;
        let mut i = 0;
        let mut plain_start = 0;
        while i < buf.len() {
            let rest = &buf[i..];
            // A longer secret might still match once more bytes arrive: decide later.
            if !last && self.secrets.iter().any(|(v, _)| v.len() > rest.len() && v.starts_with(rest)) {
                break;
            }
            match self.secrets.iter().find(|(v, _)| rest.starts_with(v)) {
                Some((value, marker)) => {
                    self.undecoded.extend_from_slice(&buf[plain_start..i]);
                    self.undecoded.extend_from_slice(marker.as_bytes());
                    i += value.len();
                    plain_start = i;
                }
                None => i += 1,
            }
        }
        self.undecoded.extend_from_slice(&buf[plain_start..i]);
        i
    }

    /// Decodes `undecoded` as UTF-8, keeping an incomplete trailing sequence unless `last`.
    fn decode(&mut self, last: bool) -> String {
        let mut out = String::with_capacity(self.undecoded.len());
        let mut rest: &[u8] = &self.undecoded;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid_up_to` marks a valid prefix, so this always succeeds.
                    if let Ok(v) = std::str::from_utf8(valid) {
                        out.push_str(v);
                    }
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n.min(after.len())..];
                        }
                        None if last => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &[];
                            break;
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let total = self.undecoded.len();
        self.undecoded.drain(..total - keep);
        out
    }
}

/// Redacts `text` in one go (see [`Redactor`]).
pub fn redact_str(secrets: &[(String, String)], text: &str) -> String {
    let mut r = Redactor::new(secrets.iter().cloned());
    let mut out = r.push(text.as_bytes());
    out.push_str(&r.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(name: &str, value: &str) -> (String, String) {
        (name.to_string(), value.to_string())
    }

    fn feed(r: &mut Redactor, chunks: &[&[u8]]) -> String {
        let mut out = String::new();
        for c in chunks {
            out.push_str(&r.push(c));
        }
        out.push_str(&r.finish());
        out
    }

    #[test]
    fn whole_secret_is_replaced() {
        let secrets = [s("TOKEN", "hunter2")];
        assert_eq!(redact_str(&secrets, "pw=hunter2 and hunter2!"), "pw=<secret:TOKEN> and <secret:TOKEN>!");
    }

    #[test]
    fn split_secret_is_held_back_then_replaced() {
        let mut r = Redactor::new([s("K", "abcdef")]);
        assert_eq!(r.push(b"x abc"), "x ");
        assert_eq!(r.push(b"de"), "");
        assert_eq!(r.push(b"f\n"), "<secret:K>\n");
        assert_eq!(r.finish(), "");
    }

    #[test]
    fn false_prefix_is_released() {
        let mut r = Redactor::new([s("K", "abcdef")]);
        assert_eq!(r.push(b"abc"), "");
        assert_eq!(r.push(b"X"), "abcX");
        assert_eq!(r.push(b"ab"), "");
        assert_eq!(r.finish(), "ab");
    }

    #[test]
    fn longer_secret_wins() {
        let secrets = [s("SHORT", "abc"), s("LONG", "abcdef")];
        assert_eq!(redact_str(&secrets, "abcdef abcde"), "<secret:LONG> <secret:SHORT>de");
        let mut r = Redactor::new(secrets.iter().cloned());
        assert_eq!(feed(&mut r, &[b"ab", b"cde", b"f"]), "<secret:LONG>");
    }

    #[test]
    fn empty_secret_ignored() {
        let secrets = [s("EMPTY", ""), s("X", "zz")];
        assert_eq!(redact_str(&secrets, "a zz b"), "a <secret:X> b");
        assert_eq!(redact_str(&[s("EMPTY", "")], "abc"), "abc");
    }

    #[test]
    fn utf8_split_is_not_cut() {
        let mut r = Redactor::new(Vec::<(String, String)>::new());
        let bytes = "é€".as_bytes();
        assert_eq!(r.push(&bytes[..1]), "");
        assert_eq!(r.push(&bytes[1..3]), "é");
        assert_eq!(r.push(&bytes[3..]), "€");
        assert_eq!(r.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement() {
        let mut r = Redactor::new(Vec::<(String, String)>::new());
        assert_eq!(feed(&mut r, &[b"a\xffb", b"\xe2\x82"]), "a\u{FFFD}b\u{FFFD}");
    }

    #[test]
    fn unicode_secret() {
        let secrets = [s("U", "pässwörd")];
        let bytes = "x pässwörd y".as_bytes();
        for cut in 0..bytes.len() {
            let mut r = Redactor::new(secrets.iter().cloned());
            assert_eq!(feed(&mut r, &[&bytes[..cut], &bytes[cut..]]), "x <secret:U> y");
        }
    }

    #[test]
    fn debug_hides_values() {
        let r = Redactor::new([s("K", "topsecret")]);
        assert!(!format!("{r:?}").contains("topsecret"));
    }

    /// Secret values are drawn from characters that never occur in a `<secret:NAME>` marker, so
    /// a marker can never form a secret by itself.
    fn secret_value() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop::sample::select(vec!['X', 'Y', 'Z', '0', '1', 'é', '€']), 1..6)
            .prop_map(|v| v.into_iter().collect())
    }

    fn text_piece(secrets: Vec<String>) -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::collection::vec(
                prop::sample::select(vec!['a', 'X', 'Y', 'Z', '0', '1', 'é', '€', '\n', ' ']),
                0..4
            )
            .prop_map(|v| v.into_iter().collect::<String>()),
            prop::sample::select(secrets),
        ]
    }

    fn case() -> impl Strategy<Value = (Vec<(String, String)>, String, Vec<usize>)> {
        proptest::collection::vec(secret_value(), 1..4).prop_flat_map(|values| {
            let secrets: Vec<(String, String)> = values
                .iter()
                .enumerate()
                .map(|(i, v)| (["pa", "pb", "pc", "pd"][i % 4].to_string(), v.clone()))
                .collect();
            let text = proptest::collection::vec(text_piece(values), 0..12).prop_map(|pieces| pieces.concat());
            let cuts = proptest::collection::vec(0usize..64, 0..8);
            (Just(secrets), text, cuts)
        })
    }

    proptest! {
        #[test]
        fn any_split_gives_same_output_without_secrets((secrets, text, mut cuts) in case()) {
            let whole = redact_str(&secrets, &text);
            let bytes = text.as_bytes();
            cuts.iter_mut().for_each(|c| *c = (*c).min(bytes.len()));
            cuts.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            for &c in &cuts {
                chunks.push(&bytes[start..c]);
                start = c;
            }
            chunks.push(&bytes[start..]);
            let mut r = Redactor::new(secrets.iter().cloned());
            let split = feed(&mut r, &chunks);
            prop_assert_eq!(&split, &whole);
            for (_, value) in &secrets {
                prop_assert!(!whole.contains(value.as_str()), "{:?} leaked in {:?}", value, whole);
            }
        }

        #[test]
        fn arbitrary_bytes_split_like_lossy(bytes in proptest::collection::vec(any::<u8>(), 0..40), cut in 0usize..40) {
            let cut = cut.min(bytes.len());
            let mut r = Redactor::new(Vec::<(String, String)>::new());
            let out = feed(&mut r, &[&bytes[..cut], &bytes[cut..]]);
            prop_assert_eq!(out, String::from_utf8_lossy(&bytes).into_owned());
        }
    }
}
