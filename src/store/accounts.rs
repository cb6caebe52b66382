//! Users, browser sessions, API tokens and paused pools.

use super::{params, Row};
use serde::Serialize;

use super::{all, exec, opt, ts_string, Result, Store};
use crate::accounts::Role;
use crate::core::Ts;

/// A user, without the password hash.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserRow {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub created_at: String,
}

/// A logged-in browser session: whose it is and the CSRF token its forms carry.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub user: UserRow,
    pub csrf: String,
    pub expires_at: String,
}

/// An API token's public facts (never the secret or its hash).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenRow {
    pub id: i64,
    pub user: String,
    pub name: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

/// A pool an admin paused.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PauseRow {
    pub pool: String,
    pub paused_by: String,
    pub paused_at: String,
}

fn user_row(r: &Row<'_>) -> Result<UserRow> {
    let role: String = r.get("role")?;
    Ok(UserRow {
        id: r.get("id")?,
        name: r.get("name")?,
        // The column's CHECK constraint admits only the three names.
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        created_at: r.get("created_at")?,
    })
}

fn token_row(r: &Row<'_>) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.get("id")?,
        user: r.get("user")?,
        name: r.get("name")?,
        created_at: r.get("created_at")?,
        last_used_at: r.get("last_used_at")?,
    })
}

impl Store {
    /// Adds a user; `false` if the name is taken.
    pub async fn add_user(&self, name: &str, role: Role, password_hash: &str, now: Ts) -> Result<bool> {
        let done = self.write(|c| {
            exec(
                c,
                "INSERT INTO users (name, role, password_hash, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                params![name, role.as_str(), password_hash, ts_string(now)],
            )
        })?;
        Ok(done == 1)
    }

    /// Every user, by name.
    pub async fn users(&self) -> Result<Vec<UserRow>> {
        self.read(|c| all(c, "SELECT id, name, role, created_at FROM users ORDER BY name", params![], user_row))
    }

    /// A user and their password hash, by name.
    pub async fn user_with_hash(&self, name: &str) -> Result<Option<(UserRow, String)>> {
        self.read(|c| {
            opt(c, "SELECT id, name, role, created_at, password_hash FROM users WHERE name = ?", params![name], |r| {
                Ok((user_row(r)?, r.get("password_hash")?))
            })
        })
    }

    /// Removes a user with their sessions and tokens; `false` if there was none.
    pub async fn remove_user(&self, name: &str) -> Result<bool> {
        let done = self.write(|c| exec(c, "DELETE FROM users WHERE name = ?", params![name]))?;
        Ok(done == 1)
    }

    /// Sets a user's password and ends their sessions (a password change logs everyone out);
    /// `false` if there is no such user.
    pub async fn set_password(&self, name: &str, password_hash: &str) -> Result<bool> {
        let done = self.write(|c| {
            let done = exec(c, "UPDATE users SET password_hash = ? WHERE name = ?", params![password_hash, name])?;
            exec(c, "DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE name = ?)", params![name])?;
            Ok(done)
        })?;
        Ok(done == 1)
    }

    /// Sets a user's role; `false` if there is no such user.
    pub async fn set_role(&self, name: &str, role: Role) -> Result<bool> {
        let done = self.write(|c| exec(c, "UPDATE users SET role = ? WHERE name = ?", params![role.as_str(), name]))?;
        Ok(done == 1)
    }

    /// Sets `name`'s role on behalf of `admin`, only if `admin` is still an admin at that
    /// moment (two admins demoting each other at once cannot leave none); `false` otherwise
    /// or if there is no such user.
    pub async fn set_role_by(&self, admin: &str, name: &str, role: Role) -> Result<bool> {
        let done = self.write(|c| {
            exec(
                c,
                "UPDATE users SET role = ? WHERE name = ? AND name != ?
               AND EXISTS (SELECT 1 FROM users a WHERE a.name = ? AND a.role = 'admin')",
                params![role.as_str(), name, admin, admin],
            )
        })?;
        Ok(done == 1)
    }

    /// Removes `name` on behalf of `admin`, under the same condition as [`Store::set_role_by`].
    pub async fn remove_user_by(&self, admin: &str, name: &str) -> Result<bool> {
        let done = self.write(|c| {
            exec(
                c,
                "DELETE FROM users WHERE name = ? AND name != ?
               AND EXISTS (SELECT 1 FROM users a WHERE a.name = ? AND a.role = 'admin')",
                params![name, admin, admin],
            )
        })?;
        Ok(done == 1)
    }

    /// Starts a session for a user (the cookie's hash, the CSRF token, when it ends).
    pub async fn create_session(&self, user: i64, token_hash: &str, csrf: &str, now: Ts, expires: Ts) -> Result<()> {
        self.write(|c| {
            // Expired sessions are swept at each login, so the table stays small without a timer.
            exec(c, "DELETE FROM sessions WHERE expires_at <= ?", params![ts_string(now)])?;
            exec(
                c,
                "INSERT INTO sessions (token_hash, user_id, csrf, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                params![token_hash, user, csrf, ts_string(now), ts_string(expires)],
            )?;
            Ok(())
        })
    }

    /// The live session whose cookie hashes to `token_hash`.
    pub async fn session(&self, token_hash: &str, now: Ts) -> Result<Option<SessionRow>> {
        self.read(|c| {
            opt(
                c,
                "SELECT u.id, u.name, u.role, u.created_at, s.csrf, s.expires_at
             FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_hash = ? AND s.expires_at > ?",
                params![token_hash, ts_string(now)],
                |r| Ok(SessionRow { user: user_row(r)?, csrf: r.get("csrf")?, expires_at: r.get("expires_at")? }),
            )
        })
    }

