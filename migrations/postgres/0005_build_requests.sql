-- A build page shows the attempt that retried it: found through its request.
CREATE INDEX builds_request ON builds (request_id, attempt);
