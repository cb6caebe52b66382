-- PostgreSQL's form of ../0009_leases.sql.

-- Who may act for the farm: one row per scope (the whole farm, for now). A master holds a
-- scope while expires_at, on the database's clock, is ahead; the epoch grows by one whenever
-- the holder changes, and every write of the holder checks that it still holds that epoch
-- (fencing), so a master that lost its lease (paused, cut off) can no longer change anything.
CREATE TABLE leases (
    scope       TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    holder      TEXT COLLATE "C" NOT NULL,
    epoch       BIGINT NOT NULL,
    acquired_at TEXT COLLATE "C" NOT NULL,
    renewed_at  TEXT COLLATE "C" NOT NULL,
    expires_at  TEXT COLLATE "C" NOT NULL
);

-- Every master that started on this database, and its last heartbeat (`GET /api/masters`).
CREATE TABLE masters (
    id           TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    host         TEXT COLLATE "C" NOT NULL,
    pid          BIGINT NOT NULL,
    url          TEXT COLLATE "C" NOT NULL,
    started_at   TEXT COLLATE "C" NOT NULL,
    heartbeat_at TEXT COLLATE "C" NOT NULL,
    stopped_at   TEXT COLLATE "C"
);
