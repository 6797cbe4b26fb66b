-- Recipient policy: preferences, suppressed addresses, and the columns the
-- due-work scheduler needs on notifications.

-- One row per (tenant, user, channel). `tenant_id = ''` with `user_id = ''`
-- is the global default of a channel; `user_id = ''` a tenant's default.
-- Every setting is nullable: NULL means "inherit" (user → tenant → global →
-- built-in), resolved field by field.
CREATE TABLE preferences (
    tenant_id            TEXT NOT NULL DEFAULT '',
    user_id              TEXT NOT NULL DEFAULT '',
    channel              TEXT NOT NULL,
    enabled              BOOLEAN,
    opt_in               BOOLEAN,
    -- email address, E.164 phone or webhook URL used when a request names
    -- only the user
    address              TEXT,
    device_tokens        TEXT[],
    quiet_hours_start    TIME,
    quiet_hours_end      TIME,
    -- IANA name; NULL: the request's recipient.timezone, else UTC
    quiet_hours_timezone TEXT,
    max_per_hour         INTEGER,
    max_per_day          INTEGER,
    muted_categories     TEXT[],
    -- last write wins by this timestamp (the event's, for topic updates)
    updated_at           TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, user_id, channel)
);

-- Addresses nothing may be sent to (`suppressed`, reason
-- `suppressed_address`). `tenant_id = ''` applies to every tenant.
CREATE TABLE suppressed_addresses (
    tenant_id  TEXT NOT NULL DEFAULT '',
    address    TEXT NOT NULL,
    reason     TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, address)
);

-- The recipient's user id, for frequency caps (sent rows per user+channel).
ALTER TABLE notifications
    ADD COLUMN user_id TEXT GENERATED ALWAYS AS (payload -> 'recipient' ->> 'user_id') STORED,
    -- scheduler lease: a claimed due row is not claimed again before
    -- lease_until (a crashed instance's claims are retaken after it)
    ADD COLUMN lease_until TIMESTAMPTZ,
    ADD COLUMN lease_owner TEXT,
    -- id of the cancel request that cancelled this row (a redelivered cancel
    -- re-publishes the same outcomes)
    ADD COLUMN cancelled_by TEXT;

-- Due work: rows waiting for next_attempt_at.
CREATE INDEX notifications_due_idx ON notifications (next_attempt_at)
    WHERE status IN ('scheduled', 'deferred', 'throttled', 'retrying');

-- Frequency caps: recent sends of one user on one channel.
CREATE INDEX notifications_sent_by_user_idx ON notifications (user_id, channel, sent_at)
    WHERE sent_at IS NOT NULL AND user_id IS NOT NULL;

-- Cancel by correlation id.
CREATE INDEX notifications_correlation_id_idx ON notifications (correlation_id)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX notifications_cancelled_by_idx ON notifications (cancelled_by)
    WHERE cancelled_by IS NOT NULL;
