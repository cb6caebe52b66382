//! `[[notifier]]`: where build news goes (IRC, email, webhooks, GitHub statuses).

use super::*;

/// A notifier's `ca_file`, resolved against the config's folder; only where TLS is on
/// (`tls_on`), since a CA that is never used is a mistake worth hearing about. `plain` names
/// the setting that turns TLS off, `hint` how to mend it.
pub(super) fn ca_file(f: &Fields, base: &Path, tls_on: bool, plain: &str, hint: &str) -> Result<Option<PathBuf>, Diag> {
    match f.opt_str("ca_file")? {
        None => Ok(None),
        Some(p) if p.v.trim().is_empty() => {
            Err(Diag::new(p.span, "`ca_file` is the path of a PEM file; it must not be empty"))
        }
        Some(p) if !tls_on => Err(Diag::new(p.span, format!("`ca_file` has no use with {plain}")).hint(hint)),
        Some(p) => Ok(Some(resolve(base, &p.v))),
    }
}

/// Checks a notifier's `key` (`url`, `api_url`) is a whole http:// or https:// URL, so a typo
/// is heard at start rather than on every send; true when it is https://.
pub(super) fn web_url(key: &str, u: &Sp<String>) -> Result<bool, Diag> {
    let lower = u.v.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(Diag::new(u.span.clone(), format!("`{key}` must be an http:// or https:// URL")));
    }
    // The URL parser insists on a host for these schemes.
    match reqwest::Url::parse(&u.v) {
        Ok(url) => Ok(url.scheme() == "https"),
        Err(e) => Err(Diag::new(u.span.clone(), format!("`{key}` is not a valid URL: {e}"))),
    }
}

/// A `[[notifier]]`.
pub(super) fn parse_notifier(node: &Node, text: &str, base: &Path) -> Result<Notifier, Diag> {
    let f = Fields::new(node, "[[notifier]]")?;
    f.allow_only(NOTIFIER_KEYS)?;
    let kind_s = f.req_nonempty("kind", "\"webhook\"")?;
    let kind = match kind_s.v.as_str() {
        "webhook" => webhook(&f, base)?,
        "github" => github(&f, base, text)?,
        "irc" => irc(&f, base)?,
        "email" => email(&f, base, text)?,
        other => {
            return Err(Diag::new(kind_s.span.clone(), format!("unknown notifier kind \"{other}\""))
                .hint("known kinds: webhook, github, irc, email"))
        }
    };
    let default_events = match kind {
        NotifierKind::GitHub { .. } => vec![NotifyOn::Started, NotifyOn::Finished],
        NotifierKind::Irc { .. } | NotifierKind::Email { .. } => vec![NotifyOn::Transition],
        NotifierKind::Webhook { .. } => vec![NotifyOn::Finished],
    };
    // Keys of the other kinds are mistakes, not silently ignored settings.
    let own: &[&str] = match kind {
        NotifierKind::Webhook { .. } => &["url", "secret_env", "ca_file"],
        NotifierKind::GitHub { .. } => &["api_url", "token_env", "repository", "context", "ca_file"],
        NotifierKind::Irc { .. } => &["server", "tls", "nick", "channel", "password_env", "auth", "ca_file"],
        NotifierKind::Email { .. } => &[
            "smtp",
            "security",
            "from",
            "to",
            "committers",
            "committer_domains",
            "username",
            "password_env",
            "subject",
            "ca_file",
        ],
    };
    let common = ["kind", "name", "events", "builders", "branches", "template"];
    let foreign: Vec<&str> =
        NOTIFIER_KEYS.iter().copied().filter(|k| !own.contains(k) && !common.contains(k)).collect();
    for key in foreign {
        if let Some(e) = f.get(key) {
            return Err(Diag::new(
                e.key_span.clone(),
                format!("`{key}` is not a setting of `kind = \"{}\"` notifiers", kind_s.v),
            ));
        }
    }
    let events = match f.opt_str_array("events")? {
        None => default_events,
        Some(list) => {
            let mut out = Vec::new();
            for e in list {
                out.push(match e.v.as_str() {
                    "started" => NotifyOn::Started,
                    "finished" => NotifyOn::Finished,
                    "transition" => NotifyOn::Transition,
                    other => {
                        return Err(Diag::new(e.span, format!("unknown event \"{other}\""))
                            .hint("events are \"started\", \"finished\" and \"transition\""))
                    }
                });
            }
            if out.is_empty() {
                let span = f.get("events").map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
                let default: Vec<String> = default_events.iter().map(|e| format!("{:?}", e.as_str())).collect();
                return Err(Diag::new(span, "`events` must name at least one event").hint(format!(
                    "omit it for the default of `kind = \"{}\"`: [{}]",
                    kind_s.v,
                    default.join(", ")
                )));
            }
            out
        }
    };
    let template = match f.opt_str("template")? {
        Some(t) => {
            template::check_fields(&t, template::FIELDS, text)?;
            Some(t.v)
        }
        None => None,
    };
    let name = match f.opt_str("name")? {
        Some(n) if n.v.trim().is_empty() => return Err(Diag::new(n.span, "`name` must not be empty")),
        Some(n) => n.v,
        None => kind_s.v.clone(),
    };
    Ok(Notifier {
        name,
        kind,
        events,
        builders: globs(f.opt_str_array("builders")?, "builders")?,
        branches: globs(f.opt_str_array("branches")?, "branches")?,
        template,
    })
}

