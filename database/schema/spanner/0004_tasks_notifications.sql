-- Array jobs and notifications.
-- Jobs.tasks: the job's task states in the stored form of jennah.tasks.encode (a zstd
-- frame of compact JSON), NULL for a job that has none (every plain job).
-- JobEvents.task_index: the task an OUTPUT or task STATUS_DETAIL event is of (NULL for
-- job-level events); JobOutput was keyed by task from the start.
-- Notifications: one per job that reached a terminal state, written in the transaction
-- of that transition. They live under the tenant, not the job (an ack names only the
-- notification); notification_id is derived from the job id (database/_common.py), so
-- deleting a job deletes its notification by key.

ALTER TABLE Jobs ADD COLUMN tasks BYTES(MAX);

ALTER TABLE JobEvents ADD COLUMN task_index INT64;

CREATE TABLE Notifications (
    tenant_id       STRING(64) NOT NULL,
    notification_id STRING(64) NOT NULL,
    job_id          STRING(128) NOT NULL,
    job_name        STRING(MAX) NOT NULL,
    final_status    STRING(16) NOT NULL,
    occurred_at     TIMESTAMP NOT NULL,
    error_message   STRING(MAX) NOT NULL,
    is_read         BOOL NOT NULL,
    CONSTRAINT notifications_final_status CHECK (final_status IN
        ('COMPLETED', 'FAILED', 'CANCELLED')),
) PRIMARY KEY (tenant_id, notification_id),
  INTERLEAVE IN PARENT Tenants ON DELETE CASCADE;

-- The tenant's notifications newest first; its unread ones newest first, and their count.
CREATE INDEX NotificationsByTime ON Notifications (tenant_id, occurred_at DESC,
    notification_id DESC) STORING (job_id, job_name, final_status, error_message, is_read),
  INTERLEAVE IN Tenants;

CREATE INDEX NotificationsUnread ON Notifications (tenant_id, is_read, occurred_at DESC,
    notification_id DESC) STORING (job_id, job_name, final_status, error_message),
  INTERLEAVE IN Tenants;
