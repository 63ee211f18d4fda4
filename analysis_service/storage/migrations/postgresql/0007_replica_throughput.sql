-- replicas throughput: the jobs each replica finished in the last minute, and the seconds
-- they took
--
-- Each replica's heartbeat tells the jobs its workers finished in the last minute and the
-- seconds they took, so that the queue status adds up every replica's, whichever answers.
ALTER TABLE replicas ADD COLUMN finished_last_minute INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replicas ADD COLUMN busy_seconds_last_minute DOUBLE PRECISION NOT NULL DEFAULT 0;
