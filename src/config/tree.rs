//! A small spanned TOML tree and typed accessors that produce located errors.
//!
//! We walk our own tree instead of deriving serde types so that every error (unknown key, wrong
//! type, missing key) carries the exact span and a hint, and so implicit tables such as
//! `[pool.small]` (which have no span of their own) still get a position.

use std::ops::Range;
use std::time::Duration;

use super::duration::{parse_duration, ACCEPTED_UNITS};
use super::error::Diag;

/// The largest amount of money a setting may hold (an hourly price, a cap).
const MAX_DOLLARS: f64 = 1_000_000.0;

/// A value with the byte span it came from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sp<T> {
    pub v: T,
    pub span: Range<usize>,
}

/// The shape of a TOML value.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime,
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

/// A TOML value and where it is.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub span: Range<usize>,
    pub kind: Kind,
}

/// A key/value pair of a table, with the key's own span for unknown-key errors.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_span: Range<usize>,
    pub value: Node,
}

/// Parse TOML text into our tree; syntax errors become a located diagnostic.
pub(crate) fn parse_tree(text: &str) -> Result<Vec<Entry>, Diag> {
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        Diag::new(span, format!("invalid TOML: {}", e.message().trim())).hint("see https://toml.io for the syntax")
    })?;
    Ok(table_entries(doc.as_table(), 0..0))
}

fn table_entries(t: &toml_edit::Table, fallback: Range<usize>) -> Vec<Entry> {
    t.iter()
        .map(|(k, item)| {
            let key_span = t.key(k).and_then(|key| key.span()).unwrap_or_else(|| fallback.clone());
            Entry { key: k.to_string(), value: from_item(item, key_span.clone()), key_span }
        })
        .collect()
}

fn inline_entries(t: &toml_edit::InlineTable, fallback: Range<usize>) -> Vec<Entry> {
    t.iter()
        .map(|(k, v)| {
            let key_span = t.key(k).and_then(|key| key.span()).unwrap_or_else(|| fallback.clone());
            Entry { key: k.to_string(), value: from_value(v, key_span.clone()), key_span }
        })
        .collect()
}

fn from_item(item: &toml_edit::Item, fallback: Range<usize>) -> Node {
    match item {
        toml_edit::Item::Value(v) => from_value(v, fallback),
        toml_edit::Item::Table(t) => {
            let span = t.span().unwrap_or_else(|| fallback.clone());
            Node { kind: Kind::Table(table_entries(t, span.clone())), span }
        }
        toml_edit::Item::ArrayOfTables(a) => {
            let span = a.span().unwrap_or_else(|| fallback.clone());
            let items: Vec<Node> = a
                .iter()
                .map(|t| {
                    let ts = t.span().unwrap_or_else(|| span.clone());
                    Node { kind: Kind::Table(table_entries(t, ts.clone())), span: ts }
                })
                .collect();
            // The first table header is a better anchor than the whole array.
            let span = items.first().map(|n: &Node| n.span.clone()).unwrap_or(span);
            Node { kind: Kind::Array(items), span }
        }
        toml_edit::Item::None => Node { kind: Kind::Table(Vec::new()), span: fallback },
    }
}

fn from_value(v: &toml_edit::Value, fallback: Range<usize>) -> Node {
    let span = v.span().unwrap_or_else(|| fallback.clone());
    let kind = match v {
        toml_edit::Value::String(s) => Kind::Str(s.value().clone()),
        toml_edit::Value::Integer(i) => Kind::Int(*i.value()),
        toml_edit::Value::Float(f) => Kind::Float(*f.value()),
        toml_edit::Value::Boolean(b) => Kind::Bool(*b.value()),
        toml_edit::Value::Datetime(_) => Kind::Datetime,
        toml_edit::Value::Array(a) => Kind::Array(a.iter().map(|x| from_value(x, span.clone())).collect()),
        toml_edit::Value::InlineTable(t) => Kind::Table(inline_entries(t, span.clone())),
    };
    Node { span, kind }
}

