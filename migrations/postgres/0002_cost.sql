-- The cost meter's per-machine facts, fixed when the machine launches so a report does not
-- change when the price table or the config does later.
ALTER TABLE machines ADD COLUMN zone TEXT COLLATE "C";
-- USD per hour for the machine itself; NULL means no known price (reported as unknown, never
-- as free).
ALTER TABLE machines ADD COLUMN hourly_price DOUBLE PRECISION;
-- Where hourly_price came from: table, spot, config, nominal.
ALTER TABLE machines ADD COLUMN price_source TEXT COLLATE "C";
ALTER TABLE machines ADD COLUMN volume_gb BIGINT;
ALTER TABLE machines ADD COLUMN volume_type TEXT COLLATE "C";
-- USD per hour for the root volume (GB x GB-month price / 730); NULL when unknown.
ALTER TABLE machines ADD COLUMN volume_hourly DOUBLE PRECISION;
-- Reports pick the machines whose billed life meets their window.
CREATE INDEX machines_launched ON machines (launched_at);
