-- Agents number every report about a build (step started, log, step finished, build finished)
-- and send what is not acknowledged again after a reconnection. The highest number stored per
-- build makes storing idempotent: a report at or below it was already stored.
ALTER TABLE builds ADD COLUMN applied_seq BIGINT NOT NULL DEFAULT 0;
