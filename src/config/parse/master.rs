//! `[master]`, `[cost]` and `[web]`: the master's own settings.

use super::*;

pub(super) fn default_master(base: &Path) -> Result<Master, Diag> {
    Ok(Master {
        url: DEFAULT_URL.to_string(),
        listen: host_port(DEFAULT_URL).map_err(|m| Diag::new(0..0, m))?,
        database: resolve_db(base, "sqlite://paddock.db"),
        state_dir: resolve(base, "paddock-state"),
        secrets_file: None,
        tls: None,
        github_secret_env: "PADDOCK_GITHUB_SECRET".to_string(),
        cluster: "paddock".to_string(),
        reconcile_interval: Duration::from_secs(60),
        orphan_grace: Duration::from_secs(120),
        heartbeat_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(60),
        lease_ttl: Duration::from_secs(15),
        log_format: crate::logging::LogFormat::Text,
    })
}

pub(super) fn parse_master(node: &Node, base: &Path) -> Result<Master, Diag> {
    let f = Fields::new(node, "[master]")?;
    f.allow_only(MASTER_KEYS)?;
    let mut m = default_master(base)?;
    if let Some(url) = f.opt_str("url")? {
        m.listen = host_port(&url.v).map_err(|msg| {
            Diag::new(url.span.clone(), format!("`url`: {msg}")).hint(format!("e.g. url = \"{DEFAULT_URL}\""))
        })?;
        m.url = url.v;
    }
    if let Some(listen) = f.opt_str("listen")? {
        let ok = listen.v.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(Diag::new(listen.span, format!("`listen` must be host:port, not \"{}\"", listen.v))
                .hint("e.g. listen = \"0.0.0.0:8010\""));
        }
        m.listen = listen.v;
    }
    if let Some(db) = f.opt_str("database")? {
        // Never echoed: the string may hold a password.
        match postgres_password_given(&db.v) {
            Ok(false) => {}
            Ok(true) => {
                return Err(Diag::new(db.span, "`database` holds a password: the config file is no place for it").hint(
                    "leave it out of the URL and give it in PGPASSWORD or a .pgpass file (PGPASSFILE, else ~/.pgpass)",
                ))
            }
            Err(why) => {
                return Err(Diag::new(
                    db.span,
                    format!("`database` is not a sqlite: URL nor a PostgreSQL connection string ({why})"),
                )
                .hint("e.g. database = \"sqlite://paddock.db\" or \"postgres://paddock@db.example/paddock\""))
            }
        }
        m.database = resolve_db(base, &db.v);
    }
    if let Some(dir) = f.opt_str("state_dir")? {
        m.state_dir = resolve(base, &dir.v);
    }
    if let Some(file) = f.opt_str("secrets_file")? {
        m.secrets_file = Some(resolve(base, &file.v));
    }
    m.tls = parse_tls(&f, base, &m.url)?;
    if let Some(env) = f.opt_str("github_secret_env")? {
        if env.v.is_empty() {
            return Err(Diag::new(env.span, "`github_secret_env` must not be empty"));
        }
        m.github_secret_env = env.v;
    }
    if let Some(d) = f.opt_duration("heartbeat_timeout")? {
        m.heartbeat_timeout = d;
    }
    if let Some(d) = f.opt_duration("shutdown_grace")? {
        m.shutdown_grace = d;
    }
    if let Some(d) = f.opt_duration("lease_ttl")? {
        if d < Duration::from_secs(1) || d > Duration::from_secs(300) {
            let span = f.opt_str("lease_ttl")?.map_or(0..0, |s| s.span);
            return Err(Diag::new(span, "`lease_ttl` must be between 1s and 300s")
                .hint("a standby master takes over within it; renewals come every fifth of it"));
        }
        m.lease_ttl = d;
    }
    if let Some(c) = f.opt_str("cluster")? {
        let ok = !c.v.is_empty()
            && c.v.len() <= 40
            && c.v.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'));
        if !ok {
            return Err(Diag::new(
                c.span,
                format!("`cluster` must be 1 to 40 letters, digits, `-`, `_` or `.`, not \"{}\"", c.v),
            )
            .hint("e.g. cluster = \"prod\"; it tags every cloud machine this master owns"));
        }
        m.cluster = c.v;
    }
    if let Some(d) = f.opt_duration("reconcile_interval")? {
        if d.is_zero() {
            let span = f.get("reconcile_interval").map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
            return Err(Diag::new(span, "`reconcile_interval` must be more than 0s")
                .hint("the reconcile loop is what finds leaked and vanished machines; e.g. \"60s\""));
        }
        m.reconcile_interval = d;
    }
    if let Some(d) = f.opt_duration("orphan_grace")? {
        if d < Duration::from_secs(1) {
            let span = f.get("orphan_grace").map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
            return Err(Diag::new(span, "`orphan_grace` must be at least 1s")
                .hint("cloud listings lag behind launches; a machine just launched must not count as gone"));
        }
        m.orphan_grace = d;
    }
    if let Some(format) = f.opt_str("log_format")? {
        m.log_format = crate::logging::LogFormat::from_name(&format.v).ok_or_else(|| {
            Diag::new(
                format.span.clone(),
                format!(
                    "`log_format` must be one of {}, not {:?}",
                    crate::logging::LogFormat::NAMES.join(", "),
                    format.v
                ),
            )
            .hint("\"text\" for people, \"json\" (one object per line) for log shippers; --log-format overrides it")
        })?;
    }
    Ok(m)
}

