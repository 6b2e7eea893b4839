-- Jennah job store, SQLite dialect.
-- Timestamps are INTEGER microseconds since the Unix epoch, UTC: compact, exact and
-- sortable. The spec is JSON text (labels and name are filtered with the JSON1 functions).

CREATE TABLE tenants (
    tenant_id   TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL
);

CREATE TABLE jobs (
    job_id              TEXT PRIMARY KEY,
    tenant_id           TEXT NOT NULL REFERENCES tenants (tenant_id),
    spec                TEXT NOT NULL CHECK (json_valid(spec)),
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
    cancel_requested    INTEGER NOT NULL DEFAULT 0,
    owner_worker_id     TEXT NOT NULL DEFAULT '',
    preferred_worker_id TEXT NOT NULL DEFAULT '',
    lease_version       INTEGER NOT NULL DEFAULT 0,
    lease_expires_at    INTEGER,
    last_heartbeat_at   INTEGER,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    scheduled_at        INTEGER,
    started_at          INTEGER,
    completed_at        INTEGER
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
    at          INTEGER NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    worker_id   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE job_events (
    job_id      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    tenant_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    status      TEXT,
    message     TEXT NOT NULL DEFAULT '',
    output      TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    worker_id   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, seq)
);

CREATE INDEX job_events_tenant ON job_events (tenant_id, created_at, job_id, seq);

CREATE TABLE workers (
    worker_id    TEXT PRIMARY KEY,
    endpoint     TEXT NOT NULL,
    heartbeat_at INTEGER NOT NULL
);
