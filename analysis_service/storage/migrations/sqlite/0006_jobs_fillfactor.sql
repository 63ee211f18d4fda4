-- Nothing to change on SQLite (its pages have no fill factor); every version exists for both
-- databases.
SELECT 1;
