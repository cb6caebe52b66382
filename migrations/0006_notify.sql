-- Notifications. A build's start and end are written to an outbox in the same transaction as
-- the state change; a worker turns each outbox row into one delivery per interested notifier
-- (deduplicated by key) and marks the row done, in one transaction; another worker sends the
-- deliveries, retrying with backoff. A restart loses nothing; each message is made once (one
-- delivery per notifier, build and event) and sent at least once (a crash between a send and its
-- record sends it again; webhook receivers can drop repeats by the delivery id).
CREATE TABLE build_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id INTEGER NOT NULL REFERENCES builds (id),
    kind TEXT NOT NULL CHECK (kind IN ('started', 'finished')),
    created_at TEXT NOT NULL,
    processed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX build_events_pending ON build_events (processed, id) WHERE processed = 0;

CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    notifier TEXT NOT NULL,
    build_id INTEGER NOT NULL REFERENCES builds (id),
    -- started, finished or transition
    event TEXT NOT NULL,
    -- notifier, build and event: one message per transition, whatever happens.
    dedup TEXT NOT NULL UNIQUE,
    -- What to send, rendered when the event happened (JSON).
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at TEXT NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL,
    sent_at TEXT
);
CREATE INDEX deliveries_due ON deliveries (state, next_at) WHERE state = 'pending';
CREATE INDEX deliveries_build ON deliveries (notifier, build_id, id);

-- Transitions compare a build with the previous finished one of its builder and branch.
CREATE INDEX builds_finished ON builds (builder, branch, finished_at);
