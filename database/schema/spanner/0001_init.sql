-- Jennah job store, Cloud Spanner (GoogleSQL) dialect.
-- Column names match database/_common.py so that rows map the same way in every store.
-- A tenant's jobs live under its Tenants row, and a job's transitions and events under
-- the job (interleaving), so reading or deleting a job touches one split.

CREATE TABLE Tenants (
    tenant_id  STRING(64) NOT NULL,
    created_at TIMESTAMP NOT NULL,
) PRIMARY KEY (tenant_id);

CREATE TABLE Jobs (
    tenant_id           STRING(64) NOT NULL,
    job_id              STRING(128) NOT NULL,
    spec                STRING(MAX) NOT NULL,
    status              STRING(16) NOT NULL,
    -- NULL when the submit carried no request id (the unique index skips NULLs).
    request_id          STRING(MAX),
    provider            STRING(MAX) NOT NULL,
    attempt             INT64 NOT NULL,
    provider_job_id     STRING(MAX) NOT NULL,
    cloud_resource_path STRING(MAX) NOT NULL,
    error_message       STRING(MAX) NOT NULL,
    failure_class       STRING(32),
    exit_code           INT64,
    cancel_requested    BOOL NOT NULL,
    owner_worker_id     STRING(MAX) NOT NULL,
    preferred_worker_id STRING(MAX) NOT NULL,
    lease_version       INT64 NOT NULL,
    lease_expires_at    TIMESTAMP,
    last_heartbeat_at   TIMESTAMP,
    created_at          TIMESTAMP NOT NULL,
    updated_at          TIMESTAMP NOT NULL,
    scheduled_at        TIMESTAMP,
    started_at          TIMESTAMP,
    completed_at        TIMESTAMP,
    -- Copies of spec fields that ListJobs filters on: the name, and each label as the
    -- JSON text of a [key, value] pair.
    job_name            STRING(MAX) NOT NULL,
    label_pairs         ARRAY<STRING(MAX)> NOT NULL,
    CONSTRAINT jobs_status CHECK (status IN
        ('PENDING', 'SCHEDULED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
) PRIMARY KEY (tenant_id, job_id),
  INTERLEAVE IN PARENT Tenants ON DELETE CASCADE;

-- Owner writes name a job by id alone.
CREATE UNIQUE INDEX JobsByJobId ON Jobs (job_id) STORING (owner_worker_id, lease_version);

CREATE UNIQUE NULL_FILTERED INDEX JobsByRequestId ON Jobs (tenant_id, request_id),
  INTERLEAVE IN Tenants;

CREATE INDEX JobsByTenantCreated ON Jobs (tenant_id, created_at DESC, job_id DESC)
  STORING (status, job_name, label_pairs), INTERLEAVE IN Tenants;

CREATE INDEX JobsByStatusLease ON Jobs (status, lease_expires_at);

CREATE INDEX JobsByOwner ON Jobs (owner_worker_id, status);

CREATE TABLE JobTransitions (
    tenant_id   STRING(64) NOT NULL,
    job_id      STRING(128) NOT NULL,
    idx         INT64 NOT NULL,
    from_status STRING(16),
    to_status   STRING(16) NOT NULL,
    `at`        TIMESTAMP NOT NULL,  -- AT is a reserved word
    reason      STRING(MAX) NOT NULL,
    worker_id   STRING(MAX) NOT NULL,
) PRIMARY KEY (tenant_id, job_id, idx),
  INTERLEAVE IN PARENT Jobs ON DELETE CASCADE;

CREATE TABLE JobEvents (
    tenant_id  STRING(64) NOT NULL,
    job_id     STRING(128) NOT NULL,
    seq        INT64 NOT NULL,
    kind       STRING(32) NOT NULL,
    status     STRING(16),
    message    STRING(MAX) NOT NULL,
    output     STRING(MAX) NOT NULL,
    created_at TIMESTAMP NOT NULL,
    worker_id  STRING(MAX) NOT NULL,
) PRIMARY KEY (tenant_id, job_id, seq),
  INTERLEAVE IN PARENT Jobs ON DELETE CASCADE;

CREATE INDEX JobEventsByTenant ON JobEvents (tenant_id, created_at, job_id, seq),
  INTERLEAVE IN Tenants;

CREATE TABLE Workers (
    worker_id    STRING(MAX) NOT NULL,
    endpoint     STRING(MAX) NOT NULL,
    heartbeat_at TIMESTAMP NOT NULL,
) PRIMARY KEY (worker_id);

CREATE TABLE SchemaMigrations (
    name       STRING(MAX) NOT NULL,
    applied_at TIMESTAMP NOT NULL,
) PRIMARY KEY (name);
