-- Who may act for the farm: one row per scope (the whole farm, for now). A master holds a
-- scope while expires_at, on the database's clock, is ahead; the epoch grows by one whenever
-- the holder changes, and every write of the holder checks that it still holds that epoch
-- (fencing), so a master that lost its lease (paused, cut off) can no longer change anything.
CREATE TABLE leases (
    scope       TEXT NOT NULL PRIMARY KEY,
    holder      TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    acquired_at TEXT NOT NULL,
    renewed_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);

-- Every master that started on this database, and its last heartbeat (`GET /api/masters`).
CREATE TABLE masters (
    id           TEXT NOT NULL PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    url          TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    stopped_at   TEXT
);
