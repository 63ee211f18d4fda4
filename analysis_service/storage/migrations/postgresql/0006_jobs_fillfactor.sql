-- jobs, job_attempts fill factor: room on each PostgreSQL page for a row's next versions
--
-- A job row is rewritten at every step (its revision just after it is inserted, then each claim
-- and end) and an attempt row once, when it ends; with free space on its page, a change that
-- leaves the indexed columns as they were (the revision, the attempt's end) is a heap-only update:
-- no new index entries. Pages written from now on keep the room; older ones get it when the table
-- is rewritten (VACUUM FULL).
ALTER TABLE jobs SET (fillfactor = 70);
ALTER TABLE job_attempts SET (fillfactor = 85);
