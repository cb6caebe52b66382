//! The user-data an EC2 machine boots with: `images/cloud-init.yaml` with its placeholders
//! filled, and `images/bootstrap.sh` inlined as the script it runs.
//!
//! The values come from config and the store, not from a trusted constant, so each is quoted
//! twice: single-quoted for the shell that sources the env file, then escaped as part of the
//! double-quoted YAML scalar that carries the file. Neither layer can be ended early by a value.

use std::fmt;

const TEMPLATE: &str = include_str!("../../../images/cloud-init.yaml");
const BOOTSTRAP: &str = include_str!("../../../images/bootstrap.sh");

/// The template line that stands for the bootstrap script, indented as the script must be.
const BOOTSTRAP_PLACEHOLDER: &str = "@@BOOTSTRAP_SH@@";

/// What the user-data carries into the machine.
#[derive(Clone, Copy)]
pub struct BootVars<'a> {
    /// URL the agent connects back to and downloads itself from.
    pub master_url: &'a str,
    /// The machine's one-time token. Never log it.
    pub token: &'a str,
    /// The machine's id in the store.
    pub machine_id: i64,
    /// The pool the machine was launched for.
    pub pool: &'a str,
    /// The Paddock cluster (one master and its store) the machine belongs to.
    pub cluster: &'a str,
    /// The instance metadata service the agent polls for spot notices.
    pub imds_url: &'a str,
}

impl fmt::Debug for BootVars<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootVars")
            .field("master_url", &self.master_url)
            .field("token", &"<redacted>")
            .field("machine_id", &self.machine_id)
            .field("pool", &self.pool)
            .field("cluster", &self.cluster)
            .field("imds_url", &self.imds_url)
            .finish()
    }
}

/// The `#cloud-config` user-data for one machine (never log it: it carries the token).
pub fn render(vars: &BootVars<'_>) -> String {
    let machine_id = vars.machine_id.to_string();
    let value = |name: &str| -> Option<&str> {
        Some(match name {
            "MASTER_URL" => vars.master_url,
            "TOKEN" => vars.token,
            "MACHINE_ID" => &machine_id,
            "POOL" => vars.pool,
            "CLUSTER" => vars.cluster,
            "IMDS_URL" => vars.imds_url,
            _ => return None,
        })
    };
    let mut out = String::with_capacity(TEMPLATE.len() + BOOTSTRAP.len() * 2);
    for line in TEMPLATE.lines() {
        let body = line.trim_start();
        if body == BOOTSTRAP_PLACEHOLDER {
            // A literal block scalar: the script goes in verbatim, each line at the
            // placeholder's indentation, and YAML keeps every character of it.
            let indent = &line[..line.len() - body.len()];
            for script_line in BOOTSTRAP.lines() {
                if !script_line.is_empty() {
                    out.push_str(indent);
                    out.push_str(script_line);
                }
                out.push('\n');
            }
            continue;
        }
        substitute(line, &value, &mut out);
        out.push('\n');
    }
    out
}

