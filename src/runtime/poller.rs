//! Git pollers: one task per repository with a poll interval.

use std::sync::Arc;
use std::time::Duration;

use crate::changes::git::{self, Mirror};
use crate::config::Repo;

use super::{ingest, Shared};

/// Most commits recorded for one branch in one poll or push; older ones in a huge push are
/// skipped.
pub const MAX_NEW_COMMITS: usize = 100;

/// Starts a poller for every repository that has a poll interval.
pub fn spawn_all(shared: Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    shared
        .config
        .repos
        .iter()
        .filter_map(|repo| {
            let interval = repo.poll?;
            let shared = shared.clone();
            let repo = repo.clone();
            Some(tokio::spawn(async move { poll_forever(shared, repo, interval).await }))
        })
        .collect()
}

async fn poll_forever(shared: Arc<Shared>, repo: Repo, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    // Refused branch names already warned about: a remote that keeps advertising one is
    // reported once, not at every poll.
    let mut warned = std::collections::HashSet::new();
    loop {
        tick.tick().await;
        match poll_once(&shared, &repo).await {
            Ok(refused) => {
                failures = 0;
                for why in refused {
                    if warned.insert(why.clone()) {
                        tracing::warn!(repo = %repo.name, "skipping a branch the remote advertised: {why}");
                    }
                }
            }
            Err(e) => {
                failures += 1;
                // Say it once, then quietly until it recovers, so a dead remote does not flood the log.
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(repo = %repo.name, failures, "poll failed: {e}");
                }
            }
        }
    }
}

/// Polls one repository once: records first-seen heads and new commits; returns why branches
/// were skipped (names git's rules refuse, escaped).
pub async fn poll_once(shared: &Shared, repo: &Repo) -> Result<Vec<String>, PollError> {
    let _guard = shared.lock_repo(&repo.name).await;
    let mirror = Mirror::new(shared.mirror_dir(&repo.name), repo.url.clone());
    mirror.ensure().await?;
    let known = shared.store.heads(&repo.name).await?;
    let result = git::poll(&mirror, &repo.branches, &known, MAX_NEW_COMMITS).await?;
    for branch in &result.first_seen {
        if let Some(head) = result.heads.get(branch) {
            ingest::first_head(shared, &repo.name, branch, head).await?;
        }
    }
    let mut by_branch: std::collections::BTreeMap<&str, Vec<git::CommitInfo>> = std::collections::BTreeMap::new();
    for (branch, commit) in &result.new {
        by_branch.entry(branch.as_str()).or_default().push(commit.clone());
    }
    for (branch, commits) in by_branch {
        if let Some(head) = result.heads.get(branch) {
            ingest::commits(shared, &repo.name, branch, Some(head), &commits, "poller").await?;
        }
    }
    for branch in &result.deleted {
        tracing::info!(repo = %repo.name, %branch, "branch deleted or no longer watched");
        shared.store.delete_head(&repo.name, branch).await?;
    }
    Ok(result.refused)
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Git(#[from] git::GitError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}