impl Entry {
    /// The same entry with every span moved `by` bytes later (an override's line, placed
    /// after the file's text).
    pub fn shifted(mut self, by: usize) -> Entry {
        self.key_span = shift(&self.key_span, by);
        self.value.shift(by);
        self
    }
}

fn shift(r: &Range<usize>, by: usize) -> Range<usize> {
    r.start + by..r.end + by
}

impl Node {
    fn shift(&mut self, by: usize) {
        self.span = shift(&self.span, by);
        match &mut self.kind {
            Kind::Array(items) => items.iter_mut().for_each(|n| n.shift(by)),
            Kind::Table(entries) => {
                for e in entries {
                    e.key_span = shift(&e.key_span, by);
                    e.value.shift(by);
                }
            }
            _ => {}
        }
    }

    /// The TOML type name, for "must be a string, not an integer" messages.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Str(_) => "a string",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a float",
            Kind::Bool(_) => "a boolean",
            Kind::Datetime => "a datetime",
            Kind::Array(_) => "an array",
            Kind::Table(_) => "a table",
        }
    }

    fn wrong_type(&self, what: &str, expected: &str) -> Diag {
        Diag::new(self.span.clone(), format!("{what} must be {expected}, not {}", self.type_name()))
    }

    /// This value as a string.
    pub fn str(&self, what: &str) -> Result<Sp<String>, Diag> {
        match &self.kind {
            Kind::Str(s) => Ok(Sp { v: s.clone(), span: self.span.clone() }),
            _ => Err(self.wrong_type(what, "a string").hint("quote the value: \"...\"")),
        }
    }

    /// This value as an array of strings.
    pub fn str_array(&self, what: &str) -> Result<Vec<Sp<String>>, Diag> {
        match &self.kind {
            Kind::Array(items) => items.iter().map(|n| n.str(&format!("each item of {what}"))).collect(),
            _ => Err(self.wrong_type(what, "an array of strings").hint("write it as [\"a\", \"b\"]")),
        }
    }

    /// An amount of money (USD): a number, finite and not negative.
    pub fn money(&self, what: &str) -> Result<Sp<f64>, Diag> {
        let v = match self.kind {
            Kind::Int(i) => i as f64,
            Kind::Float(f) => f,
            _ => return Err(self.wrong_type(what, "a number").hint("amounts are US dollars, e.g. 0.0208 or 50")),
        };
        if !v.is_finite() || v < 0.0 {
            return Err(Diag::new(
                self.span.clone(),
                format!("{what} must be a number of dollars, 0 or more, not {v}"),
            ));
        }
        // Sums of many such amounts must stay finite.
        if v > MAX_DOLLARS {
            return Err(Diag::new(self.span.clone(), format!("{what} must be at most {MAX_DOLLARS} dollars, not {v}")));
        }
        Ok(Sp { v, span: self.span.clone() })
    }

    /// This value as a table's entries.
    pub fn table(&self, what: &str) -> Result<&[Entry], Diag> {
        match &self.kind {
            Kind::Table(e) => Ok(e),
            _ => Err(self.wrong_type(what, "a table")),
        }
    }

    /// This value as an array.
    pub fn array(&self, what: &str) -> Result<&[Node], Diag> {
        match &self.kind {
            Kind::Array(a) => Ok(a),
            _ => Err(self.wrong_type(what, "an array")),
        }
    }
}

/// A table being read: checks for unknown and missing keys, typed getters.
pub(crate) struct Fields<'a> {
    /// How the table is named in messages, e.g. `[[builder]]` or `[pool.small]`.
    pub what: String,
    /// Span of the table (its header), for missing-key errors.
    pub span: Range<usize>,
    pub entries: &'a [Entry],
}

impl<'a> Fields<'a> {
    /// Read `node` as a table named `what` in messages.
    pub fn new(node: &'a Node, what: impl Into<String>) -> Result<Self, Diag> {
        let what = what.into();
        let entries = node.table(&what)?;
        Ok(Fields { what, span: node.span.clone(), entries })
    }

    /// Reject the first key (in file order) not in `allowed`.
    pub fn allow_only(&self, allowed: &[&str]) -> Result<(), Diag> {
        for e in self.entries {
            if !allowed.contains(&e.key.as_str()) {
                return Err(unknown_key(&e.key, e.key_span.clone(), &self.what, allowed));
            }
        }
        Ok(())
    }

