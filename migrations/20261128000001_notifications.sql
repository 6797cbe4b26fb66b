-- Notifications: one row per (request, recipient). The primary key is the
-- idempotency key: a redelivered request finds its row and sends nothing.
CREATE TABLE notifications (
    id                  TEXT PRIMARY KEY,
    request_id          TEXT NOT NULL,
    tenant_id           TEXT,
    app_id              TEXT,
    channel             TEXT NOT NULL,
    priority            TEXT NOT NULL,
    category            TEXT,
    correlation_id      TEXT,
    -- accepted | sending | sent | delivered | failed | rejected | suppressed |
    -- deferred | scheduled | throttled | retrying | expired | bounced | cancelled
    status              TEXT NOT NULL,
    -- number of send attempts started
    attempts            INTEGER NOT NULL DEFAULT 0,
    provider            TEXT,
    provider_message_id TEXT,
    error_code          TEXT,
    error_message       TEXT,
    -- the whole notification as decoded (recipient, content, meta), so due
    -- work and manual retries can send it again without the Kafka message
    payload             JSONB NOT NULL,
    -- the last outcome event published for this notification; a redelivered
    -- request re-publishes it unchanged (same event_id)
    last_event          JSONB,
    scheduled_at        TIMESTAMPTZ,
    expires_at          TIMESTAMPTZ,
    next_attempt_at     TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at             TIMESTAMPTZ,
    failed_at           TIMESTAMPTZ
);

CREATE INDEX notifications_request_id_idx ON notifications (request_id);
CREATE INDEX notifications_status_created_idx ON notifications (status, created_at);
CREATE INDEX notifications_provider_message_id_idx ON notifications (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- Delivery log: one row per send attempt, written `sending` before the
-- provider call and finished after it.
CREATE TABLE delivery_attempts (
    id                  BIGSERIAL PRIMARY KEY,
    notification_id     TEXT NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    attempt             INTEGER NOT NULL,
    provider            TEXT NOT NULL,
    -- sending | sent | failed
    status              TEXT NOT NULL,
    provider_message_id TEXT,
    error_code          TEXT,
    error_message       TEXT,
    retryable           BOOLEAN,
    started_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at         TIMESTAMPTZ,
    duration_ms         INTEGER,
    UNIQUE (notification_id, attempt)
);
