-- claimable_jobs: a PostgreSQL function giving the due jobs a claim takes, in queue order
--
-- Nothing to change on SQLite: PostgreSQL's version adds the function its turn statement
-- claims with (the planner's settings for that query); SQLite claims with its own statement
-- (analysis_service/storage/jobs.py). Every version exists for both databases.
SELECT 1;
