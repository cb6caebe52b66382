-- Accounts for the web UI and the API: users with a role, browser sessions, API tokens, and
-- pools paused by an admin (kept across restarts).
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('viewer', 'committer', 'admin')),
    -- PHC string (argon2id), never the password.
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE sessions (
    -- SHA-256 of the cookie's value: a stolen database does not hand out live sessions.
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE api_tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    last_used_at TEXT
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE pool_pauses (
    pool TEXT PRIMARY KEY,
    paused_by TEXT NOT NULL,
    paused_at TEXT NOT NULL
);

-- Who cancelled a build (the API shows it; NULL when nobody did).
ALTER TABLE builds ADD COLUMN cancelled_by TEXT;

-- The console shows, for each recent change, its builds: found by revision.
CREATE INDEX builds_revision ON builds (repo, revision);
