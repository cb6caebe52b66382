-- /metrics counts machine events by kind (launch failures) at every scrape.
CREATE INDEX machine_events_kind ON machine_events (kind);
