//! Reading each section of the file into raw, spanned structures, then cross-checking and
//! expanding them into the final [`Config`].
//!
//! Errors are collected per item and the earliest one in the file is reported, so the user
//! fixes problems top to bottom whatever order the sections are written in.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobMatcher};

use super::error::{earliest, line_col, Diag};
use super::model::*;
use super::template;
use super::tree::{parse_tree, unknown_key, Entry, Fields, Kind, Node, Sp};
use paddock_provisioners::ec2::Ec2Settings;

const TOP_KEYS: &[&str] = &["master", "cost", "web", "repo", "pool", "builder", "scheduler", "notifier"];
const NOTIFIER_KEYS: &[&str] = &[
    "kind",
    "name",
    "events",
    "builders",
    "branches",
    "template",
    "url",
    "secret_env",
    "api_url",
    "token_env",
    "repository",
    "context",
    "server",
    "tls",
    "nick",
    "channel",
    "password_env",
    "auth",
    "smtp",
    "security",
    "from",
    "to",
    "committers",
    "username",
    "subject",
    "ca_file",
    "committer_domains",
];
const COST_KEYS: &[&str] = &["max_hourly_spend", "max_daily_spend"];
const WEB_KEYS: &[&str] = &["access", "session_lifetime"];
const MASTER_KEYS: &[&str] = &[
    "url",
    "listen",
    "database",
    "state_dir",
    "secrets_file",
    "tls_cert",
    "tls_key",
    "github_secret_env",
    "heartbeat_timeout",
    "shutdown_grace",
    "cluster",
    "reconcile_interval",
    "orphan_grace",
    "log_format",
];
const REPO_KEYS: &[&str] = &["name", "url", "branches", "poll"];
const POOL_KEYS: &[&str] = &[
    "provisioner",
    "max_instances",
    "min_idle",
    "idle_timeout",
    "boot_timeout",
    "max_builds",
    "agent_command",
    "isolation",
    "run_as",
    "hourly_price",
    "prices",
    "max_hourly_spend",
    "max_daily_spend",
];
const EC2_KEYS: &[&str] = &[
    "region",
    "endpoint_url",
    "ami",
    "launch_template",
    "launch_template_version",
    "instance_types",
    "subnets",
    "security_groups",
    "iam_instance_profile",
    "root_volume_size",
    "root_volume_type",
    "root_device_name",
    "spot",
    "tags",
    "key_name",
    "imds_url",
];
const PROVISIONERS: &[&str] = &["local", "ec2"];
const BUILDER_KEYS: &[&str] = &["name", "repo", "pool", "branches", "matrix", "env", "steps"];
const STEP_KEYS: &[&str] = &["run", "name", "env", "workdir", "timeout", "always"];
const SCHEDULER_COMMON_KEYS: &[&str] = &["kind", "name", "repo", "branches", "builders"];
const BRANCH_KEYS: &[&str] = &["tree_stable", "files", "ignore"];
const NIGHTLY_KEYS: &[&str] = &["cron", "only_if_changed"];
const SCHEDULER_KINDS: &[&str] = &["branch", "nightly"];

const DEFAULT_URL: &str = "http://127.0.0.1:8010";
const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(3600);

/// Parse, validate and expand `text`, read from `path`.
pub(crate) fn parse_config(text: &str, path: &Path) -> Result<Config, Diag> {
    let root = parse_tree(text)?;
    parse_root(&root, text, path)
}

