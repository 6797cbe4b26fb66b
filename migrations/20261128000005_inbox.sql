-- The in-app inbox: one row per in_app notification delivered to a user.
-- `notification_id` is unique, so delivering the same notification again
-- (a retry, a redelivered request) never shows it twice.
-- `tenant_id = ''` means no tenant (as in the policy tables), so the
-- (tenant, user) lookups are plain equality and use the indexes.
CREATE TABLE inbox_messages (
    id              BIGSERIAL PRIMARY KEY,
    tenant_id       TEXT NOT NULL DEFAULT '',
    user_id         TEXT NOT NULL,
    notification_id TEXT NOT NULL UNIQUE,
    title           TEXT,
    body            TEXT,
    data            JSONB NOT NULL DEFAULT '{}'::jsonb,
    category        TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    read_at         TIMESTAMPTZ
);

-- A user's inbox, newest first (keyset pagination on created_at, id).
CREATE INDEX inbox_messages_user_created_idx
    ON inbox_messages (tenant_id, user_id, created_at DESC, id DESC);

-- Unread messages: the badge count and "unread only" listing.
CREATE INDEX inbox_messages_unread_idx
    ON inbox_messages (tenant_id, user_id, created_at DESC, id DESC)
    WHERE read_at IS NULL;