    /// The entry for `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'a Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    fn missing(&self, key: &str, example: &str) -> Diag {
        Diag::new(self.span.clone(), format!("missing required key `{key}` in {}", self.what))
            .hint(format!("add `{key} = {example}`"))
    }

    /// A required string.
    pub fn req_str(&self, key: &str, example: &str) -> Result<Sp<String>, Diag> {
        match self.get(key) {
            Some(e) => e.value.str(&format!("`{key}`")),
            None => Err(self.missing(key, example)),
        }
    }

    /// A required, non-empty string.
    pub fn req_nonempty(&self, key: &str, example: &str) -> Result<Sp<String>, Diag> {
        let s = self.req_str(key, example)?;
        if s.v.trim().is_empty() {
            return Err(Diag::new(s.span, format!("`{key}` must not be empty")));
        }
        Ok(s)
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<Sp<String>>, Diag> {
        self.get(key).map(|e| e.value.str(&format!("`{key}`"))).transpose()
    }

    /// An optional array of strings.
    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<Sp<String>>>, Diag> {
        self.get(key).map(|e| e.value.str_array(&format!("`{key}`"))).transpose()
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, Diag> {
        match self.get(key) {
            None => Ok(None),
            Some(e) => match e.value.kind {
                Kind::Bool(b) => Ok(Some(b)),
                _ => Err(e.value.wrong_type(&format!("`{key}`"), "a boolean").hint("use true or false (unquoted)")),
            },
        }
    }

    /// An optional non-negative integer that fits in u32.
    pub fn opt_u32(&self, key: &str) -> Result<Option<Sp<u32>>, Diag> {
        match self.get(key) {
            None => Ok(None),
            Some(e) => match e.value.kind {
                Kind::Int(i) => u32::try_from(i).map(|v| Some(Sp { v, span: e.value.span.clone() })).map_err(|_| {
                    Diag::new(e.value.span.clone(), format!("`{key}` must be between 0 and {}, not {i}", u32::MAX))
                }),
                _ => Err(e
                    .value
                    .wrong_type(&format!("`{key}`"), "an integer")
                    .hint(format!("write a bare number, e.g. `{key} = 4`"))),
            },
        }
    }

    /// An optional amount of money (USD, integer or float, finite and not negative).
    pub fn opt_money(&self, key: &str) -> Result<Option<Sp<f64>>, Diag> {
        match self.get(key) {
            None => Ok(None),
            Some(e) => e.value.money(&format!("`{key}`")).map(Some),
        }
    }

    /// An optional duration string like `"10m"`.
    pub fn opt_duration(&self, key: &str) -> Result<Option<Duration>, Diag> {
        match self.get(key) {
            None => Ok(None),
            Some(e) => {
                let s = e
                    .value
                    .str(&format!("`{key}`"))
                    .map_err(|d| d.hint(format!("durations are strings; {ACCEPTED_UNITS}")))?;
                parse_duration(&s.v).map(Some).map_err(|msg| {
                    let (msg, _) = msg.split_once("; accepted").unwrap_or((&msg, ""));
                    Diag::new(s.span, format!("`{key}`: {msg}")).hint(ACCEPTED_UNITS)
                })
            }
        }
    }
}

/// An "unknown key" error with a did-you-mean and the list of valid keys.
pub(crate) fn unknown_key(key: &str, span: Range<usize>, what: &str, allowed: &[&str]) -> Diag {
    let mut hint = String::new();
    if let Some(best) = closest(key, allowed) {
        hint.push_str(&format!("did you mean `{best}`? "));
    }
    hint.push_str(&format!("valid keys: {}", allowed.join(", ")));
    Diag::new(span, format!("unknown key `{key}` in {what}")).hint(hint)
}

/// The candidate within a small edit distance of `word`, for did-you-mean hints.
pub(crate) fn closest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean() {
        assert_eq!(closest("reop", &["repo", "pool"]), Some("repo"));
        assert_eq!(closest("zzzzzz", &["repo", "pool"]), None);
    }
}
