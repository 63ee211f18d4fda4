-- job counts kept with the transitions, an index for the oldest PENDING job, result claims
INSERT INTO counters (name, value)
SELECT 'jobs:' || s.status, (SELECT count(*) FROM jobs WHERE jobs.status = s.status)
FROM (VALUES ('PENDING'), ('PROCESSING'), ('COMPLETED'), ('FAILED')) AS s (status);
CREATE INDEX jobs_pending_age ON jobs (status, submitted_at);
CREATE TABLE result_claims (
    "key" VARCHAR(64) NOT NULL PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