/// Validate and expand an already parsed tree; `text` is what its spans index into.
pub(crate) fn parse_root(root: &[Entry], text: &str, path: &Path) -> Result<Config, Diag> {
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut errs = Vec::new();

    let mut master = None;
    let mut cost = CostSettings::default();
    let mut web = Web::default();
    let mut notifiers: Vec<Notifier> = Vec::new();
    let mut repos = Vec::new();
    let mut pools = Vec::new();
    let mut builders = Vec::new();
    let mut schedulers = Vec::new();
    let mut scheduler_index = 0;
    // Where the first EC2 pool says so, and whether [master] names its cluster.
    let mut first_ec2: Option<Range<usize>> = None;
    let mut cluster_given = false;

    for e in root {
        match e.key.as_str() {
            "master" => {
                cluster_given = Fields::new(&e.value, "[master]").ok().and_then(|f| f.get("cluster")).is_some();
                master = keep(&mut errs, parse_master(&e.value, &base));
            }
            "cost" => cost = keep(&mut errs, parse_cost(&e.value)).unwrap_or_default(),
            "web" => web = keep(&mut errs, parse_web(&e.value)).unwrap_or_default(),
            "repo" => {
                for node in keep(&mut errs, array_of_tables(e, "[[repo]]")).unwrap_or_default() {
                    repos.extend(keep(&mut errs, parse_repo(node, &base)));
                }
            }
            "pool" => match pool_entries(e) {
                Ok(entries) => {
                    for pe in entries {
                        let pool = keep(&mut errs, parse_pool(pe, &base));
                        if pool.as_ref().is_some_and(|p| matches!(p.provisioner, ProvisionerKind::Ec2(_))) {
                            let span = Fields::new(&pe.value, "pool").ok().and_then(|f| f.get("provisioner"));
                            first_ec2 = first_ec2.or(span.map(|p| p.value.span.clone()));
                        }
                        pools.extend(pool);
                    }
                }
                Err(d) => errs.push(d),
            },
            "builder" => {
                for node in keep(&mut errs, array_of_tables(e, "[[builder]]")).unwrap_or_default() {
                    builders.extend(keep(&mut errs, parse_builder(node, text)));
                }
            }
            "notifier" => {
                for node in keep(&mut errs, array_of_tables(e, "[[notifier]]")).unwrap_or_default() {
                    if let Some(n) = keep(&mut errs, parse_notifier(node, text, &base)) {
                        if notifiers.iter().any(|o| o.name == n.name) {
                            errs.push(
                                Diag::new(node.span.clone(), format!("duplicate notifier name `{}`", n.name))
                                    .hint("give each [[notifier]] of one kind its own `name`"),
                            );
                        }
                        notifiers.push(n);
                    }
                }
            }
            "scheduler" => {
                for node in keep(&mut errs, array_of_tables(e, "[[scheduler]]")).unwrap_or_default() {
                    scheduler_index += 1;
                    schedulers.extend(keep(&mut errs, parse_scheduler(node, scheduler_index)));
                }
            }
            other => errs.push(unknown_key(other, e.key_span.clone(), "the top level", TOP_KEYS).hint(format!(
                "{}the file has sections [master], [[repo]], [pool.NAME], [[builder]], [[scheduler]]",
                super::tree::closest(other, TOP_KEYS).map(|b| format!("did you mean `{b}`? ")).unwrap_or_default()
            ))),
        }
    }
    if let Some(d) = earliest(errs) {
        return Err(d);
    }
    let master = match master {
        Some(m) => m,
        None => default_master(&base)?,
    };

    let mut errs = Vec::new();
    if let (Some(span), false) = (first_ec2, cluster_given) {
        errs.push(Diag::new(span, "an EC2 pool needs `cluster` in [master]").hint(
            "add cluster = \"prod\" under [master]: it tags every instance this master owns, and two masters \
             sharing one would terminate each other's machines as orphans",
        ));
    }
    check_repos(&repos, text, &mut errs);
    let pool_names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    let repo_names: Vec<&str> = repos.iter().map(|r| r.name.v.as_str()).collect();
    for b in &builders {
        if !repo_names.contains(&b.repo.v.as_str()) {
            errs.push(unknown_ref("repo", &b.repo, &repo_names, "[[repo]]"));
        }
        if !pool_names.contains(&b.pool.v.as_str()) {
            errs.push(unknown_ref("pool", &b.pool, &pool_names, "[pool.NAME]"));
        }
    }
    let expanded = expand_all(&builders, text, &mut errs);
    let mut out_schedulers = Vec::new();
    let mut seen_sched: HashMap<&str, Range<usize>> = HashMap::new();
    for s in &schedulers {
        if let Some(first) = seen_sched.get(s.name.v.as_str()) {
            errs.push(Diag::new(s.name.span.clone(), format!("duplicate scheduler name `{}`", s.name.v)).hint(
                format!(
                    "the first is at line {}; give each scheduler a distinct `name`",
                    line_col(text, first.start).0
                ),
            ));
        } else {
            seen_sched.insert(&s.name.v, s.name.span.clone());
        }
        if !repo_names.contains(&s.repo.v.as_str()) {
            errs.push(unknown_ref("repo", &s.repo, &repo_names, "[[repo]]"));
            continue;
        }
        if let Some(sched) = keep(&mut errs, resolve_scheduler(s, &expanded)) {
            out_schedulers.push(sched);
        }
    }
    if let Some(d) = earliest(errs) {
        return Err(d);
    }

    Ok(Config {
        path: path.to_path_buf(),
        master,
        repos: repos.into_iter().map(|r| r.repo).collect(),
        pools,
        cost,
        web,
        notifiers,
        builders: expanded.into_iter().map(|e| e.builder).collect(),
        schedulers: out_schedulers,
    })
}

/// Record an error and carry on with the next item.
fn keep<T>(errs: &mut Vec<Diag>, r: Result<T, Diag>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(d) => {
            errs.push(d);
            None
        }
    }
}

fn array_of_tables<'a>(e: &'a Entry, what: &str) -> Result<Vec<&'a Node>, Diag> {
    match &e.value.kind {
        Kind::Array(items) => Ok(items.iter().collect()),
        _ => Err(Diag::new(
            e.key_span.clone(),
            format!("`{}` must be an array of tables, not {}", e.key, e.value.type_name()),
        )
        .hint(format!("write {what} (double brackets) for each entry"))),
    }
}

fn pool_entries(e: &Entry) -> Result<&[Entry], Diag> {
    match &e.value.kind {
        Kind::Table(entries) => Ok(entries),
        _ => Err(Diag::new(
            e.key_span.clone(),
            format!("`pool` must be a table of named pools, not {}", e.value.type_name()),
        )
        .hint("write one [pool.NAME] section per pool, e.g. [pool.small]")),
    }
}

fn unknown_ref(what: &str, r: &Sp<String>, defined: &[&str], section: &str) -> Diag {
    let hint = if defined.is_empty() {
        format!("no {what} is defined; add a {section} section")
    } else {
        let mut h = String::new();
        if let Some(best) = super::tree::closest(&r.v, defined) {
            h.push_str(&format!("did you mean `{best}`? "));
        }
        h.push_str(&format!("defined {what}s: {}", defined.join(", ")));
        h
    };
    Diag::new(r.span.clone(), format!("unknown {what} `{}`", r.v)).hint(hint)
}

// ---------------------------------------------------------------------------------------------
// [master]

fn default_master(base: &Path) -> Result<Master, Diag> {
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
        log_format: crate::logging::LogFormat::Text,
    })
}

