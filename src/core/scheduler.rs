//! Schedulers: turn changes and the calendar into build requests.
//!
//! The branch scheduler asks for one build per (builder, branch) per interesting change, folding
//! bursts inside its tree-stable window into one build of the newest revision and applying file
//! filters; the nightly scheduler fires on a cron schedule, optionally only for branches that
//! changed since its last run.

use super::{ChangeId, Ts};

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use croner::Cron;
use globset::{Glob, GlobSet, GlobSetBuilder};

/// A builder as the scheduler sees it: its name and the branches it may build.
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderRef {
    /// Expanded builder name.
    pub name: String,
    /// Branch globs; empty = any branch.
    pub branches: Vec<String>,
}

/// One scheduler's settings (built by the shell from the config).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerSpec {
    /// Unique scheduler name (for state and reasons).
    pub name: String,
    /// The repository whose changes it watches.
    pub repo: String,
    /// Branch globs; empty = every branch of the repo.
    pub branches: Vec<String>,
    /// Builders it requests.
    pub builders: Vec<BuilderRef>,
    /// Branch or nightly settings.
    pub kind: SpecKind,
}

/// The kind-specific part of a [`SchedulerSpec`].
#[derive(Debug, Clone, PartialEq)]
pub enum SpecKind {
    /// One request per interesting change (or per tree-stable burst).
    Branch { tree_stable: Option<Duration>, files: Vec<String>, ignore: Vec<String> },
    /// Fires on a cron schedule for every matching branch.
    Nightly {
        /// 5-field cron expression, UTC.
        cron: String,
        only_if_changed: bool,
    },
}

/// A change as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeInfo {
    /// Stored change id.
    pub id: ChangeId,
    /// Repository name.
    pub repo: String,
    /// Branch the commit landed on.
    pub branch: String,
    /// Commit id.
    pub revision: String,
    /// Files touched (empty, with no `unlisted_files` either = unknown, always interesting).
    pub files: Vec<String>,
    /// Files touched whose paths are not known (a trace that gives only a count): they match
    /// no `files` filter and are not covered by `ignore`.
    pub unlisted_files: u32,
}

/// Something that happened, fed to [`Schedulers::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum SchedEvent {
    /// A new change was stored.
    Change(ChangeInfo),
    /// The current head of a branch, known without a change (e.g. recorded on first poll).
    Head { repo: String, branch: String, revision: String },
    /// Time passed: fire due tree-stable timers and nightlies.
    Tick,
}

/// A request for builds, produced by a scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The scheduler that asked.
    pub scheduler: String,
    /// Repository to build.
    pub repo: String,
    /// Branch to build.
    pub branch: String,
    /// Revision to build.
    pub revision: String,
    /// Builders (expanded names) to build, already filtered by each builder's branches.
    pub builders: Vec<String>,
    /// The changes this request covers (empty for nightlies).
    pub changes: Vec<ChangeId>,
    /// Human-readable: "change 12 on main", "nightly", …
    pub reason: String,
}

/// What the shell must do, returned by [`Schedulers::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum SchedAction {
    /// Store build requests for these builders.
    Request(Request),
    /// These changes have been fully considered by every scheduler (mark them so a restart
    /// does not replay them).
    ChangesDone(Vec<ChangeId>),
    /// Persist a nightly's state so a restart neither repeats nor skips it.
    NightlyState {
        scheduler: String,
        last_fire: Ts,
        /// branch -> revision built at the last nightly.
        built: BTreeMap<String, String>,
    },
}

/// Error in a scheduler spec (bad glob or cron expression).
#[derive(Debug, thiserror::Error)]
#[error("scheduler {scheduler}: {message}")]
pub struct SpecError {
    /// The offending scheduler.
    pub scheduler: String,
    /// What is wrong.
    pub message: String,
}

/// All configured schedulers plus what they remember (branch heads, pending bursts, nightly
/// state).
#[derive(Debug, Clone)]
pub struct Schedulers {
    scheds: Vec<Sched>,
    /// repo -> branch -> latest known revision (from changes and heads), for nightlies.
    heads: HashMap<String, BTreeMap<String, String>>,
    /// Change -> how many tree-stable bursts still hold it.
    holders: HashMap<ChangeId, u32>,
}

