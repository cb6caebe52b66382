//! Stores incoming commits as changes and tells the schedulers: the one path that pollers,
//! the generic change hook and the GitHub webhook all share.

use crate::changes::git::CommitInfo;
use crate::store::{ChangeRow, NewChange, StoreError};

use super::{change_info, Shared};

/// Stores `commits` (oldest first) of `repo`/`branch`, moves the branch head to `head` when
/// given, and hands each newly stored change to the schedulers (a commit already stored is
/// not a new change). Storing comes first, so a crash right after loses nothing: unscheduled
/// changes are replayed at start. Callers hold the repository's lock.
pub async fn commits(
    shared: &Shared,
    repo: &str,
    branch: &str,
    head: Option<&str>,
    commits: &[CommitInfo],
    source: &str,
) -> Result<Vec<ChangeRow>, StoreError> {
    let new: Vec<NewChange> = commits
        .iter()
        .map(|c| NewChange {
            repo: repo.to_string(),
            branch: branch.to_string(),
            revision: c.revision.clone(),
            author: c.author.clone(),
            committed_at: Some(crate::store::ts_string(crate::core::Ts(c.committed_at.timestamp_millis()))),
            message: c.message.clone(),
            files: c.files.clone(),
            source: source.to_string(),
        })
        .collect();
    let rows = shared.store.record_changes(&new, head.map(|h| (repo, branch, h)), shared.now()).await?;
    for row in &rows {
        tracing::info!(change = row.id, %repo, %branch, revision = %row.revision, %source, "new change");
        shared.master.change(change_info(row)).await;
    }
    Ok(rows)
}

/// Records the head of a branch seen for the first time: nothing is built for it.
pub async fn first_head(shared: &Shared, repo: &str, branch: &str, revision: &str) -> Result<(), StoreError> {
    shared.store.set_head(repo, branch, revision, shared.now()).await?;
    tracing::info!(%repo, %branch, %revision, "branch seen for the first time; its history is not built");
    shared.master.head(repo, branch, revision).await;
    Ok(())
}