fn parse_master(node: &Node, base: &Path) -> Result<Master, Diag> {
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
fn parse_tls(f: &Fields, base: &Path, url: &str) -> Result<Option<TlsFiles>, Diag> {
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
fn host_port(url: &str) -> Result<String, String> {
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

// ---------------------------------------------------------------------------------------------
// paths

/// Join a relative path onto the config's folder; `.` components are dropped for readability.
fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    let joined = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let cleaned: PathBuf = joined.components().filter(|c| !matches!(c, Component::CurDir)).collect();
    if cleaned.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        cleaned
    }
}

/// Git URLs stay as written; anything else is a local path relative to the config.
fn resolve_repo_url(base: &Path, url: &str) -> String {
    let scp_like = url.split_once('@').is_some_and(|(user, rest)| {
        !user.is_empty()
            && !user.contains('/')
            && rest.split_once(':').is_some_and(|(host, _)| !host.is_empty() && !host.contains('/'))
    });
    if url.contains("://") || scp_like {
        url.to_string()
    } else {
        resolve(base, url).to_string_lossy().into_owned()
    }
}

/// A relative sqlite database file resolves against the config's folder; other URLs are kept.
fn resolve_db(base: &Path, db: &str) -> String {
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

fn check_glob(s: &Sp<String>, what: &str) -> Result<GlobMatcher, Diag> {
    Glob::new(&s.v).map(|g| g.compile_matcher()).map_err(|e| {
        Diag::new(s.span.clone(), format!("invalid glob \"{}\" in `{what}`: {}", s.v, e.kind()))
            .hint("globs use *, ?, [abc], {a,b} and ** (e.g. \"stable/*\", \"docs/**\")")
    })
}

fn globs(list: Option<Vec<Sp<String>>>, what: &str) -> Result<Vec<String>, Diag> {
    let list = list.unwrap_or_default();
    for s in &list {
        check_glob(s, what)?;
    }
    Ok(list.into_iter().map(|s| s.v).collect())
}

// ---------------------------------------------------------------------------------------------
// [[repo]]

struct RawRepo {
    name: Sp<String>,
    repo: Repo,
}

fn parse_repo(node: &Node, base: &Path) -> Result<RawRepo, Diag> {
    let f = Fields::new(node, "[[repo]]")?;
    f.allow_only(REPO_KEYS)?;
    let name = f.req_nonempty("name", "\"myproject\"")?;
    let url = f.req_nonempty("url", "\"https://github.com/me/myproject.git\"")?;
    let branches = match f.opt_str_array("branches")? {
        None => vec!["main".to_string()],
        Some(list) => {
            if list.is_empty() {
                let span = f.get("branches").map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
                return Err(
                    Diag::new(span, "`branches` must list at least one branch").hint("omit it to watch [\"main\"]")
                );
            }
            globs(Some(list), "branches")?
        }
    };
    let poll = match f.opt_duration("poll")? {
        None => Some(Duration::from_secs(60)),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    };
    Ok(RawRepo { repo: Repo { name: name.v.clone(), url: resolve_repo_url(base, &url.v), branches, poll }, name })
}

fn check_repos(repos: &[RawRepo], text: &str, errs: &mut Vec<Diag>) {
    let mut seen: HashMap<&str, &Range<usize>> = HashMap::new();
    for r in repos {
        if let Some(first) = seen.get(r.name.v.as_str()) {
            errs.push(Diag::new(r.name.span.clone(), format!("duplicate repo name `{}`", r.name.v)).hint(format!(
                "the first `{}` is at line {}; repo names must be unique",
                r.name.v,
                line_col(text, first.start).0
            )));
        } else {
            seen.insert(&r.name.v, &r.name.span);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// [pool.NAME]

fn parse_pool(e: &Entry, base: &Path) -> Result<Pool, Diag> {
    let what = format!("[pool.{}]", e.key);
    let f = Fields::new(&e.value, what.clone())?;
    let kind = f.opt_str("provisioner")?;
    let is_ec2 = kind.as_ref().is_some_and(|k| k.v == "ec2");
    let mut allowed: Vec<&str> = POOL_KEYS.to_vec();
    if is_ec2 {
        for key in ["isolation", "run_as"] {
            if let Some(e) = f.get(key) {
                return Err(Diag::new(
                    e.key_span.clone(),
                    format!("`{key}` is only valid for provisioner = \"local\""),
                )
                .hint("an EC2 build has a VM of its own, destroyed after use; remove the key"));
            }
        }
        allowed.extend(EC2_KEYS);
        allowed.retain(|k| !matches!(*k, "agent_command" | "isolation" | "run_as"));
    }
    f.allow_only(&allowed)?;
    let provisioner = match &kind {
        None => ProvisionerKind::Local,
        Some(p) if p.v == "local" => ProvisionerKind::Local,
        Some(p) if p.v == "ec2" => ProvisionerKind::Ec2(Box::new(parse_ec2(&f, &what)?)),
        Some(p) => {
            return Err(Diag::new(p.span.clone(), format!("unknown provisioner \"{}\"", p.v))
                .hint(format!("available provisioners: {}", PROVISIONERS.join(", "))))
        }
    };
    let max_instances = f.opt_u32("max_instances")?;
    if let Some(m) = &max_instances {
        if m.v == 0 {
            return Err(Diag::new(m.span.clone(), "`max_instances` must be at least 1")
                .hint("a pool with no machines can never run a build"));
        }
    }
    let max_instances = max_instances.map(|m| m.v).unwrap_or(4);
    let min_idle = f.opt_u32("min_idle")?;
    if let Some(m) = &min_idle {
        if m.v > max_instances {
            return Err(Diag::new(
                m.span.clone(),
                format!("`min_idle` ({}) is greater than `max_instances` ({max_instances})", m.v),
            )
            .hint("lower min_idle or raise max_instances"));
        }
    }
    let hourly_price = f.opt_money("hourly_price")?.map(|m| m.v);
    let spend = spend_caps(&f)?;
    if matches!(provisioner, ProvisionerKind::Local) && spend.any() && hourly_price.unwrap_or(0.0) == 0.0 {
        let cap = f.get("max_hourly_spend").or_else(|| f.get("max_daily_spend"));
        let span = cap.map(|c| c.key_span.clone()).unwrap_or(f.span.clone());
        return Err(Diag::new(span, "a spend cap on a local pool whose machines cost nothing can never be reached")
            .hint("give the pool a nominal `hourly_price`, or remove the cap"));
    }
    Ok(Pool {
        name: e.key.clone(),
        provisioner,
        max_instances,
        min_idle: min_idle.map(|m| m.v).unwrap_or(0),
        idle_timeout: f.opt_duration("idle_timeout")?.unwrap_or(Duration::from_secs(300)),
        boot_timeout: f.opt_duration("boot_timeout")?.unwrap_or(Duration::from_secs(300)),
        max_builds: f.opt_u32("max_builds")?.map(|m| m.v).unwrap_or(0),
        agent_command: f.opt_str("agent_command")?.map(|p| resolve(base, &p.v)),
        isolation: isolation(&f)?,
        run_as: run_as(&f)?,
        hourly_price,
        prices: parse_prices(&f)?,
        spend,
    })
}

/// `isolation = "sandbox" | "none"` of a local pool.
fn isolation(f: &Fields<'_>) -> Result<Isolation, Diag> {
    match f.opt_str("isolation")? {
        None => Ok(Isolation::Sandbox),
        Some(v) if v.v == "sandbox" => Ok(Isolation::Sandbox),
        Some(v) if v.v == "none" => Ok(Isolation::None),
        Some(v) => Err(Diag::new(v.span, format!("`isolation` is \"sandbox\" or \"none\", not \"{}\"", v.v)).hint(
            "\"sandbox\" (the default) confines each machine with bubblewrap; \"none\" runs steps as the \
             master's user with access to its files",
        )),
    }
}

/// `run_as = "USER"` of a local pool: a plausible user name, not root, and only with the sandbox.
fn run_as(f: &Fields<'_>) -> Result<Option<String>, Diag> {
    let Some(user) = f.opt_str("run_as")? else { return Ok(None) };
    let plausible = !user.v.is_empty()
        && user.v.len() <= 32
        && !user.v.starts_with('-')
        && user.v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !plausible {
        return Err(Diag::new(user.span, format!("`run_as` must be a user name, not \"{}\"", user.v))
            .hint("e.g. run_as = \"paddock-build\" (create it with useradd --system --no-create-home paddock-build)"));
    }
    if user.v == "root" {
        return Err(Diag::new(user.span, "`run_as` must name an unprivileged user, not root")
            .hint("create one with useradd --system --no-create-home paddock-build and name it here"));
    }
    if f.get("isolation").is_some_and(|e| matches!(&e.value.kind, Kind::Str(s) if s == "none")) {
        return Err(Diag::new(user.span, "`run_as` needs the sandbox, but this pool says isolation = \"none\"").hint(
            "remove `run_as`, or remove isolation = \"none\" to confine the machines with bubblewrap as that user",
        ));
    }
    Ok(Some(user.v))
}

/// `prices = { "t3.small" = 0.0208, ... }`: per instance type, USD per hour.
fn parse_prices(f: &Fields<'_>) -> Result<BTreeMap<String, f64>, Diag> {
    let Some(e) = f.get("prices") else { return Ok(BTreeMap::new()) };
    let entries = e.value.table("`prices`").map_err(|d| d.hint("write prices = { \"t3.small\" = 0.0208 }"))?;
    let mut out = BTreeMap::new();
    for p in entries {
        out.insert(p.key.clone(), p.value.money(&format!("the price of `{}`", p.key))?.v);
    }
    Ok(out)
}

/// `max_hourly_spend` / `max_daily_spend` (USD); a cap of 0 would stop every launch.
fn spend_caps(f: &Fields<'_>) -> Result<SpendCaps, Diag> {
    let mut caps = SpendCaps::default();
    for (key, slot) in [("max_hourly_spend", &mut caps.hourly), ("max_daily_spend", &mut caps.daily)] {
        if let Some(m) = f.opt_money(key)? {
            if m.v <= 0.0 {
                return Err(Diag::new(m.span, format!("`{key}` must be more than 0"))
                    .hint("leave it out for no cap; a cap of 0 would never launch a machine"));
            }
            *slot = Some(m.v);
        }
    }
    Ok(caps)
}

/// `[cost]`: spend caps over every pool together.
fn parse_cost(node: &Node) -> Result<CostSettings, Diag> {
    let f = Fields::new(node, "[cost]")?;
    f.allow_only(COST_KEYS)?;
    Ok(CostSettings { spend: spend_caps(&f)? })
}

/// A notifier's `ca_file`, resolved against the config's folder; only where TLS is on
/// (`tls_on`), since a CA that is never used is a mistake worth hearing about. `plain` names
/// the setting that turns TLS off, `hint` how to mend it.
fn ca_file(f: &Fields, base: &Path, tls_on: bool, plain: &str, hint: &str) -> Result<Option<PathBuf>, Diag> {
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
fn web_url(key: &str, u: &Sp<String>) -> Result<bool, Diag> {
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
fn parse_notifier(node: &Node, text: &str, base: &Path) -> Result<Notifier, Diag> {
    let f = Fields::new(node, "[[notifier]]")?;
    f.allow_only(NOTIFIER_KEYS)?;
    let kind_s = f.req_nonempty("kind", "\"webhook\"")?;
    let kind = match kind_s.v.as_str() {
        "webhook" => {
            let url = f.req_nonempty("url", "\"https://example.com/paddock-hook\"")?;
            let https = web_url("url", &url)?;
            let secret_env = match f.opt_str("secret_env")? {
                Some(s) if s.v.trim().is_empty() => {
                    return Err(Diag::new(s.span, "`secret_env` names an environment variable; it must not be empty"))
                }
                other => other.map(|s| s.v),
            };
            let ca_file = ca_file(&f, base, https, "an http:// `url`", "remove it, or use an https:// URL")?;
            NotifierKind::Webhook { url: url.v, secret_env, ca_file }
        }
        "github" => {
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
                    template::check_fields(&c, crate::notify::FIELDS, text)?;
                    c.v
                }
                None => "paddock/{builder}".to_string(),
            };
            let ca_file = ca_file(&f, base, https, "an http:// `api_url`", "remove it, or use an https:// URL")?;
            NotifierKind::GitHub { api_url, token_env, repository, context, ca_file }
        }
        "irc" => {
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
                None => crate::notify::irc::IrcAuth::Sasl,
                Some(a) if a.v == "sasl" => crate::notify::irc::IrcAuth::Sasl,
                Some(a) if a.v == "nickserv" => crate::notify::irc::IrcAuth::NickServ,
                Some(a) => return Err(Diag::new(a.span, "`auth` is \"sasl\" or \"nickserv\"")),
            };
            let ca_file = ca_file(&f, base, tls, "`tls = false`", "remove it, or turn TLS on")?;
            NotifierKind::Irc { host, port, tls, nick, channel: channel.v, password_env, auth, ca_file }
        }
        "email" => {
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
                if crate::notify::email::address_of(&s.v).is_some() {
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
                    template::check_fields(&t, crate::notify::FIELDS, text)?;
                    t.v
                }
                None => "{builder} on {branch}: {result}".to_string(),
            };
            let ca_file = ca_file(
                &f,
                base,
                security != SmtpSecurity::None,
                "`security = \"none\"`",
                "remove it, or turn TLS on",
            )?;
            NotifierKind::Email {
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
            }
        }
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
            template::check_fields(&t, crate::notify::FIELDS, text)?;
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

/// `[web]`: anonymous access and session lifetime.
fn parse_web(node: &Node) -> Result<Web, Diag> {
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

/// The EC2 settings of a `provisioner = "ec2"` pool.
fn parse_ec2(f: &Fields<'_>, what: &str) -> Result<Ec2Settings, Diag> {
    let strs = |key: &str| -> Result<Vec<String>, Diag> {
        let list = f.opt_str_array(key)?.unwrap_or_default();
        for s in &list {
            if s.v.trim().is_empty() {
                return Err(Diag::new(s.span.clone(), format!("`{key}` has an empty entry")));
            }
        }
        Ok(list.into_iter().map(|s| s.v).collect())
    };
    let opt = |key: &str| -> Result<Option<String>, Diag> {
        match f.opt_str(key)? {
            Some(s) if s.v.trim().is_empty() => Err(Diag::new(s.span, format!("`{key}` must not be empty"))),
            other => Ok(other.map(|s| s.v)),
        }
    };
    let mut s = Ec2Settings {
        region: opt("region")?,
        endpoint_url: opt("endpoint_url")?,
        ami: opt("ami")?,
        launch_template: opt("launch_template")?,
        launch_template_version: opt("launch_template_version")?,
        instance_types: strs("instance_types")?,
        subnets: strs("subnets")?,
        security_groups: strs("security_groups")?,
        iam_instance_profile: opt("iam_instance_profile")?,
        root_volume_size: None,
        root_volume_type: opt("root_volume_type")?,
        root_device_name: opt("root_device_name")?,
        spot: f.opt_bool("spot")?.unwrap_or(false),
        tags: Default::default(),
        key_name: opt("key_name")?,
        imds_url: opt("imds_url")?,
    };
    if let Some(size) = f.opt_u32("root_volume_size")? {
        if size.v == 0 || size.v > 65536 {
            return Err(Diag::new(size.span, format!("`root_volume_size` is in GiB, 1 to 65536, not {}", size.v)));
        }
        s.root_volume_size = Some(size.v as i32);
    }
    for (key, url) in [("endpoint_url", &s.endpoint_url), ("imds_url", &s.imds_url)] {
        if let Some(u) = url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                let span = f.get(key).map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
                return Err(Diag::new(span, format!("`{key}` must start with http:// or https://, got \"{u}\"")));
            }
        }
    }
    if let Some(e) = f.get("tags") {
        for (k, v) in parse_env(&e.value, "`tags`").map_err(|d| d.hint("write tags = { team = \"ci\" }"))? {
            if k.starts_with("paddock:") || k.starts_with("aws:") {
                return Err(Diag::new(v.span, format!("tag `{k}` is reserved"))
                    .hint("keys starting with paddock: are Paddock's own, aws: are AWS's"));
            }
            s.tags.insert(k, v.v);
        }
    }
    if s.ami.is_none() && s.launch_template.is_none() {
        return Err(Diag::new(f.span.clone(), format!("{what} needs `ami` or `launch_template`"))
            .hint("e.g. ami = \"ami-0123456789abcdef0\" (a stock Linux AMI works: the agent is fetched at boot)"));
    }
    if s.ami.is_none() && s.root_device_name.is_none() && (s.root_volume_size.is_some() || s.root_volume_type.is_some())
    {
        let key = if s.root_volume_size.is_some() { "root_volume_size" } else { "root_volume_type" };
        let span = f.get(key).map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
        return Err(Diag::new(span, format!("`{key}` with a launch template and no `ami` needs `root_device_name`"))
            .hint("the root device's name depends on the template's image, e.g. root_device_name = \"/dev/xvda\" (Amazon Linux) or \"/dev/sda1\" (Debian, Ubuntu)"));
    }
    if s.instance_types.is_empty() && s.launch_template.is_none() {
        return Err(Diag::new(f.span.clone(), format!("{what} needs `instance_types`"))
            .hint("e.g. instance_types = [\"t3.small\", \"t3a.small\"] (tried in order when one has no capacity)"));
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// [[builder]]

struct RawStep {
    name: Option<Sp<String>>,
    run: Sp<String>,
    env: Vec<(String, Sp<String>)>,
    workdir: Option<Sp<String>>,
    timeout: Duration,
    always: bool,
}

struct RawBuilder {
    name: Sp<String>,
    repo: Sp<String>,
    pool: Sp<String>,
    branches: Vec<String>,
    axes: Vec<(String, Vec<String>)>,
    env: Vec<(String, Sp<String>)>,
    steps: Vec<RawStep>,
}

fn parse_builder(node: &Node, text: &str) -> Result<RawBuilder, Diag> {
    let f = Fields::new(node, "[[builder]]")?;
    f.allow_only(BUILDER_KEYS)?;
    let name = f.req_nonempty("name", "\"tests\"")?;
    let repo = f.req_nonempty("repo", "\"myproject\"")?;
    let pool = f.req_nonempty("pool", "\"small\"")?;
    let branches = globs(f.opt_str_array("branches")?, "branches")?;
    let axes = match f.get("matrix") {
        None => Vec::new(),
        Some(e) => parse_matrix(&e.value)?,
    };
    let env = match f.get("env") {
        None => Vec::new(),
        Some(e) => parse_env(&e.value, "`env`")?,
    };
    let no_steps = |span: Range<usize>| {
        Diag::new(span, format!("builder `{}` has no steps", name.v)).hint("add e.g. steps = [\"make test\"]")
    };
    let steps = match f.get("steps") {
        None => return Err(no_steps(f.span.clone())),
        Some(e) => {
            let items = e.value.array("`steps`")?;
            if items.is_empty() {
                return Err(no_steps(e.value.span.clone()));
            }
            items.iter().map(parse_step).collect::<Result<Vec<_>, _>>()?
        }
    };
    let axis_names: Vec<&str> = axes.iter().map(|(a, _)| a.as_str()).collect();
    let mut templated: Vec<&Sp<String>> = vec![&name];
    templated.extend(env.iter().map(|(_, v)| v));
    for s in &steps {
        templated.push(&s.run);
        templated.extend(s.name.iter());
        templated.extend(s.workdir.iter());
        templated.extend(s.env.iter().map(|(_, v)| v));
    }
    // Check in file order so the first bad placeholder is the one reported.
    templated.sort_by_key(|s| s.span.start);
    for s in templated {
        template::check(s, &axis_names, text)?;
    }
    Ok(RawBuilder { name, repo, pool, branches, axes, env, steps })
}

fn parse_matrix(node: &Node) -> Result<Vec<(String, Vec<String>)>, Diag> {
    let entries = node.table("`matrix`").map_err(|d| d.hint("write matrix = { axis = [\"a\", \"b\"] }"))?;
    let mut axes = Vec::new();
    for e in entries {
        if !template::is_ident(&e.key) || e.key == "secret" {
            return Err(Diag::new(e.key_span.clone(), format!("invalid matrix axis name `{}`", e.key))
                .hint("axis names start with a letter or _ and contain letters, digits, _ or -"));
        }
        let values = e.value.array(&format!("matrix axis `{}`", e.key))?;
        if values.is_empty() {
            return Err(Diag::new(e.value.span.clone(), format!("matrix axis `{}` has no values", e.key))
                .hint("list at least one value, or remove the axis"));
        }
        let mut out = Vec::new();
        for v in values {
            out.push(match &v.kind {
                Kind::Str(s) => s.clone(),
                Kind::Int(i) => i.to_string(),
                Kind::Bool(b) => b.to_string(),
                Kind::Float(_) => {
                    return Err(Diag::new(
                        v.span.clone(),
                        format!("matrix values must be strings, not a float (axis `{}`)", e.key),
                    )
                    .hint("quote version numbers so 3.10 stays \"3.10\""))
                }
                _ => {
                    return Err(Diag::new(
                        v.span.clone(),
                        format!("matrix values must be strings, not {} (axis `{}`)", v.type_name(), e.key),
                    ))
                }
            });
        }
        axes.push((e.key.clone(), out));
    }
    Ok(axes)
}

fn parse_env(node: &Node, what: &str) -> Result<Vec<(String, Sp<String>)>, Diag> {
    let entries = node.table(what).map_err(|d| d.hint("write env = { NAME = \"value\" }"))?;
    entries
        .iter()
        .map(|e| {
            let v = e.value.str(&format!("environment variable `{}`", e.key))?;
            Ok((e.key.clone(), v))
        })
        .collect()
}

fn parse_step(node: &Node) -> Result<RawStep, Diag> {
    match &node.kind {
        Kind::Str(s) => {
            if s.trim().is_empty() {
                return Err(Diag::new(node.span.clone(), "a step's command must not be empty"));
            }
            Ok(RawStep {
                name: None,
                run: Sp { v: s.clone(), span: node.span.clone() },
                env: Vec::new(),
                workdir: None,
                timeout: DEFAULT_STEP_TIMEOUT,
                always: false,
            })
        }
        Kind::Table(_) => {
            let f = Fields::new(node, "a step")?;
            f.allow_only(STEP_KEYS)?;
            Ok(RawStep {
                run: f.req_nonempty("run", "\"make test\"")?,
                name: f.opt_str("name")?,
                env: match f.get("env") {
                    None => Vec::new(),
                    Some(e) => parse_env(&e.value, "a step's `env`")?,
                },
                workdir: f.opt_str("workdir")?,
                timeout: f.opt_duration("timeout")?.unwrap_or(DEFAULT_STEP_TIMEOUT),
                always: f.opt_bool("always")?.unwrap_or(false),
            })
        }
        _ => Err(Diag::new(
            node.span.clone(),
            format!("each step must be a string or a table, not {}", node.type_name()),
        )
        .hint("e.g. steps = [\"make\", { run = \"make test\", timeout = \"20m\" }]")),
    }
}

// ---------------------------------------------------------------------------------------------
// matrix expansion

/// An expanded builder (kept as a struct so cross-checks can grow extra context).
struct Expanded {
    builder: Builder,
}

/// Every cell of the matrix: the first axis varies slowest, values in the order written.
fn cells(axes: &[(String, Vec<String>)]) -> Vec<Vec<(String, String)>> {
    let mut out: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (axis, values) in axes {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut c = prefix.clone();
                    c.push((axis.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    out
}

fn describe_cell(cell: &[(String, String)]) -> String {
    if cell.is_empty() {
        return "(no matrix)".to_string();
    }
    let parts: Vec<String> = cell.iter().map(|(a, v)| format!("{a}={v}")).collect();
    format!("{{{}}}", parts.join(", "))
}

fn short_name(run: &str) -> String {
    let first = run.lines().find(|l| !l.trim().is_empty()).unwrap_or(run).trim();
    let mut name: String = first.chars().take(40).collect();
    if first.chars().count() > 40 || run.trim().lines().count() > 1 {
        name.push('…');
    }
    name
}

fn expand_all(raws: &[RawBuilder], text: &str, errs: &mut Vec<Diag>) -> Vec<Expanded> {
    let mut out: Vec<Expanded> = Vec::new();
    // name -> (index in raws, cell description, span of that builder's name)
    let mut seen: HashMap<String, (usize, String, Range<usize>)> = HashMap::new();
    for (bi, raw) in raws.iter().enumerate() {
        for cell in cells(&raw.axes) {
            let map: BTreeMap<String, String> = cell.iter().cloned().collect();
            let sub = |s: &str| template::substitute(s, &map);
            let name = sub(&raw.name.v);
            let desc = describe_cell(&cell);
            if let Some((first_bi, first_desc, first_span)) = seen.get(&name) {
                let (message, hint) = if *first_bi == bi {
                    (
                        format!(
                            "duplicate builder name `{name}`: matrix cells {first_desc} and {desc} both produce it"
                        ),
                        "use every matrix axis in the name, e.g. name = \"tests-{axis1}-{axis2}\"".to_string(),
                    )
                } else {
                    (
                        format!(
                            "duplicate builder name `{name}` ({desc}); also produced by the builder at line {} ({first_desc})",
                            line_col(text, first_span.start).0
                        ),
                        "builder names must be unique after matrix expansion".to_string(),
                    )
                };
                errs.push(Diag::new(raw.name.span.clone(), message).hint(hint));
                // One duplicate report per builder is enough.
                break;
            }
            seen.insert(name.clone(), (bi, desc, raw.name.span.clone()));
            let steps = raw
                .steps
                .iter()
                .map(|s| {
                    let run = sub(&s.run.v);
                    Step {
                        name: match &s.name {
                            Some(n) => sub(&n.v),
                            None => short_name(&run),
                        },
                        env: s.env.iter().map(|(k, v)| (k.clone(), sub(&v.v))).collect(),
                        workdir: s.workdir.as_ref().map(|w| sub(&w.v)),
                        timeout: s.timeout,
                        always: s.always,
                        run,
                    }
                })
                .collect();
            out.push(Expanded {
                builder: Builder {
                    name,
                    repo: raw.repo.v.clone(),
                    pool: raw.pool.v.clone(),
                    branches: raw.branches.clone(),
                    env: raw.env.iter().map(|(k, v)| (k.clone(), sub(&v.v))).collect(),
                    cell: map.clone(),
                    steps,
                },
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// [[scheduler]]

struct RawScheduler {
    name: Sp<String>,
    repo: Sp<String>,
    branches: Vec<String>,
    builders: Vec<Sp<String>>,
    kind: SchedulerKind,
}

fn parse_scheduler(node: &Node, index: usize) -> Result<RawScheduler, Diag> {
    let f = Fields::new(node, "[[scheduler]]")?;
    if f.get("kind").is_none() {
        // Without a kind we cannot tell which keys belong; a misspelt `kind` is the likely cause.
        let every: Vec<&str> = SCHEDULER_COMMON_KEYS.iter().chain(BRANCH_KEYS).chain(NIGHTLY_KEYS).copied().collect();
        f.allow_only(&every)?;
    }
    let kind = f.req_str("kind", "\"branch\"")?;
    let (own, other, other_kind) = match kind.v.as_str() {
        "branch" => (BRANCH_KEYS, NIGHTLY_KEYS, "nightly"),
        "nightly" => (NIGHTLY_KEYS, BRANCH_KEYS, "branch"),
        _ => {
            return Err(Diag::new(kind.span.clone(), format!("unknown scheduler kind \"{}\"", kind.v))
                .hint(format!("valid kinds: {}", SCHEDULER_KINDS.join(", "))))
        }
    };
    let allowed: Vec<&str> = SCHEDULER_COMMON_KEYS.iter().chain(own).copied().collect();
    for e in f.entries {
        if allowed.contains(&e.key.as_str()) {
            continue;
        }
        if other.contains(&e.key.as_str()) {
            return Err(Diag::new(e.key_span.clone(), format!("`{}` is not valid for a {} scheduler", e.key, kind.v))
                .hint(format!(
                    "`{}` belongs to kind = \"{other_kind}\"; {} schedulers accept: {}",
                    e.key,
                    kind.v,
                    allowed.join(", ")
                )));
        }
        return Err(unknown_key(&e.key, e.key_span.clone(), &format!("a {} [[scheduler]]", kind.v), &allowed));
    }
    let name = match f.opt_str("name")? {
        Some(n) if n.v.trim().is_empty() => return Err(Diag::new(n.span, "`name` must not be empty")),
        Some(n) => n,
        None => Sp { v: format!("{}-{index}", kind.v), span: f.span.clone() },
    };
    let repo = f.req_nonempty("repo", "\"myproject\"")?;
    let branches = globs(f.opt_str_array("branches")?, "branches")?;
    let builders = match f.opt_str_array("builders")? {
        None => {
            return Err(Diag::new(f.span.clone(), "missing required key `builders` in [[scheduler]]")
                .hint("add e.g. builders = [\"*\"] (names or globs of builders)"))
        }
        Some(b) if b.is_empty() => {
            let span = f.get("builders").map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
            return Err(Diag::new(span, "`builders` must list at least one builder").hint("e.g. builders = [\"*\"]"));
        }
        Some(b) => {
            for p in &b {
                check_glob(p, "builders")?;
            }
            b
        }
    };
    let kind = match kind.v.as_str() {
        "branch" => SchedulerKind::Branch {
            tree_stable: f.opt_duration("tree_stable")?.filter(|d| !d.is_zero()),
            files: globs(f.opt_str_array("files")?, "files")?,
            ignore: globs(f.opt_str_array("ignore")?, "ignore")?,
        },
        _ => {
            let cron = f.req_str("cron", "\"0 3 * * *\"")?;
            check_cron(&cron)?;
            SchedulerKind::Nightly { cron: cron.v, only_if_changed: f.opt_bool("only_if_changed")?.unwrap_or(false) }
        }
    };
    Ok(RawScheduler { name, repo, branches, builders, kind })
}

fn check_cron(cron: &Sp<String>) -> Result<(), Diag> {
    const HINT: &str = "5 fields, UTC: minute hour day-of-month month day-of-week, e.g. \"0 3 * * *\" for 03:00 daily";
    let fields = cron.v.split_whitespace().count();
    if fields != 5 {
        return Err(Diag::new(
            cron.span.clone(),
            format!("invalid cron \"{}\": expected 5 fields, found {fields}", cron.v),
        )
        .hint(HINT));
    }
    croner::Cron::new(&cron.v)
        .parse()
        .map_err(|e| Diag::new(cron.span.clone(), format!("invalid cron \"{}\": {e}", cron.v)).hint(HINT))?;
    Ok(())
}

fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Resolve the scheduler's builder patterns against the expanded builders of its repo.
///
/// A plain name must be a builder of the scheduler's repo; a glob only picks builders of that
/// repo (so `"*"` is fine in a multi-repo config) but must pick at least one.
fn resolve_scheduler(s: &RawScheduler, builders: &[Expanded]) -> Result<Scheduler, Diag> {
    let mut names: Vec<String> = Vec::new();
    let all: Vec<&str> = builders.iter().map(|b| b.builder.name.as_str()).collect();
    for pat in &s.builders {
        let matcher = check_glob(pat, "builders")?;
        let matched: Vec<&Expanded> = builders.iter().filter(|b| matcher.is_match(&b.builder.name)).collect();
        if matched.is_empty() {
            let mut hint = String::new();
            if let Some(best) = super::tree::closest(&pat.v, &all) {
                hint.push_str(&format!("did you mean `{best}`? "));
            }
            if all.is_empty() {
                hint.push_str("no builders are defined");
            } else {
                let shown: Vec<&str> = all.iter().take(12).copied().collect();
                hint.push_str(&format!(
                    "builders: {}{}",
                    shown.join(", "),
                    if all.len() > shown.len() { ", …" } else { "" }
                ));
            }
            return Err(
                Diag::new(pat.span.clone(), format!("builder pattern \"{}\" matches no builder", pat.v)).hint(hint)
            );
        }
        let same_repo: Vec<&Expanded> = matched.iter().copied().filter(|b| b.builder.repo == s.repo.v).collect();
        let wrong_repo = matched.iter().find(|b| b.builder.repo != s.repo.v);
        if let (true, Some(b)) = (same_repo.is_empty() || !has_glob_meta(&pat.v), wrong_repo) {
            return Err(Diag::new(
                pat.span.clone(),
                format!(
                    "builder `{}` builds repo `{}`, but this scheduler watches repo `{}`",
                    b.builder.name, b.builder.repo, s.repo.v
                ),
            )
            .hint("a scheduler can only trigger builders of its own repo"));
        }
        for b in same_repo {
            if !names.contains(&b.builder.name) {
                names.push(b.builder.name.clone());
            }
        }
    }
    Ok(Scheduler {
        name: s.name.v.clone(),
        repo: s.repo.v.clone(),
        branches: s.branches.clone(),
        builders: names,
        kind: s.kind.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_defaults() {
        assert_eq!(host_port("http://127.0.0.1:8010").unwrap(), "127.0.0.1:8010");
        assert_eq!(host_port("https://ci.example.com/x").unwrap(), "ci.example.com:443");
        assert_eq!(host_port("http://[::1]:9/").unwrap(), "[::1]:9");
        assert!(host_port("ftp://x").is_err());
        assert!(host_port("http://").is_err());
        assert!(host_port("http://h:99999").is_err());
    }

    #[test]
    fn repo_urls() {
        let b = Path::new("/etc/ci");
        assert_eq!(resolve_repo_url(b, "./demo"), "/etc/ci/demo");
        assert_eq!(resolve_repo_url(b, "/srv/r.git"), "/srv/r.git");
        assert_eq!(resolve_repo_url(b, "git@github.com:a/b.git"), "git@github.com:a/b.git");
        assert_eq!(resolve_repo_url(b, "file:///x"), "file:///x");
    }

    #[test]
    fn databases() {
        let b = Path::new("/etc/ci");
        assert_eq!(resolve_db(b, "sqlite://p.db"), "sqlite:///etc/ci/p.db");
        assert_eq!(resolve_db(b, "sqlite:p.db?mode=rwc"), "sqlite:///etc/ci/p.db?mode=rwc");
        assert_eq!(resolve_db(b, "sqlite:///abs.db"), "sqlite:///abs.db");
        assert_eq!(resolve_db(b, "sqlite::memory:"), "sqlite::memory:");
        assert_eq!(resolve_db(b, "postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn cells_first_axis_slowest() {
        let axes = vec![
            ("a".to_string(), vec!["1".to_string(), "2".to_string()]),
            ("b".to_string(), vec!["x".to_string(), "y".to_string()]),
        ];
        let c: Vec<String> = cells(&axes).iter().map(|c| describe_cell(c)).collect();
        assert_eq!(c, ["{a=1, b=x}", "{a=1, b=y}", "{a=2, b=x}", "{a=2, b=y}"]);
    }
}
