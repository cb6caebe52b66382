//! `[[scheduler]]`: what starts builds (every change, or a cron), checked against the builders.

use super::*;

pub(super) fn parse_scheduler(node: &Node, index: usize) -> Result<RawScheduler, Diag> {
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

pub(super) fn check_cron(cron: &Sp<String>) -> Result<(), Diag> {
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

pub(super) fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Resolve the scheduler's builder patterns against the expanded builders of its repo.
///
/// A plain name must be a builder of the scheduler's repo; a glob only picks builders of that
/// repo (so `"*"` is fine in a multi-repo config) but must pick at least one.
pub(super) fn resolve_scheduler(s: &RawScheduler, builders: &[Expanded]) -> Result<Scheduler, Diag> {
    let mut names: Vec<String> = Vec::new();
    let all: Vec<&str> = builders.iter().map(|b| b.builder.name.as_str()).collect();
    for pat in &s.builders {
        let matcher = check_glob(pat, "builders")?;
        let matched: Vec<&Expanded> = builders.iter().filter(|b| matcher.is_match(&b.builder.name)).collect();
        if matched.is_empty() {
            let mut hint = String::new();
            if let Some(best) = crate::config::tree::closest(&pat.v, &all) {
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