/// `kind = "webhook"`: a signed JSON POST per event.
fn webhook(f: &Fields, base: &Path) -> Result<NotifierKind, Diag> {
    let url = f.req_nonempty("url", "\"https://example.com/paddock-hook\"")?;
    let https = web_url("url", &url)?;
    let secret_env = match f.opt_str("secret_env")? {
        Some(s) if s.v.trim().is_empty() => {
            return Err(Diag::new(s.span, "`secret_env` names an environment variable; it must not be empty"))
        }
        other => other.map(|s| s.v),
    };
    let ca_file = ca_file(f, base, https, "an http:// `url`", "remove it, or use an https:// URL")?;
    Ok(NotifierKind::Webhook { url: url.v, secret_env, ca_file })
}

/// `kind = "github"`: commit statuses through the GitHub API.
fn github(f: &Fields, base: &Path, text: &str) -> Result<NotifierKind, Diag> {
    let (api_url, https) = match f.opt_str("api_url")? {
        Some(u) => {
            let https = web_url("api_url", &u)?;
            (u.v.trim_end_matches('/').to_string(), https)
        }
        None => ("https://api.github.com".to_string(), true),
    };
    let token_env = f.req_nonempty("token_env", "\"GITHUB_TOKEN\"")?.v;
    let repository = match f.opt_str("repository")? {
        Some(r) if r.v.split('/').filter(|p| !p.is_empty()).count() != 2 || r.v.matches('/').count() != 1 => {
            return Err(Diag::new(r.span, "`repository` is `owner/name`"))
        }
        other => other.map(|r| r.v),
    };
    let context = match f.opt_str("context")? {
        Some(c) => {
            template::check_fields(&c, template::FIELDS, text)?;
            c.v
        }
        None => "paddock/{builder}".to_string(),
    };
    let ca_file = ca_file(f, base, https, "an http:// `api_url`", "remove it, or use an https:// URL")?;
    Ok(NotifierKind::GitHub { api_url, token_env, repository, context, ca_file })
}

/// `kind = "irc"`: a bot in a channel.
fn irc(f: &Fields, base: &Path) -> Result<NotifierKind, Diag> {
    let server = f.req_nonempty("server", "\"irc.libera.chat\"")?;
    let tls = f.opt_bool("tls")?.unwrap_or(true);
    let (host, port) = match server.v.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) if p > 0 && !h.is_empty() => (h.to_string(), p),
            _ => return Err(Diag::new(server.span, "`server` is `host` or `host:port`")),
        },
        None => (server.v.clone(), if tls { 6697 } else { 6667 }),
    };
    let channel = f.req_nonempty("channel", "\"#myproject-ci\"")?;
    if !(channel.v.starts_with('#') || channel.v.starts_with('&')) || channel.v.contains([' ', ',']) {
        return Err(Diag::new(channel.span, "`channel` is a channel name like \"#ci\""));
    }
    let nick = match f.opt_str("nick")? {
        Some(n) if n.v.is_empty() || n.v.contains([' ', '!', '@', ':', '#']) => {
            return Err(Diag::new(n.span, "`nick` must be one word without ! @ : #"))
        }
        Some(n) => n.v,
        None => "paddock".to_string(),
    };
    let password_env = f.opt_str("password_env")?.map(|p| p.v).filter(|p| !p.trim().is_empty());
    let auth = match f.opt_str("auth")? {
        None => IrcAuth::Sasl,
        Some(a) if a.v == "sasl" => IrcAuth::Sasl,
        Some(a) if a.v == "nickserv" => IrcAuth::NickServ,
        Some(a) => return Err(Diag::new(a.span, "`auth` is \"sasl\" or \"nickserv\"")),
    };
    let ca_file = ca_file(f, base, tls, "`tls = false`", "remove it, or turn TLS on")?;
    Ok(NotifierKind::Irc { host, port, tls, nick, channel: channel.v, password_env, auth, ca_file })
}

