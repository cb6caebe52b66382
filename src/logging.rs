//! The process's own log on stderr: text for people or JSON for log shippers, colour only on a
//! terminal, a default filter that keeps chatty dependencies quiet, and text fields whose control
//! characters are escaped so no branch name or commit message can forge a line.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::{Directive, EnvFilter, LevelFilter};
use tracing_subscriber::fmt::format::{FormatFields, Writer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event for people: time, level, target, message and `key=value` fields.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `span`, `spans`).
    Json,
}

impl LogFormat {
    /// The names accepted in the config and on the command line.
    pub const NAMES: &'static [&'static str] = &["text", "json"];

    /// The format called `name` (as written in the config), if any.
    pub fn from_name(name: &str) -> Option<LogFormat> {
        match name {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// What runs when `RUST_LOG` is unset or empty.
const DEFAULT_DIRECTIVES: &str = "info,tower_http=warn";

/// The most verbose level of dependencies whose debug output is a flood or a leak: the AWS SDK
/// prints whole requests (user-data carrying machine tokens) and signing material, the HTTP and
/// TLS stacks a line per frame. A cap applies unless `RUST_LOG` names its target (or a prefix
/// of it); a directive for a deeper target (`aws_smithy_runtime=debug`) is more specific than
/// the cap and wins for that target alone. Targets match by prefix, as in `EnvFilter`.
const CAPS: &[(&str, LevelFilter)] = &[
    ("aws_smithy", LevelFilter::WARN),
    ("aws_sigv4", LevelFilter::WARN),
    ("aws_runtime", LevelFilter::WARN),
    ("aws_config", LevelFilter::INFO),
    ("aws_sdk", LevelFilter::INFO),
    ("hyper", LevelFilter::WARN),
    ("h2", LevelFilter::WARN),
    ("rustls", LevelFilter::WARN),
];

/// `RUST_LOG` could not be read as filter directives.
#[derive(Debug, thiserror::Error)]
#[error("RUST_LOG is not a valid filter ({0}); using the default")]
pub struct BadRustLog(String);

/// The filter for `RUST_LOG`'s value (`None` or empty: the default), with the [`CAPS`] it does
/// not name added.
pub fn filter(rust_log: Option<&str>) -> Result<EnvFilter, BadRustLog> {
    let given = rust_log.map(str::trim).filter(|s| !s.is_empty());
    let mut filter = match given {
        Some(dirs) => EnvFilter::builder().parse(dirs).map_err(|e| BadRustLog(e.to_string()))?,
        None => EnvFilter::builder().parse_lossy(DEFAULT_DIRECTIVES),
    };
    let named = given.map(named_targets).unwrap_or_default();
    for (target, level) in CAPS {
        if named.iter().any(|n| target.starts_with(n)) {
            continue;
        }
        if let Ok(d) = format!("{target}={level}").parse::<Directive>() {
            filter = filter.add_directive(d);
        }
    }
    Ok(filter)
}

/// The targets that `RUST_LOG`-style directives name (`target[span{field}]=level` or a bare
/// `target`); a bare level names none.
fn named_targets(dirs: &str) -> Vec<&str> {
    dirs.split(',')
        .filter_map(|d| {
            let head = d.split('=').next().unwrap_or("");
            let target = head.split('[').next().unwrap_or("").trim();
            (!target.is_empty() && target.parse::<LevelFilter>().is_err()).then_some(target)
        })
        .collect()
}

/// Whether to write ANSI colour codes: only to a terminal, and not when `NO_COLOR` is set to
/// anything non-empty (no-color.org).
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Starts logging to stderr in `format`, filtered by `RUST_LOG` (see [`filter`]). Does nothing
/// if a subscriber is already set.
pub fn init(format: LogFormat) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, bad) = match filter(rust_log.as_deref()) {
        Ok(f) => (f, None),
        Err(e) => (filter(None).unwrap_or_else(|_| EnvFilter::new(DEFAULT_DIRECTIVES)), Some(e)),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => {
            let colour = use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
            builder.with_ansi(colour).fmt_fields(EscapedFields).try_init()
        }
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    if installed.is_ok() {
        if let Some(e) = bad {
            tracing::warn!("{e}");
        }
    }
}

/// Formats the fields of text log lines as `message key=value …` like tracing-subscriber's
/// default, with every control character in names and values escaped (`\n`, `\r`, `\x1b`, …),
/// so a value can neither end the line nor drive the terminal.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor { writer, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes each field it visits through [`escape_into`].
struct EscapingVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // As tracing-subscriber does: a message as written, other strings quoted.
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.record_debug(field, &format_args!("{text}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        // Metadata of `log` records, already shown as the line's target.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        self.result = self.write(name, value);
    }
}

impl EscapingVisitor<'_> {
    fn write(&mut self, name: &str, value: &dyn fmt::Debug) -> fmt::Result {
        if !self.first {
            self.writer.write_char(' ')?;
        }
        self.first = false;
        if name != "message" {
            escape_into(&mut self.writer, name.strip_prefix("r#").unwrap_or(name))?;
            self.writer.write_char('=')?;
        }
        escape_into(&mut self.writer, &format!("{value:?}"))
    }
}

