-- Array jobs and notifications.
-- jobs.tasks: the job's task states in the stored form of jennah.tasks.encode (a zstd
-- frame of compact JSON), NULL for a job that has none (every plain job).
-- job_events.task_index: the task an OUTPUT or task STATUS_DETAIL event is of (NULL for
-- job-level events); job_output was keyed by task from the start.
-- notifications: one per job that reached a terminal state, written in the transaction
-- of that transition; notification_id is derived from the job id (database/_common.py).

ALTER TABLE jobs ADD COLUMN tasks BLOB;
ALTER TABLE job_events ADD COLUMN task_index INTEGER;

CREATE TABLE notifications (
    notification_id TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    job_id          TEXT NOT NULL,
    job_name        TEXT NOT NULL DEFAULT '',
    final_status    TEXT NOT NULL CHECK (final_status IN ('COMPLETED', 'FAILED', 'CANCELLED')),
    occurred_at     INTEGER NOT NULL,
    error_message   TEXT NOT NULL DEFAULT '',
    is_read         INTEGER NOT NULL DEFAULT 0
);

-- The tenant's notifications newest first; its unread ones newest first, and their count.
CREATE INDEX notifications_tenant ON notifications (tenant_id, occurred_at DESC,
                                                    notification_id DESC);
CREATE INDEX notifications_unread ON notifications (tenant_id, is_read, occurred_at DESC,
                                                    notification_id DESC);
