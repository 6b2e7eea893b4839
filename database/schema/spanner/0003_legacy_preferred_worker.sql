-- Jobs.preferred_worker_id was stored and never used; the code no longer writes it.
-- Workers of an older release still write it during a rolling upgrade, so the column
-- stays (it can be dropped once none runs) and only loses NOT NULL, so that rows written
-- without it are valid. SQLite and PostgreSQL declared it DEFAULT '' and need no change.
ALTER TABLE Jobs ALTER COLUMN preferred_worker_id STRING(MAX);