#[derive(Debug, Clone)]
struct Sched {
    name: String,
    repo: String,
    /// None = every branch.
    branches: Option<GlobSet>,
    /// (builder name, its branch globs; None = any branch).
    builders: Vec<(String, Option<GlobSet>)>,
    kind: Kind,
    /// The spec as written, to explain decisions in its own words.
    spec: SchedulerSpec,
}

#[derive(Debug, Clone)]
enum Kind {
    Branch {
        tree_stable: Option<Duration>,
        files: Option<GlobSet>,
        ignore: Option<GlobSet>,
        /// branch -> burst waiting for the tree to be stable.
        bursts: BTreeMap<String, Burst>,
    },
    Nightly {
        cron: Box<Cron>,
        only_if_changed: bool,
        next_fire: Option<Ts>,
        built: BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone)]
struct Burst {
    deadline: Ts,
    revision: String,
    changes: Vec<ChangeId>,
    interesting: bool,
}

fn globs(scheduler: &str, pats: &[String]) -> Result<Option<GlobSet>, SpecError> {
    if pats.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in pats {
        let g = Glob::new(p)
            .map_err(|e| SpecError { scheduler: scheduler.to_string(), message: format!("bad glob {p:?}: {e}") })?;
        b.add(g);
    }
    b.build().map(Some).map_err(|e| SpecError { scheduler: scheduler.to_string(), message: e.to_string() })
}

fn matches(set: &Option<GlobSet>, s: &str) -> bool {
    set.as_ref().is_none_or(|g| g.is_match(s))
}

/// The first cron time strictly after `t` (whole seconds; cron has minute granularity).
fn next_after(cron: &Cron, t: Ts) -> Option<Ts> {
    let start = chrono::DateTime::from_timestamp(t.0.div_euclid(1000), 0)?;
    let next = cron.find_next_occurrence(&start, false).ok()?;
    Some(Ts(next.timestamp().checked_mul(1000)?))
}

impl Sched {
    fn builders_for(&self, branch: &str) -> Vec<String> {
        self.builders.iter().filter(|(_, g)| matches(g, branch)).map(|(n, _)| n.clone()).collect()
    }
}

/// Does a change pass the file filters? A change with no files listed always does.
fn interesting(files: &Option<GlobSet>, ignore: &Option<GlobSet>, c: &ChangeInfo) -> bool {
    filtered_out(files, ignore, c).is_none()
}