/// Replaces each known `@@NAME@@` of `line` in one pass, so a value that itself contains a
/// placeholder is never expanded.
fn substitute<'v>(line: &str, value: &impl Fn(&str) -> Option<&'v str>, out: &mut String) {
    let mut rest = line;
    while let Some(start) = rest.find("@@") {
        let after = &rest[start + 2..];
        let Some(len) = after.find("@@") else { break };
        let name = &after[..len];
        match value(name) {
            Some(v) => {
                out.push_str(&rest[..start]);
                out.push_str(&yaml_double_quoted_body(&shell_single_quoted(v)));
                rest = &after[len + 2..];
            }
            None => {
                out.push_str(&rest[..start + 2]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
}

/// `s` as one POSIX shell word that expands to exactly `s`.
fn shell_single_quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `s` escaped for the inside of a YAML double-quoted scalar. Anything a YAML 1.1 reader (what
/// cloud-init uses) would take as a line break, or reject as unprintable, becomes an escape, so
/// the scalar stays on its line and reads back as exactly `s`.
fn yaml_double_quoted_body(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '"' => out.push_str("\\\""),
            ' '..='~' => out.push(c),
            '\u{a0}'..='\u{2027}'
            | '\u{202a}'..='\u{d7ff}'
            | '\u{e000}'..='\u{fefe}'
            | '\u{ff00}'..='\u{fffd}'
            | '\u{10000}'..='\u{10ffff}' => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{:04x}", c as u32)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(master_url: &'a str, token: &'a str) -> BootVars<'a> {
        BootVars {
            master_url,
            token,
            machine_id: 42,
            pool: "linux",
            cluster: "prod",
            imds_url: "http://169.254.169.254",
        }
    }

    #[test]
    fn renders_a_cloud_config_with_every_placeholder_filled() {
        let text = render(&vars("https://ci.example.com", "tok3n-abc"));
        assert!(text.starts_with("#cloud-config\n"), "cloud-init only reads user-data with this header");
        assert!(!text.contains("@@"), "a placeholder was left:\n{text}");
        assert!(text.contains("PADDOCK_MASTER_URL='https://ci.example.com'\\n\\"));
        assert!(text.contains("PADDOCK_MACHINE_ID='42'\\n\\"));
        assert!(text.contains("PADDOCK_POOL='linux'\\n\\"));
        assert!(text.contains("PADDOCK_CLUSTER='prod'\\n\\"));
        assert!(text.contains("PADDOCK_IMDS_URL='http://169.254.169.254'\\n\""));
    }

    #[test]
    fn fits_in_ec2s_user_data_limit() {
        // EC2 refuses more than 16 KiB of user-data (counted before base64).
        let text = render(&vars(&"u".repeat(200), &"t".repeat(200)));
        assert!(text.len() < 16 * 1024, "{} bytes", text.len());
    }

    #[test]
    fn the_token_appears_once_on_the_env_file_line() {
        let text = render(&vars("https://ci.example.com", "s3cr3t-t0ken"));
        assert_eq!(text.matches("s3cr3t-t0ken").count(), 1);
        let line = text.lines().find(|l| l.contains("s3cr3t-t0ken")).expect("token line");
        assert_eq!(line.trim_start(), "PADDOCK_AGENT_TOKEN='s3cr3t-t0ken'\\n\\");
    }

    #[test]
    fn the_bootstrap_script_is_inlined_verbatim_under_its_path() {
        let text = render(&vars("https://ci.example.com", "t"));
        let at = text.find("path: /usr/local/sbin/paddock-bootstrap").expect("script entry");
        let block = &text[at..];
        let indent = "      ";
        for line in BOOTSTRAP.lines().filter(|l| !l.is_empty()) {
            assert!(block.contains(&format!("\n{indent}{line}\n")), "line missing or misindented: {line}");
        }
    }

    #[test]
    fn odd_characters_cannot_leave_their_line() {
        let plain = render(&vars("https://ci.example.com", "t"));
        let odd_url = "http://x/'\"\\$(reboot)`id`;\n#\u{85}\u{2028}x: @@TOKEN@@\t\u{7f}";
        let odd = render(&vars(odd_url, "t"));
        assert_eq!(plain.lines().count(), odd.lines().count(), "a value added a line:\n{odd}");
        assert_eq!(odd.matches("'t'").count(), 1, "a placeholder inside a value was expanded");
        let line = odd.lines().find(|l| l.contains("PADDOCK_MASTER_URL=")).expect("url line");
        assert_eq!(
            line.trim_start(),
            "PADDOCK_MASTER_URL='http://x/'\\\\''\\\"\\\\$(reboot)`id`;\\x0a#\\x85\\u2028x: @@TOKEN@@\\x09\\x7f'\\n\\"
        );
    }

    #[test]
    fn shell_quoting_keeps_quotes_inert() {
        assert_eq!(shell_single_quoted("a'b"), r"'a'\''b'");
        assert_eq!(shell_single_quoted(""), "''");
        assert_eq!(shell_single_quoted("$(x) `y` \\"), r"'$(x) `y` \'");
    }

    #[test]
    fn yaml_escaping_keeps_printable_text_and_escapes_the_rest() {
        assert_eq!(yaml_double_quoted_body("café ✓"), "café ✓");
        assert_eq!(yaml_double_quoted_body("a\"b\\c"), "a\\\"b\\\\c");
        assert_eq!(yaml_double_quoted_body("\r\n\u{0}\u{feff}\u{fffe}"), "\\x0d\\x0a\\x00\\ufeff\\ufffe");
        assert_eq!(yaml_double_quoted_body("\u{1f600}"), "\u{1f600}");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let shown = format!("{:?}", vars("https://ci.example.com", "s3cr3t-t0ken"));
        assert!(!shown.contains("s3cr3t-t0ken"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
