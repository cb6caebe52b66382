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

mod builder;
mod master;
mod notifier;
mod pool;
mod scheduler;

use builder::*;
use master::*;
use notifier::*;
use pool::*;
use scheduler::*;

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
    "lease_ttl",
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

// ---------------------------------------------------------------------------------------------
// matrix expansion

/// An expanded builder (kept as a struct so cross-checks can grow extra context).
struct Expanded {
    builder: Builder,
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