    /// Sets the password of the user with this id and ends their sessions; `false` if there is
    /// no such user (removed meanwhile).
    pub async fn set_password_of(&self, user: i64, password_hash: &str) -> Result<bool> {
        let done = self.write(|c| {
            let done = exec(c, "UPDATE users SET password_hash = ? WHERE id = ?", params![password_hash, user])?;
            exec(c, "DELETE FROM sessions WHERE user_id = ?", params![user])?;
            Ok(done)
        })?;
        Ok(done == 1)
    }

    /// The API tokens of one user (without secrets), newest first.
    pub async fn tokens_of(&self, user: i64) -> Result<Vec<TokenRow>> {
        self.read(|c| {
            all(
                c,
                "SELECT t.id, u.name AS user, t.name, t.created_at, t.last_used_at
             FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.user_id = ? ORDER BY t.id DESC",
                params![user],
                token_row,
            )
        })
    }

    /// Revokes one of a user's tokens (one statement: the id cannot change hands between a
    /// check and the delete); `false` if the user has no token with that id.
    pub async fn revoke_own_token(&self, user: i64, id: i64) -> Result<bool> {
        let done = self.write(|c| exec(c, "DELETE FROM api_tokens WHERE id = ? AND user_id = ?", params![id, user]))?;
        Ok(done == 1)
    }

    /// Revokes every token of a user; how many there were.
    pub async fn revoke_tokens_of(&self, user: i64) -> Result<u64> {
        let done = self.write(|c| exec(c, "DELETE FROM api_tokens WHERE user_id = ?", params![user]))?;
        Ok(done as u64)
    }

    /// Ends every session of a user; how many there were.
    pub async fn end_sessions(&self, user: i64) -> Result<u64> {
        let done = self.write(|c| exec(c, "DELETE FROM sessions WHERE user_id = ?", params![user]))?;
        Ok(done as u64)
    }

    /// Ends a session (logout).
    pub async fn delete_session(&self, token_hash: &str) -> Result<()> {
        self.write(|c| exec(c, "DELETE FROM sessions WHERE token_hash = ?", params![token_hash]))?;
        Ok(())
    }

    /// Stores a new API token for a user; `None` if there is no such user.
    pub async fn create_token(&self, user: &str, name: &str, token_hash: &str, now: Ts) -> Result<Option<TokenRow>> {
        self.write(|c| {
            opt(
                c,
                "INSERT INTO api_tokens (user_id, name, token_hash, created_at)
             SELECT id, ?, ?, ? FROM users WHERE name = ?
             RETURNING id, name, created_at, last_used_at",
                params![name, token_hash, ts_string(now), user],
                |r| {
                    Ok(TokenRow {
                        id: r.get("id")?,
                        user: user.to_string(),
                        name: r.get("name")?,
                        created_at: r.get("created_at")?,
                        last_used_at: r.get("last_used_at")?,
                    })
                },
            )
        })
    }

    /// The user an API token belongs to. Notes when it was last used, to the minute, so a
    /// script polling the API does not turn every read into a write.
    pub async fn token_user(&self, token_hash: &str, now: Ts) -> Result<Option<UserRow>> {
        // Read on a read connection, and take the write lock only when the note is stale: a
        // write transaction for every authenticated request would queue them behind the writer.
        let row = self.read(|c| {
            opt(
                c,
                "SELECT u.id, u.name, u.role, u.created_at, t.id AS token_id, t.last_used_at
             FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?",
                params![token_hash],
                |r| Ok((user_row(r)?, r.get::<i64>("token_id")?, r.get::<Option<String>>("last_used_at")?)),
            )
        })?;
        let Some((user, token_id, last)) = row else {
            return Ok(None);
        };
        let stale = ts_string(Ts(now.0 - 60_000));
        if last.is_none_or(|l| l < stale) {
            self.write(|c| {
                exec(c, "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", params![ts_string(now), token_id])
            })?;
        }
        Ok(Some(user))
    }

    /// Every API token (without secrets), newest first.
    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        self.read(|c| {
            all(
                c,
                "SELECT t.id, u.name AS user, t.name, t.created_at, t.last_used_at
             FROM api_tokens t JOIN users u ON u.id = t.user_id ORDER BY t.id DESC",
                params![],
                token_row,
            )
        })
    }

    /// Revokes an API token; `false` if there was none with that id.
    pub async fn revoke_token(&self, id: i64) -> Result<bool> {
        let done = self.write(|c| exec(c, "DELETE FROM api_tokens WHERE id = ?", params![id]))?;
        Ok(done == 1)
    }

    /// Pauses a pool (kept across restarts); pausing a paused pool keeps the first record.
    pub async fn pause_pool(&self, pool: &str, by: &str, now: Ts) -> Result<()> {
        self.write(|c| {
            exec(
                c,
                "INSERT INTO pool_pauses (pool, paused_by, paused_at) VALUES (?, ?, ?) ON CONFLICT (pool) DO NOTHING",
                params![pool, by, ts_string(now)],
            )
        })?;
        Ok(())
    }

    /// Resumes a pool.
    pub async fn resume_pool(&self, pool: &str) -> Result<()> {
        self.write(|c| exec(c, "DELETE FROM pool_pauses WHERE pool = ?", params![pool]))?;
        Ok(())
    }

    /// The paused pools.
    pub async fn paused_pools(&self) -> Result<Vec<PauseRow>> {
        self.read(|c| {
            all(c, "SELECT pool, paused_by, paused_at FROM pool_pauses ORDER BY pool", params![], |r| {
                Ok(PauseRow { pool: r.get("pool")?, paused_by: r.get("paused_by")?, paused_at: r.get("paused_at")? })
            })
        })
    }
}
