-- outbox leases for several ingest processes; indexes listing every owner's media
ALTER TABLE outbox ADD COLUMN claimed_until FLOAT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN claim_token VARCHAR(36);
CREATE INDEX media_time ON media (created_at, id);
CREATE INDEX media_status_time ON media (status, created_at, id);
