-- Event pipeline v2: the store numbers every event. Per job, seq comes from
-- Jobs.event_seq (gapless). Per tenant, position comes from Tenants.event_position, read
-- and written in the transaction that inserts the events, so positions increase in
-- commit order (the cursor of tenant-wide watches). Execution events carry a dedup key,
-- and JobOutput keeps how much of each output stream the store has (where a new owner
-- resumes reading). Events written by v1 have no position: the store's migrate()
-- numbers them right after this file (database/spanner.py, _upgrade_v1), as Spanner DDL
-- cannot hold DML.

ALTER TABLE Jobs ADD COLUMN event_seq INT64 NOT NULL DEFAULT (0);

ALTER TABLE Tenants ADD COLUMN event_position INT64 NOT NULL DEFAULT (0);

-- NULL only for rows v1 wrote, until migrate() numbers them. (POSITION is not a reserved
-- word in GoogleSQL, unlike AT: no backquotes needed.)
ALTER TABLE JobEvents ADD COLUMN position INT64;

ALTER TABLE JobEvents ADD COLUMN attempt INT64 NOT NULL DEFAULT (0);

-- NULL when the event has none (lifecycle events): the unique index below skips NULLs,
-- where '' would collide between a job's lifecycle events.
ALTER TABLE JobEvents ADD COLUMN dedup_key STRING(MAX);

-- Tenant-wide reads now go by position, not by time.
DROP INDEX JobEventsByTenant;

CREATE UNIQUE NULL_FILTERED INDEX JobEventsByPosition ON JobEvents (tenant_id, position),
  INTERLEAVE IN Tenants;

CREATE UNIQUE NULL_FILTERED INDEX JobEventsByDedupKey ON JobEvents (tenant_id, job_id, dedup_key),
  INTERLEAVE IN Jobs;

-- has_active_jobs: a seek per active status, not a scan of the tenant's history.
CREATE INDEX JobsByTenantStatus ON Jobs (tenant_id, status), INTERLEAVE IN Tenants;

-- The columns of _common.OUTPUT_COLUMNS, plus tenant_id to interleave in the job.
CREATE TABLE JobOutput (
    tenant_id     STRING(64) NOT NULL,
    job_id        STRING(128) NOT NULL,
    attempt       INT64 NOT NULL,
    task_index    INT64 NOT NULL,
    stream        STRING(MAX) NOT NULL,
    delivered_end INT64 NOT NULL,
) PRIMARY KEY (tenant_id, job_id, attempt, task_index, stream),
  INTERLEAVE IN PARENT Jobs ON DELETE CASCADE;
