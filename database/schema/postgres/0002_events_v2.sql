-- Event pipeline v2: the store numbers every event. Per job, seq comes from
-- jobs.event_seq (gapless); per tenant, position from tenants.event_position (commit
-- order), the cursor of tenant-wide watches. Execution events carry a dedup key, and
-- job_output keeps how much of each output stream the store has (where a new owner
-- resumes reading). Events written by v1 get their positions from the store's migrate()
-- right after this file (see database/_sql.py, _upgrade_v1).

ALTER TABLE jobs ADD COLUMN event_seq BIGINT NOT NULL DEFAULT 0;
-- The last transition idx used (transitions are numbered 0, 1, 2, ... per job).
ALTER TABLE jobs ADD COLUMN transition_seq BIGINT NOT NULL DEFAULT -1;
UPDATE jobs SET transition_seq = (SELECT COALESCE(MAX(idx), -1) FROM job_transitions
                                  WHERE job_transitions.job_id = jobs.job_id);
ALTER TABLE tenants ADD COLUMN event_position BIGINT NOT NULL DEFAULT 0;
ALTER TABLE job_events ADD COLUMN position BIGINT;
ALTER TABLE job_events ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_events ADD COLUMN dedup_key TEXT NOT NULL DEFAULT '';

DROP INDEX job_events_tenant;
CREATE UNIQUE INDEX job_events_position ON job_events (tenant_id, position);
CREATE UNIQUE INDEX job_events_dedup ON job_events (job_id, dedup_key) WHERE dedup_key <> '';
CREATE INDEX jobs_tenant_status ON jobs (tenant_id, status);

CREATE TABLE job_output (
    job_id        TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    task_index    INTEGER NOT NULL,
    stream        TEXT NOT NULL,
    delivered_end BIGINT NOT NULL,
    PRIMARY KEY (job_id, attempt, task_index, stream)
);
