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
    Branch {
        tree_stable: Option<Duration>,
        files: Vec<String>,
        ignore: Vec<String>,
    },
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
    /// Files touched (empty = unknown, always interesting).
    pub files: Vec<String>,
}

/// Something that happened, fed to [`Schedulers::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum SchedEvent {
    /// A new change was stored.
    Change(ChangeInfo),
    /// The current head of a branch, known without a change (e.g. recorded on first poll).
    Head {
        repo: String,
        branch: String,
        revision: String,
    },
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
        let g = Glob::new(p).map_err(|e| SpecError {
            scheduler: scheduler.to_string(),
            message: format!("bad glob {p:?}: {e}"),
        })?;
        b.add(g);
    }
    b.build().map(Some).map_err(|e| SpecError {
        scheduler: scheduler.to_string(),
        message: e.to_string(),
    })
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
        self.builders
            .iter()
            .filter(|(_, g)| matches(g, branch))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Does a change pass the file filters? A change with no files listed always does.
fn interesting(files: &Option<GlobSet>, ignore: &Option<GlobSet>, c: &ChangeInfo) -> bool {
    if c.files.is_empty() {
        return true;
    }
    if let Some(f) = files {
        if !c.files.iter().any(|p| f.is_match(p)) {
            return false;
        }
    }
    if let Some(i) = ignore {
        if c.files.iter().all(|p| i.is_match(p)) {
            return false;
        }
    }
    true
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
            let kind = match spec.kind {
                SpecKind::Branch {
                    tree_stable,
                    files,
                    ignore,
                } => Kind::Branch {
                    tree_stable,
                    files: globs(&name, &files)?,
                    ignore: globs(&name, &ignore)?,
                    bursts: BTreeMap::new(),
                },
                SpecKind::Nightly {
                    cron,
                    only_if_changed,
                } => {
                    let c = Cron::new(&cron).parse().map_err(|e| SpecError {
                        scheduler: name.clone(),
                        message: format!("bad cron {cron:?}: {e}"),
                    })?;
                    let next_fire = next_after(&c, now);
                    Kind::Nightly {
                        cron: Box::new(c),
                        only_if_changed,
                        next_fire,
                        built: BTreeMap::new(),
                    }
                }
            };
            scheds.push(Sched {
                branches: globs(&name, &spec.branches)?,
                name,
                repo: spec.repo,
                builders,
                kind,
            });
        }
        Ok(Schedulers {
            scheds,
            heads: HashMap::new(),
            holders: HashMap::new(),
        })
    }

    /// Restore a nightly's persisted state after a restart: the next fire is the first cron
    /// time strictly after `last_fire`. Unknown or non-nightly names are ignored.
    pub fn restore_nightly(
        &mut self,
        scheduler: &str,
        last_fire: Ts,
        built: BTreeMap<String, String>,
    ) {
        for s in &mut self.scheds {
            if s.name != scheduler {
                continue;
            }
            if let Kind::Nightly {
                cron,
                next_fire,
                built: b,
                ..
            } = &mut s.kind
            {
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
            SchedEvent::Head {
                repo,
                branch,
                revision,
            } => {
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

    /// Changes still held by a tree-stable burst (not yet in `ChangesDone`).
    pub fn pending_changes(&self) -> usize {
        self.holders.len()
    }

    fn change(&mut self, c: ChangeInfo, now: Ts, out: &mut Vec<SchedAction>) {
        self.heads
            .entry(c.repo.clone())
            .or_default()
            .insert(c.branch.clone(), c.revision.clone());
        let mut held = 0u32;
        for s in &mut self.scheds {
            if s.repo != c.repo || !matches(&s.branches, &c.branch) {
                continue;
            }
            let builders = s.builders_for(&c.branch);
            let Kind::Branch {
                tree_stable,
                files,
                ignore,
                bursts,
            } = &mut s.kind
            else {
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
                    let due: Vec<String> = bursts
                        .iter()
                        .filter(|(_, b)| b.deadline <= now)
                        .map(|(k, _)| k.clone())
                        .collect();
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
                        let builders: Vec<String> = s
                            .builders
                            .iter()
                            .filter(|(_, g)| matches(g, &branch))
                            .map(|(n, _)| n.clone())
                            .collect();
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
                Kind::Nightly {
                    cron,
                    only_if_changed,
                    next_fire,
                    built,
                } => {
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
                            let builders: Vec<String> = s
                                .builders
                                .iter()
                                .filter(|(_, g)| matches(g, branch))
                                .map(|(n, _)| n.clone())
                                .collect();
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
