-- claimable_jobs: a PostgreSQL function giving the due jobs a claim takes, in queue order
--
-- Locked (SKIP LOCKED): what the queue's turn statement picks (analysis_service/storage/turns.py).
-- A function of its own for the planner's settings: on a table without statistics (a new database,
-- a burst before autovacuum has analysed it) the planner guesses a few PENDING rows and reads
-- every one of them by bitmap to sort them; the index jobs_claim_order gives them in queue order,
-- and the scan stops at "wanted". ROWS: what the statement around it plans for.
CREATE FUNCTION claimable_jobs(wanted bigint, due double precision)
RETURNS TABLE (media_id text, priority integer, submitted_at double precision)
LANGUAGE sql VOLATILE ROWS 32 SET enable_bitmapscan = off
AS $$
    SELECT media_id, priority, submitted_at FROM jobs
    WHERE status = 'PENDING'
        AND next_attempt_at <= due
        AND NOT EXISTS (SELECT 1 FROM counters WHERE name = 'paused' AND value <> 0)
    ORDER BY priority DESC, submitted_at, media_id
    LIMIT wanted
    FOR UPDATE SKIP LOCKED
$$;
