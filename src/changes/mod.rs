//! Change sources: the git poller, the GitHub push webhook and the generic change hook.
//!
//! Nothing here touches the database: each source returns commits ([`CommitInfo`]) and branch
//! heads, and the caller stores them as changes and remembers the heads, so a restart neither
//! rebuilds old commits nor misses new ones.

pub mod git;
pub mod github;
pub mod hook;
pub mod refname;

pub use git::{branch_matches, ls_remote, poll, CommitInfo, GitError, Mirror, PollResult};
pub use github::{parse_push, repo_matches, verify_signature, PushEvent, WebhookError};
pub use hook::ChangeHook;