/// `kind = "email"`: mail through an SMTP server.
fn email(f: &Fields, base: &Path, text: &str) -> Result<NotifierKind, Diag> {
    let security = match f.opt_str("security")? {
        None => SmtpSecurity::StartTls,
        Some(v) if v.v == "starttls" => SmtpSecurity::StartTls,
        Some(v) if v.v == "tls" => SmtpSecurity::Tls,
        Some(v) if v.v == "none" => SmtpSecurity::None,
        Some(v) => return Err(Diag::new(v.span, "`security` is \"starttls\", \"tls\" or \"none\"")),
    };
    let smtp = f.req_nonempty("smtp", "\"smtp.example.com:587\"")?;
    let default_port = match security {
        SmtpSecurity::StartTls => 587,
        SmtpSecurity::Tls => 465,
        SmtpSecurity::None => 25,
    };
    let (host, port) = match smtp.v.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) if p > 0 && !h.is_empty() => (h.to_string(), p),
            _ => return Err(Diag::new(smtp.span, "`smtp` is `host` or `host:port`")),
        },
        None => (smtp.v.clone(), default_port),
    };
    let address = |s: &Sp<String>, key: &str| -> Result<(), Diag> {
        if crate::config::address_of(&s.v).is_some() {
            Ok(())
        } else {
            Err(Diag::new(s.span.clone(), format!("`{key}` has {:?}, which is not an email address", s.v)))
        }
    };
    let from = f.req_nonempty("from", "\"Paddock <ci@example.com>\"")?;
    address(&from, "from")?;
    let to = f.opt_str_array("to")?.unwrap_or_default();
    for t in &to {
        address(t, "to")?;
    }
    let committers = f.opt_bool("committers")?.unwrap_or(true);
    let mut committer_domains = Vec::new();
    for d in f.opt_str_array("committer_domains")?.unwrap_or_default() {
        let domain = d.v.trim().trim_start_matches('@').to_ascii_lowercase();
        if domain.is_empty() || domain.contains(['@', ' ', '<', '>', ',']) || domain.starts_with('.') {
            return Err(Diag::new(d.span, format!("`committer_domains` has {:?}, which is not a domain", d.v))
                .hint("write domains like \"example.com\""));
        }
        committer_domains.push(domain);
    }
    if !committers && !committer_domains.is_empty() {
        let span = f.get("committer_domains").map(|e| e.key_span.clone()).unwrap_or(f.span.clone());
        return Err(Diag::new(span, "`committer_domains` has no use with `committers = false`"));
    }
    if to.is_empty() && !committers {
        return Err(Diag::new(f.span.clone(), "this email notifier mails nobody")
            .hint("list addresses in `to`, or leave `committers` on"));
    }
    let username = f.opt_str("username")?.map(|u| u.v).filter(|u| !u.is_empty());
    let password_env = f.opt_str("password_env")?.map(|p| p.v).filter(|p| !p.trim().is_empty());
    if let (Some(_), SmtpSecurity::None) = (&password_env, security) {
        let span = f.get("password_env").map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
        return Err(Diag::new(span, "a password over `security = \"none\"` would cross the network in clear")
            .hint("use security = \"starttls\" or \"tls\""));
    }
    let subject = match f.opt_str("subject")? {
        Some(t) => {
            template::check_fields(&t, template::FIELDS, text)?;
            t.v
        }
        None => "{builder} on {branch}: {result}".to_string(),
    };
    let ca_file =
        ca_file(f, base, security != SmtpSecurity::None, "`security = \"none\"`", "remove it, or turn TLS on")?;
    Ok(NotifierKind::Email {
        host,
        port,
        security,
        from: from.v,
        to: to.into_iter().map(|t| t.v).collect(),
        committers,
        committer_domains,
        username,
        password_env,
        subject,
        ca_file,
    })
}
