-- jobs, job_attempts fill factor: room on each PostgreSQL page for a row's next versions
--
-- Nothing to change on SQLite (its pages have no fill factor); every version exists for both
-- databases.
SELECT 1;