/// `tls_cert` and `tls_key`: both or neither; with them the master speaks only HTTPS, so `url`
/// (what agents and browsers follow, and what makes session cookies `Secure`) must say https.
pub(super) fn parse_tls(f: &Fields, base: &Path, url: &str) -> Result<Option<TlsFiles>, Diag> {
    let (cert, key) = match (f.opt_str("tls_cert")?, f.opt_str("tls_key")?) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(given), None) | (None, Some(given)) => {
            let (have, missing) =
                if f.get("tls_cert").is_some() { ("tls_cert", "tls_key") } else { ("tls_key", "tls_cert") };
            return Err(Diag::new(given.span, format!("`{have}` needs `{missing}` too"))
                .hint("the master serves HTTPS with both a certificate (tls_cert) and its private key (tls_key)"));
        }
    };
    for (name, file) in [("tls_cert", &cert), ("tls_key", &key)] {
        if file.v.is_empty() {
            return Err(Diag::new(file.span.clone(), format!("`{name}` must not be empty")));
        }
    }
    if !url.starts_with("https://") {
        let span = f.get("url").map(|e| e.value.span.clone()).unwrap_or(cert.span.clone());
        return Err(Diag::new(span, format!("`url` must start with https:// when `tls_cert` is set, not \"{url}\""))
            .hint("with tls_cert and tls_key the master speaks only HTTPS; agents and browsers follow `url`"));
    }
    Ok(Some(TlsFiles { cert: resolve(base, &cert.v), key: resolve(base, &key.v) }))
}

/// `host:port` of an http(s) URL, with the scheme's default port when none is written.
pub(super) fn host_port(url: &str) -> Result<String, String> {
    let (rest, default_port) = if let Some(r) = url.strip_prefix("http://") {
        (r, 80)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, 443)
    } else {
        return Err(format!("must start with http:// or https://, got \"{url}\""));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.is_empty() {
        return Err(format!("no host in \"{url}\""));
    }
    // IPv6 literals keep their brackets; the port is whatever follows "]:".
    let (host, port) = if authority.starts_with('[') {
        match authority.split_once(']') {
            Some((h, p)) => (format!("{h}]"), p.strip_prefix(':')),
            None => return Err(format!("unterminated IPv6 address in \"{url}\"")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("no host in \"{url}\""));
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| format!("invalid port \"{p}\" in \"{url}\""))?,
        None => default_port,
    };
    Ok(format!("{host}:{port}"))
}

/// Whether a PostgreSQL connection string (any `database` that is not `sqlite:`) carries a
/// password, read as the PostgreSQL client reads it (user info, query parameters, percent
/// escapes, key=value); `Err` with the client's reason when it cannot read it (the reason
/// names an option, never a value).
fn postgres_password_given(db: &str) -> Result<bool, String> {
    if db.starts_with("sqlite:") {
        return Ok(false);
    }
    crate::store::postgres::password_given(db)
}

/// A relative sqlite database file resolves against the config's folder; other URLs are kept.
pub(super) fn resolve_db(base: &Path, db: &str) -> String {
    let Some(rest) = db.strip_prefix("sqlite://").or_else(|| db.strip_prefix("sqlite:")) else {
        return db.to_string();
    };
    let (file, query) = match rest.split_once('?') {
        Some((f, q)) => (f, Some(q)),
        None => (rest, None),
    };
    if file.is_empty() || file.starts_with(':') || Path::new(file).is_absolute() {
        return db.to_string();
    }
    let mut out = format!("sqlite://{}", resolve(base, file).to_string_lossy());
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// `[cost]`: spend caps over every pool together.
pub(super) fn parse_cost(node: &Node) -> Result<CostSettings, Diag> {
    let f = Fields::new(node, "[cost]")?;
    f.allow_only(COST_KEYS)?;
    Ok(CostSettings { spend: spend_caps(&f)? })
}

/// `[web]`: anonymous access and session lifetime.
pub(super) fn parse_web(node: &Node) -> Result<Web, Diag> {
    let f = Fields::new(node, "[web]")?;
    f.allow_only(WEB_KEYS)?;
    let mut web = Web::default();
    if let Some(access) = f.opt_str("access")? {
        web.public = match access.v.as_str() {
            "public" => true,
            "login" => false,
            other => {
                return Err(Diag::new(
                    access.span,
                    format!(
                        "`access` must be \"public\" (anyone may look) or \"login\" (login required), not {other:?}"
                    ),
                ))
            }
        };
    }
    if let Some(d) = f.opt_duration("session_lifetime")? {
        if d < Duration::from_secs(60) {
            let span = f.get("session_lifetime").map(|e| e.value.span.clone()).unwrap_or_default();
            return Err(Diag::new(span, "`session_lifetime` must be at least 1m"));
        }
        web.session_lifetime = d;
    }
    Ok(web)
}