/// Writes `text` with control characters (C0, DEL, C1) and the Unicode line and paragraph
/// separators escaped; everything else as it is.
pub fn escape_into(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    for c in text.chars() {
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if c.is_ascii_control() => write!(out, "\\x{:02x}", c as u32)?,
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => write!(out, "\\u{{{:x}}}", c as u32)?,
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::{Level, Metadata, Subscriber};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    struct Site;
    static SITE: Site = Site;
    impl tracing::callsite::Callsite for Site {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unreachable!("only the filter reads these events' metadata")
        }
    }

    /// Whether `filter` lets an event of `target` at `level` through.
    fn lets_through(filter: EnvFilter, target: &'static str, level: Level) -> bool {
        let meta = Metadata::new(
            "event",
            target,
            level,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&SITE)),
            tracing::metadata::Kind::EVENT,
        );
        tracing_subscriber::registry().with(filter).enabled(&meta)
    }

    fn pass(rust_log: Option<&str>, target: &'static str, level: Level) -> bool {
        lets_through(filter(rust_log).expect("valid"), target, level)
    }

    #[test]
    fn the_default_keeps_the_sdk_quiet_and_paddock_at_info() {
        for target in [
            "aws_smithy_runtime::client::orchestrator",
            "aws_smithy_http_client::hyper_legacy",
            "aws_sigv4::http_request::sign",
            "aws_runtime::user_agent",
            "aws_config::imds",
            "aws_sdk_ec2::operation",
            "hyper_util::client",
            "h2::codec",
            "rustls::client::hs",
        ] {
            assert!(!pass(None, target, Level::DEBUG), "{target} at debug");
        }
        assert!(!pass(None, "aws_smithy_runtime::client", Level::INFO));
        assert!(pass(None, "aws_smithy_runtime::client", Level::WARN));
        assert!(pass(None, "aws_config::imds", Level::INFO));
        assert!(pass(None, "paddock::runtime", Level::INFO));
        assert!(!pass(None, "paddock::runtime", Level::DEBUG));
        // Empty is unset.
        assert!(!pass(Some(" "), "aws_smithy_runtime::client", Level::DEBUG));
        assert!(pass(Some(""), "paddock::web", Level::INFO));
    }

    #[test]
    fn rust_log_wins_for_the_targets_it_names_and_the_caps_hold_elsewhere() {
        // A blanket level does not dump SDK requests.
        assert!(pass(Some("debug"), "paddock::runtime", Level::DEBUG));
        assert!(!pass(Some("debug"), "aws_smithy_runtime::client", Level::DEBUG));
        assert!(!pass(Some("trace"), "aws_sigv4::sign", Level::DEBUG));
        assert!(pass(Some("debug"), "paddock::store", Level::DEBUG), "Paddock's own targets are not capped");
        // A named SDK target gets what it asks for; its siblings stay capped.
        let dirs = Some("info,aws_smithy_runtime=debug");
        assert!(pass(dirs, "aws_smithy_runtime::client::orchestrator", Level::DEBUG));
        assert!(!pass(dirs, "aws_smithy_http_client::hyper", Level::DEBUG));
        assert!(!pass(dirs, "paddock::runtime", Level::DEBUG));
        // Naming the cap's own target, or a prefix of it, lifts that cap.
        assert!(pass(Some("aws_smithy=trace"), "aws_smithy_http_client::x", Level::TRACE));
        assert!(pass(Some("warn,aws=debug"), "aws_sigv4::sign", Level::DEBUG));
        assert!(!pass(Some("warn,aws=debug"), "hyper::proto", Level::DEBUG));
        // Quieter is fine too.
        assert!(!pass(Some("info,hyper=off"), "hyper::proto", Level::WARN));
        assert!(!pass(Some("error"), "paddock::runtime", Level::WARN));
        // A bare target is that target at trace.
        assert!(pass(Some("rustls"), "rustls::conn", Level::TRACE));
        assert!(filter(Some("info,a=loud")).is_err());
    }

    #[test]
    fn named_targets_ignore_levels_and_spans() {
        assert_eq!(named_targets("debug,a=info,b[s{f=1}]=trace,[s]=debug,c, 5 ,OFF"), vec!["a", "b", "c"]);
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some(OsStr::new(""))));
    }

    /// The text format's output of `f`'s events, as the master writes it (without colour).
    fn text_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn text_fields_cannot_forge_lines_or_drive_the_terminal() {
        let branch = "main\n2026-01-01T00:00:00Z  INFO paddock: forged\x1b[2J";
        let out = text_of(|| {
            let message = "commit\r\nmessage";
            tracing::info!(branch = %branch, quoted = branch, debug = ?branch, n = 3, "pushed {message}\u{85}\u{2028}");
            let span = tracing::info_span!("poll", repo = %"a\nb");
            let _g = span.enter();
            tracing::warn!("inside");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out:?}");
        assert!(!out.contains('\x1b') && !out.contains('\r') && !out.contains('\u{85}'), "{out:?}");
        assert!(lines[0].contains(r"pushed commit\r\nmessage\u{85}\u{2028}"), "{}", lines[0]);
        assert!(lines[0].contains(r"branch=main\n2026-01-01T00:00:00Z  INFO paddock: forged\x1b[2J"), "{}", lines[0]);
        assert!(lines[0].contains(r#"quoted="main\n2026"#), "{}", lines[0]);
        assert!(lines[0].contains(r#"debug="main\n2026"#) && lines[0].ends_with(" n=3"), "{}", lines[0]);
        assert!(lines[1].contains(r"poll{repo=a\nb}") && lines[1].ends_with("inside"), "{}", lines[1]);
    }

    #[test]
    fn escaping_leaves_ordinary_text_alone() {
        let mut s = String::new();
        escape_into(&mut s, "ünïcødé \\n stays, tab\there, bell\x07, del\x7f").expect("write");
        assert_eq!(s, r"ünïcødé \n stays, tab\there, bell\x07, del\x7f");
    }

    #[test]
    fn format_names() {
        assert_eq!(LogFormat::from_name("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::from_name("text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::from_name("JSON"), None);
        assert_eq!(LogFormat::default(), LogFormat::Text);
    }
}