/// Why the file filters drop a change, or `None` when it passes them.
fn filtered_out(files: &Option<GlobSet>, ignore: &Option<GlobSet>, c: &ChangeInfo) -> Option<Filtered> {
    if c.files.is_empty() && c.unlisted_files == 0 {
        return None;
    }
    if let Some(f) = files {
        if !c.files.iter().any(|p| f.is_match(p)) {
            return Some(Filtered::NoneMatch);
        }
    }
    if let Some(i) = ignore {
        if c.unlisted_files == 0 && c.files.iter().all(|p| i.is_match(p)) {
            return Some(Filtered::AllIgnored);
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Filtered {
    NoneMatch,
    AllIgnored,
}

/// Whether one builder would start for one change, and why (the config's dry run).
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The scheduler that decided.
    pub scheduler: String,
    /// The builder it decided for.
    pub builder: String,
    /// A build would be requested (at once, or once the tree is stable).
    pub starts: bool,
    /// In words, naming the setting that decided.
    pub why: String,
}

fn list(pats: &[String]) -> String {
    pats.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
}

impl Schedulers {
    /// Compile the specs; nightlies first fire at their first cron time strictly after `now`.
    pub fn new(specs: Vec<SchedulerSpec>, now: Ts) -> Result<Schedulers, SpecError> {
        let mut scheds = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = spec.name.clone();
            let mut builders = Vec::with_capacity(spec.builders.len());
            for b in &spec.builders {
                builders.push((b.name.clone(), globs(&name, &b.branches)?));
            }
            let kind = match &spec.kind {
                SpecKind::Branch { tree_stable, files, ignore } => Kind::Branch {
                    tree_stable: *tree_stable,
                    files: globs(&name, files)?,
                    ignore: globs(&name, ignore)?,
                    bursts: BTreeMap::new(),
                },
                SpecKind::Nightly { cron, only_if_changed } => {
                    let c = Cron::new(cron).parse().map_err(|e| SpecError {
                        scheduler: name.clone(),
                        message: format!("bad cron {cron:?}: {e}"),
                    })?;
                    let next_fire = next_after(&c, now);
                    Kind::Nightly {
                        cron: Box::new(c),
                        only_if_changed: *only_if_changed,
                        next_fire,
                        built: BTreeMap::new(),
                    }
                }
            };
            scheds.push(Sched {
                branches: globs(&name, &spec.branches)?,
                name,
                repo: spec.repo.clone(),
                builders,
                kind,
                spec,
            });
        }
        Ok(Schedulers { scheds, heads: HashMap::new(), holders: HashMap::new() })
    }

    /// Restore a nightly's persisted state after a restart: the next fire is the first cron
    /// time strictly after `last_fire`. Unknown or non-nightly names are ignored.
    pub fn restore_nightly(&mut self, scheduler: &str, last_fire: Ts, built: BTreeMap<String, String>) {
        for s in &mut self.scheds {
            if s.name != scheduler {
                continue;
            }
            if let Kind::Nightly { cron, next_fire, built: b, .. } = &mut s.kind {
                *next_fire = next_after(cron, last_fire);
                *b = built.clone();
            }
        }
    }

    /// Feed one event; returns requests to store, changes that are done, and nightly state.
    pub fn handle(&mut self, event: SchedEvent, now: Ts) -> Vec<SchedAction> {
        let mut out = Vec::new();
        match event {
            SchedEvent::Change(c) => self.change(c, now, &mut out),
            SchedEvent::Head { repo, branch, revision } => {
                self.heads.entry(repo).or_default().insert(branch, revision);
            }
            SchedEvent::Tick => self.tick(now, &mut out),
        }
        out
    }

    /// When the next tree-stable timer or nightly is due; `None` if nothing is pending.
    pub fn next_wakeup(&self) -> Option<Ts> {
        let mut next: Option<Ts> = None;
        let mut consider = |t: Ts| next = Some(next.map_or(t, |n| n.min(t)));
        for s in &self.scheds {
            match &s.kind {
                Kind::Branch { bursts, .. } => bursts.values().for_each(|b| consider(b.deadline)),
                Kind::Nightly { next_fire, .. } => {
                    if let Some(t) = next_fire {
                        consider(*t)
                    }
                }
            }
        }
        next
    }

    /// For one change, every (scheduler, builder) pair and whether it would start a build,
    /// by the same rules [`Schedulers::handle`] applies (the config's dry run).
    pub fn explain(&self, c: &ChangeInfo) -> Vec<Explanation> {
        let mut out = Vec::new();
        for s in &self.scheds {
            let why_not_scheduler = if s.repo != c.repo {
                Some(format!("scheduler {}: watches repo {}, not {}", s.name, s.repo, c.repo))
            } else if !matches(&s.branches, &c.branch) {
                Some(format!(
                    "scheduler {}: branch {} is not among its branches ({})",
                    s.name,
                    c.branch,
                    list(&s.spec.branches)
                ))
            } else {
                None
            };
            let filtered = match &s.kind {
                Kind::Branch { files, ignore, .. } => filtered_out(files, ignore, c),
                Kind::Nightly { .. } => None,
            };
            for (i, (builder, globs)) in s.builders.iter().enumerate() {
                let pats = s.spec.builders.get(i).map(|b| b.branches.as_slice()).unwrap_or_default();
                let (starts, why) = if let Some(w) = &why_not_scheduler {
                    (false, w.clone())
                } else if !matches(globs, &c.branch) {
                    (false, format!("scheduler {}: the builder builds only branches {}", s.name, list(pats)))
                } else {
                    match (&s.spec.kind, filtered) {
                        (SpecKind::Nightly { cron, .. }, _) => (
                            false,
                            format!(
                                "scheduler {}: nightly ({cron}), it builds on its schedule, not per change",
                                s.name
                            ),
                        ),
                        (SpecKind::Branch { files, .. }, Some(Filtered::NoneMatch)) => (
                            false,
                            format!("scheduler {}: no file of the change matches its files ({})", s.name, list(files)),
                        ),
                        (SpecKind::Branch { ignore, .. }, Some(Filtered::AllIgnored)) => (
                            false,
                            format!(
                                "scheduler {}: every file of the change is in its ignore ({})",
                                s.name,
                                list(ignore)
                            ),
                        ),
                        (SpecKind::Branch { tree_stable: Some(w), .. }, None) => (
                            true,
                            format!(
                                "scheduler {}: builds it once the branch has been quiet for {}",
                                s.name,
                                super::format_duration(*w)
                            ),
                        ),
                        (SpecKind::Branch { tree_stable: None, .. }, None) => {
                            let files = match &s.spec.kind {
                                SpecKind::Branch { files, .. } if !files.is_empty() => {
                                    format!(" that touches its files ({})", list(files))
                                }
                                _ => String::new(),
                            };
                            (true, format!("scheduler {}: builds every change on {}{files}", s.name, c.branch))
                        }
                    }
                };
                out.push(Explanation { scheduler: s.name.clone(), builder: builder.clone(), starts, why });
            }
        }
        out
    }

    /// Changes still held by a tree-stable burst (not yet in `ChangesDone`).
    pub fn pending_changes(&self) -> usize {
        self.holders.len()
    }

    fn change(&mut self, c: ChangeInfo, now: Ts, out: &mut Vec<SchedAction>) {
        self.heads.entry(c.repo.clone()).or_default().insert(c.branch.clone(), c.revision.clone());
        let mut held = 0u32;
        for s in &mut self.scheds {
            if s.repo != c.repo || !matches(&s.branches, &c.branch) {
                continue;
            }
            let builders = s.builders_for(&c.branch);
            let Kind::Branch { tree_stable, files, ignore, bursts } = &mut s.kind else {
                continue;
            };
            let hit = interesting(files, ignore, &c);
            match tree_stable {
                None => {
                    if hit && !builders.is_empty() {
                        out.push(SchedAction::Request(Request {
                            scheduler: s.name.clone(),
                            repo: c.repo.clone(),
                            branch: c.branch.clone(),
                            revision: c.revision.clone(),
                            builders,
                            changes: vec![c.id],
                            reason: format!("change {} on {}", c.id, c.branch),
                        }));
                    }
                }
                Some(window) => {
                    // Buildbot semantics: every change on the branch restarts the timer.
                    let deadline = now.plus(*window);
                    let b = bursts.entry(c.branch.clone()).or_insert_with(|| Burst {
                        deadline,
                        revision: String::new(),
                        changes: Vec::new(),
                        interesting: false,
                    });
                    b.deadline = deadline;
                    b.revision = c.revision.clone();
                    if !b.changes.contains(&c.id) {
                        b.changes.push(c.id);
                        held += 1;
                    }
                    b.interesting |= hit;
                }
            }
        }
        if held > 0 {
            *self.holders.entry(c.id).or_insert(0) += held;
        } else if !self.holders.contains_key(&c.id) {
            out.push(SchedAction::ChangesDone(vec![c.id]));
        }
    }

    fn tick(&mut self, now: Ts, out: &mut Vec<SchedAction>) {
        let mut done = Vec::new();
        for s in &mut self.scheds {
            match &mut s.kind {
                Kind::Branch { bursts, .. } => {
                    let due: Vec<String> =
                        bursts.iter().filter(|(_, b)| b.deadline <= now).map(|(k, _)| k.clone()).collect();
                    for branch in due {
                        let Some(b) = bursts.remove(&branch) else {
                            continue;
                        };
                        for id in &b.changes {
                            if let Some(n) = self.holders.get_mut(id) {
                                *n -= 1;
                                if *n == 0 {
                                    self.holders.remove(id);
                                    done.push(*id);
                                }
                            }
                        }
                        if !b.interesting {
                            continue;
                        }
                        let builders: Vec<String> =
                            s.builders.iter().filter(|(_, g)| matches(g, &branch)).map(|(n, _)| n.clone()).collect();
                        if builders.is_empty() {
                            continue;
                        }
                        let reason = if b.changes.len() == 1 {
                            format!("change {} on {} (tree stable)", b.changes[0], branch)
                        } else {
                            format!("{} changes on {} (tree stable)", b.changes.len(), branch)
                        };
                        out.push(SchedAction::Request(Request {
                            scheduler: s.name.clone(),
                            repo: s.repo.clone(),
                            branch,
                            revision: b.revision,
                            builders,
                            changes: b.changes,
                            reason,
                        }));
                    }
                }
                Kind::Nightly { cron, only_if_changed, next_fire, built } => {
                    let Some(due) = *next_fire else { continue };
                    if due > now {
                        continue;
                    }
                    // Several missed cron times fire once: the next one is after `now`.
                    *next_fire = next_after(cron, now);
                    if let Some(heads) = self.heads.get(&s.repo) {
                        for (branch, rev) in heads {
                            if !matches(&s.branches, branch) {
                                continue;
                            }
                            if *only_if_changed && built.get(branch) == Some(rev) {
                                continue;
                            }
                            let builders: Vec<String> =
                                s.builders.iter().filter(|(_, g)| matches(g, branch)).map(|(n, _)| n.clone()).collect();
                            if builders.is_empty() {
                                continue;
                            }
                            built.insert(branch.clone(), rev.clone());
                            out.push(SchedAction::Request(Request {
                                scheduler: s.name.clone(),
                                repo: s.repo.clone(),
                                branch: branch.clone(),
                                revision: rev.clone(),
                                builders,
                                changes: Vec::new(),
                                reason: format!("nightly ({})", s.name),
                            }));
                        }
                    }
                    out.push(SchedAction::NightlyState {
                        scheduler: s.name.clone(),
                        last_fire: now,
                        built: built.clone(),
                    });
                }
            }
        }
        if !done.is_empty() {
            done.sort_unstable();
            out.push(SchedAction::ChangesDone(done));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    fn builder(name: &str, branches: &[&str]) -> BuilderRef {
        BuilderRef { name: name.into(), branches: branches.iter().map(|s| s.to_string()).collect() }
    }

    fn branch_spec(name: &str, tree_stable: Option<u64>, files: &[&str], ignore: &[&str]) -> SchedulerSpec {
        SchedulerSpec {
            name: name.into(),
            repo: "r".into(),
            branches: vec![],
            builders: vec![builder("all", &[]), builder("main-only", &["main"])],
            kind: SpecKind::Branch {
                tree_stable: tree_stable.map(Duration::from_secs),
                files: files.iter().map(|s| s.to_string()).collect(),
                ignore: ignore.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    fn change(id: ChangeId, branch: &str, rev: &str, files: &[&str]) -> SchedEvent {
        SchedEvent::Change(ChangeInfo {
            id,
            unlisted_files: 0,
            repo: "r".into(),
            branch: branch.into(),
            revision: rev.into(),
            files: files.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn requests(a: &[SchedAction]) -> Vec<&Request> {
        a.iter()
            .filter_map(|a| match a {
                SchedAction::Request(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn done(a: &[SchedAction]) -> Vec<ChangeId> {
        a.iter()
            .flat_map(|a| match a {
                SchedAction::ChangesDone(v) => v.clone(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn immediate_request_filtered_by_builder_branches() {
        let mut s = Schedulers::new(vec![branch_spec("b", None, &[], &[])], Ts(0)).unwrap();
        let a = s.handle(change(1, "main", "aaa", &["src/x.rs"]), Ts(0));
        let r = requests(&a);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].builders, vec!["all", "main-only"]);
        assert_eq!(r[0].revision, "aaa");
        assert_eq!(r[0].changes, vec![1]);
        assert_eq!(done(&a), vec![1]);
        let a = s.handle(change(2, "feature", "bbb", &[]), Ts(0));
        assert_eq!(requests(&a)[0].builders, vec!["all"]);
    }

    #[test]
    fn tree_stable_folds_burst_into_newest() {
        let mut s = Schedulers::new(vec![branch_spec("b", Some(15), &[], &[])], Ts(0)).unwrap();
        let a = s.handle(change(1, "main", "old", &[]), Ts(0));
        assert!(a.is_empty(), "held, not done yet: {a:?}");
        assert_eq!(s.next_wakeup(), Some(Ts(15 * S)));
        s.handle(change(2, "main", "new", &[]), Ts(10 * S));
        // The second change restarts the timer.
        assert_eq!(s.next_wakeup(), Some(Ts(25 * S)));
        assert!(s.handle(SchedEvent::Tick, Ts(20 * S)).is_empty());
        let a = s.handle(SchedEvent::Tick, Ts(25 * S));
        let r = requests(&a);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].revision, "new");
        assert_eq!(r[0].changes, vec![1, 2]);
        assert_eq!(done(&a), vec![1, 2]);
        assert_eq!(s.next_wakeup(), None);
    }

    #[test]
    fn tree_stable_branches_are_independent() {
        let mut s = Schedulers::new(vec![branch_spec("b", Some(15), &[], &[])], Ts(0)).unwrap();
        s.handle(change(1, "main", "m1", &[]), Ts(0));
        s.handle(change(2, "dev", "d1", &[]), Ts(10 * S));
        let a = s.handle(SchedEvent::Tick, Ts(15 * S));
        assert_eq!(requests(&a).len(), 1);
        assert_eq!(requests(&a)[0].branch, "main");
        assert_eq!(done(&a), vec![1]);
    }

    #[test]
    fn files_filter() {
        let mut s = Schedulers::new(vec![branch_spec("docs", None, &["docs/**"], &[])], Ts(0)).unwrap();
        let a = s.handle(change(1, "main", "a", &["src/lib.rs"]), Ts(0));
        assert!(requests(&a).is_empty());
        assert_eq!(done(&a), vec![1]);
        let a = s.handle(change(2, "main", "b", &["src/lib.rs", "docs/index.rst"]), Ts(0));
        assert_eq!(requests(&a).len(), 1);
        let a = s.handle(change(3, "main", "c", &[]), Ts(0));
        assert_eq!(requests(&a).len(), 1, "no file list = interesting");
    }

    #[test]
    fn ignore_filter() {
        let mut s = Schedulers::new(vec![branch_spec("code", None, &[], &["docs/**"])], Ts(0)).unwrap();
        let a = s.handle(change(1, "main", "a", &["docs/a.rst", "docs/b.rst"]), Ts(0));
        assert!(requests(&a).is_empty());
        let a = s.handle(change(2, "main", "b", &["docs/a.rst", "setup.py"]), Ts(0));
        assert_eq!(requests(&a).len(), 1);
    }

    #[test]
    fn uninteresting_burst_is_done_without_request() {
        let mut s = Schedulers::new(vec![branch_spec("code", Some(5), &[], &["docs/**"])], Ts(0)).unwrap();
        s.handle(change(1, "main", "a", &["docs/a.rst"]), Ts(0));
        let a = s.handle(SchedEvent::Tick, Ts(5 * S));
        assert!(requests(&a).is_empty());
        assert_eq!(done(&a), vec![1]);
        // One interesting change makes the whole burst build, at the newest revision.
        s.handle(change(2, "main", "b", &["x.c"]), Ts(10 * S));
        s.handle(change(3, "main", "c", &["docs/a.rst"]), Ts(11 * S));
        let a = s.handle(SchedEvent::Tick, Ts(16 * S));
        assert_eq!(requests(&a)[0].revision, "c");
    }

    #[test]
    fn other_repo_and_branch_globs() {
        let mut spec = branch_spec("b", None, &[], &[]);
        spec.branches = vec!["stable/*".into()];
        let mut s = Schedulers::new(vec![spec], Ts(0)).unwrap();
        let a = s.handle(change(1, "main", "a", &[]), Ts(0));
        assert!(requests(&a).is_empty());
        assert_eq!(done(&a), vec![1]);
        assert_eq!(requests(&s.handle(change(2, "stable/5.2.x", "b", &[]), Ts(0))).len(), 1);
        let a = s.handle(
            SchedEvent::Change(ChangeInfo {
                id: 3,
                unlisted_files: 0,
                repo: "other".into(),
                branch: "stable/1".into(),
                revision: "c".into(),
                files: vec![],
            }),
            Ts(0),
        );
        assert!(requests(&a).is_empty());
        assert_eq!(done(&a), vec![3]);
    }

    fn nightly(only_if_changed: bool) -> SchedulerSpec {
        SchedulerSpec {
            name: "n".into(),
            repo: "r".into(),
            branches: vec!["main".into(), "stable/*".into()],
            builders: vec![builder("all", &[])],
            kind: SpecKind::Nightly { cron: "0 3 * * *".into(), only_if_changed },
        }
    }

    const DAY: i64 = 86_400 * S;
    const THREE_AM: i64 = 3 * 3600 * S;

    #[test]
    fn nightly_fires_at_time_and_skips_unchanged() {
        let mut s = Schedulers::new(vec![nightly(true)], Ts(0)).unwrap();
        assert_eq!(s.next_wakeup(), Some(Ts(THREE_AM)));
        s.handle(SchedEvent::Head { repo: "r".into(), branch: "main".into(), revision: "m1".into() }, Ts(0));
        s.handle(change(1, "stable/1", "s1", &[]), Ts(0));
        s.handle(change(2, "feature", "f1", &[]), Ts(0));
        assert!(s.handle(SchedEvent::Tick, Ts(THREE_AM - 1)).is_empty());
        let a = s.handle(SchedEvent::Tick, Ts(THREE_AM));
        let r = requests(&a);
        assert_eq!(r.len(), 2, "feature does not match the nightly's branches");
        assert_eq!((r[0].branch.as_str(), r[0].revision.as_str()), ("main", "m1"));
        assert_eq!((r[1].branch.as_str(), r[1].revision.as_str()), ("stable/1", "s1"));
        assert!(a.iter().any(|a| matches!(a, SchedAction::NightlyState { last_fire, built, .. }
            if *last_fire == Ts(THREE_AM) && built.len() == 2)));
        assert_eq!(s.next_wakeup(), Some(Ts(DAY + THREE_AM)));
        // Next night: only main changed.
        s.handle(change(3, "main", "m2", &[]), Ts(DAY));
        let a = s.handle(SchedEvent::Tick, Ts(DAY + THREE_AM + 5 * S));
        let r = requests(&a);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].revision, "m2");
        assert!(a.iter().any(|a| matches!(a, SchedAction::NightlyState { .. })));
    }

    #[test]
    fn nightly_without_only_if_changed_rebuilds() {
        let mut s = Schedulers::new(vec![nightly(false)], Ts(0)).unwrap();
        s.handle(change(1, "main", "m1", &[]), Ts(0));
        assert_eq!(requests(&s.handle(SchedEvent::Tick, Ts(THREE_AM))).len(), 1);
        assert_eq!(requests(&s.handle(SchedEvent::Tick, Ts(DAY + THREE_AM))).len(), 1);
    }

    #[test]
    fn nightly_missed_times_fire_once() {
        let mut s = Schedulers::new(vec![nightly(false)], Ts(0)).unwrap();
        s.handle(change(1, "main", "m1", &[]), Ts(0));
        let a = s.handle(SchedEvent::Tick, Ts(5 * DAY));
        assert_eq!(requests(&a).len(), 1);
        assert_eq!(s.next_wakeup(), Some(Ts(5 * DAY + THREE_AM)));
    }

    #[test]
    fn nightly_restore() {
        let mut s = Schedulers::new(vec![nightly(true)], Ts(THREE_AM + S)).unwrap();
        let built: BTreeMap<String, String> = [("main".to_string(), "m1".to_string())].into();
        s.restore_nightly("n", Ts(THREE_AM), built);
        assert_eq!(s.next_wakeup(), Some(Ts(DAY + THREE_AM)));
        s.handle(change(1, "main", "m1", &[]), Ts(THREE_AM + 2 * S));
        let a = s.handle(SchedEvent::Tick, Ts(DAY + THREE_AM));
        assert!(requests(&a).is_empty(), "already built m1");
    }

    #[test]
    fn bad_specs_are_errors() {
        let mut n = nightly(false);
        n.kind = SpecKind::Nightly { cron: "not a cron".into(), only_if_changed: false };
        assert!(Schedulers::new(vec![n], Ts(0)).is_err());
        let b = branch_spec("b", None, &["a["], &[]);
        let e = Schedulers::new(vec![b], Ts(0)).unwrap_err();
        assert_eq!(e.scheduler, "b");
    }

    #[test]
    fn change_held_by_two_schedulers_done_once_both_fire() {
        let specs = vec![branch_spec("a", Some(5), &[], &[]), branch_spec("b", Some(10), &[], &[])];
        let mut s = Schedulers::new(specs, Ts(0)).unwrap();
        s.handle(change(1, "main", "x", &[]), Ts(0));
        let a = s.handle(SchedEvent::Tick, Ts(5 * S));
        assert_eq!(requests(&a).len(), 1);
        assert!(done(&a).is_empty());
        let a = s.handle(SchedEvent::Tick, Ts(10 * S));
        assert_eq!(done(&a), vec![1]);
    }
}
