-- Paddock's first schema. Times are RFC 3339 UTC strings with milliseconds ("...Z"), so they
-- sort as text and print as the API wants them.

CREATE TABLE changes (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    repo         TEXT NOT NULL,
    branch       TEXT NOT NULL,
    revision     TEXT NOT NULL,
    author       TEXT NOT NULL DEFAULT '',
    committed_at TEXT,
    message      TEXT NOT NULL DEFAULT '',
    files        TEXT NOT NULL DEFAULT '[]',  -- JSON array of paths
    source       TEXT NOT NULL DEFAULT 'poller',
    created_at   TEXT NOT NULL,
    -- 0 until every scheduler has considered it; a restart replays the ones still at 0.
    scheduled    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX changes_repo_branch ON changes (repo, branch, id);
-- The poller and a webhook may both report the same commit: it is one change.
CREATE UNIQUE INDEX changes_unique ON changes (repo, branch, revision);
CREATE INDEX changes_unscheduled ON changes (scheduled) WHERE scheduled = 0;

-- The last revision seen per branch, so a restart neither rebuilds old commits nor misses new ones.
CREATE TABLE branch_heads (
    repo       TEXT NOT NULL,
    branch     TEXT NOT NULL,
    revision   TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (repo, branch)
);

CREATE TABLE build_requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    builder      TEXT NOT NULL,
    repo         TEXT NOT NULL,
    branch       TEXT NOT NULL,
    revision     TEXT NOT NULL,
    scheduler    TEXT NOT NULL,
    reason       TEXT NOT NULL DEFAULT '',
    changes      TEXT NOT NULL DEFAULT '[]',  -- JSON array of change ids
    submitted_at TEXT NOT NULL
);

-- One row per attempt. A retried attempt keeps its row in state 'retry'; the next attempt is a
-- new row with attempt + 1 and the same request.
CREATE TABLE builds (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id  INTEGER NOT NULL REFERENCES build_requests (id),
    builder     TEXT NOT NULL,
    repo        TEXT NOT NULL,
    branch      TEXT NOT NULL,
    revision    TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'queued',
    machine_id  INTEGER,
    attempt     INTEGER NOT NULL DEFAULT 1,
    reason      TEXT NOT NULL DEFAULT '',
    queued_at   TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT
);
CREATE INDEX builds_state ON builds (state);
CREATE INDEX builds_builder_branch ON builds (builder, branch, id);

CREATE TABLE steps (
    build_id    INTEGER NOT NULL REFERENCES builds (id),
    idx         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending',
    exit_code   INTEGER,
    started_at  TEXT,
    finished_at TEXT,
    PRIMARY KEY (build_id, idx)
);

CREATE TABLE log_chunks (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id   INTEGER NOT NULL REFERENCES builds (id),
    step_idx   INTEGER NOT NULL,
    text       TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX log_chunks_build ON log_chunks (build_id, id);

CREATE TABLE machines (
    id            INTEGER PRIMARY KEY,
    pool          TEXT NOT NULL,
    provisioner   TEXT NOT NULL,
    provider_id   TEXT,
    state         TEXT NOT NULL,
    -- SHA-256 of the one-time token; the token itself is never stored.
    token_hash    TEXT NOT NULL,
    token_used    INTEGER NOT NULL DEFAULT 0,
    -- SHA-256 of the agent's current resume token (rotated at every Welcome), with which a
    -- connected agent may reconnect after a master restart or a dropped connection.
    resume_hash   TEXT,
    -- The token before it: still accepted until the current one is used, so a Welcome lost
    -- in transit does not lock the agent out.
    resume_prev   TEXT,
    instance_type TEXT,
    lifecycle     TEXT,
    requested_at  TEXT NOT NULL,
    launched_at   TEXT,
    connected_at  TEXT,
    terminated_at TEXT,
    builds_run    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX machines_state ON machines (state);

-- Every state change of every machine: the cost meter's raw material.
CREATE TABLE machine_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id INTEGER NOT NULL,
    at         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX machine_events_machine ON machine_events (machine_id, id);

CREATE TABLE scheduler_state (
    name      TEXT PRIMARY KEY,
    last_fire INTEGER NOT NULL,
    built     TEXT NOT NULL DEFAULT '{}'
);
