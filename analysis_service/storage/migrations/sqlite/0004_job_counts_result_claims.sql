-- job counts kept with the transitions, an index for the oldest PENDING job, result claims
INSERT INTO counters (name, value)
SELECT 'jobs:' || s.status, (SELECT count(*) FROM jobs WHERE jobs.status = s.status)
FROM (
    SELECT 'PENDING' AS status UNION ALL SELECT 'PROCESSING'
    UNION ALL SELECT 'COMPLETED' UNION ALL SELECT 'FAILED'
) AS s;
CREATE INDEX jobs_pending_age ON jobs (status, submitted_at);
CREATE TABLE result_claims (
    "key" VARCHAR(64) NOT NULL PRIMARY KEY,
    holder VARCHAR NOT NULL,
    expires_at FLOAT NOT NULL
);
