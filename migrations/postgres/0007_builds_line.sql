-- A finished build's standing compares it with the builds of its builder and branch in
-- request order (src/store/notify.rs `standing`).
CREATE INDEX builds_line ON builds (builder, branch, request_id);
