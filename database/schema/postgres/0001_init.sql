-- Jennah job store, PostgreSQL dialect. Times are TIMESTAMPTZ; the spec is JSONB.

CREATE TABLE tenants (
    tenant_id   TEXT PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    job_id              TEXT PRIMARY KEY,
    tenant_id           TEXT NOT NULL REFERENCES tenants (tenant_id),
    spec                JSONB NOT NULL,
    status              TEXT NOT NULL CHECK (status IN
                            ('PENDING', 'SCHEDULED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    request_id          TEXT NOT NULL DEFAULT '',
    provider            TEXT NOT NULL DEFAULT '',
    attempt             INTEGER NOT NULL DEFAULT 0,
    provider_job_id     TEXT NOT NULL DEFAULT '',
    cloud_resource_path TEXT NOT NULL DEFAULT '',
    error_message       TEXT NOT NULL DEFAULT '',
    failure_class       TEXT,
    exit_code           INTEGER,
    cancel_requested    BOOLEAN NOT NULL DEFAULT FALSE,
    owner_worker_id     TEXT NOT NULL DEFAULT '',
    preferred_worker_id TEXT NOT NULL DEFAULT '',
    lease_version       BIGINT NOT NULL DEFAULT 0,
    lease_expires_at    TIMESTAMPTZ,
    last_heartbeat_at   TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL,
    scheduled_at        TIMESTAMPTZ,
    started_at          TIMESTAMPTZ,
    completed_at        TIMESTAMPTZ
);

CREATE UNIQUE INDEX jobs_tenant_request ON jobs (tenant_id, request_id) WHERE request_id <> '';
CREATE INDEX jobs_tenant_list ON jobs (tenant_id, created_at DESC, job_id DESC);
CREATE INDEX jobs_claim ON jobs (status, lease_expires_at);
CREATE INDEX jobs_owner ON jobs (owner_worker_id, status);

CREATE TABLE job_transitions (
    job_id      TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    worker_id   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE job_events (
    job_id      TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    tenant_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    status      TEXT,
    message     TEXT NOT NULL DEFAULT '',
    output      TEXT NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL,
    worker_id   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, seq)
);

CREATE INDEX job_events_tenant ON job_events (tenant_id, created_at, job_id, seq);

CREATE TABLE workers (
    worker_id    TEXT PRIMARY KEY,
    endpoint     TEXT NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL
);
