-- The provider registry: one row per configured way to deliver a channel
-- (an SMTP relay, a SendGrid account, a Twilio number, ...). Credentials are
-- stored encrypted (AES-256-GCM, key from `[providers] encryption_key`):
-- nonce (12 bytes) || ciphertext || tag (16 bytes), the provider name as
-- associated data. Every change is announced on the `herald_providers`
-- channel (NOTIFY) so running instances reload at once.
CREATE TABLE providers (
    id                    BIGSERIAL PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE
                          CHECK (name ~ '^[a-z0-9_.-]{1,64}$'),
    provider_type         TEXT NOT NULL
                          CHECK (provider_type IN ('smtp', 'sendgrid', 'twilio', 'fcm', 'webhook', 'inbox')),
    -- email | sms | push | webhook | in_app; must be the type's channel
    channel               TEXT NOT NULL,
    -- non-secret settings, validated per type by the adapter
    config                JSONB NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    -- encrypted JSON object; NULL: no credentials
    credentials           BYTEA,
    -- first 8 hex digits of SHA-256 of the key that encrypted `credentials`
    credentials_key_id    TEXT,
    -- lower is tried first
    priority              INTEGER NOT NULL DEFAULT 100,
    is_default            BOOLEAN NOT NULL DEFAULT false,
    status                TEXT NOT NULL DEFAULT 'active'
                          CHECK (status IN ('active', 'inactive')),
    retry_strategy        TEXT NOT NULL DEFAULT 'exponential'
                          CHECK (retry_strategy IN ('exponential', 'linear', 'none')),
    max_retries           INTEGER NOT NULL DEFAULT 5 CHECK (max_retries >= 0),
    -- across all instances; NULL: unlimited
    rate_limit_per_second INTEGER CHECK (rate_limit_per_second > 0),
    rate_limit_per_minute INTEGER CHECK (rate_limit_per_minute > 0),
    -- NULL: global; otherwise only (and first) for this tenant
    tenant_id             TEXT,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    CHECK ((credentials IS NULL) = (credentials_key_id IS NULL))
);

CREATE INDEX providers_channel_idx ON providers (channel, tenant_id, priority);

-- `updated_at` moves on every change: instances keep an unchanged provider's
-- adapter (and its connections) across reloads by comparing it.
-- clock_timestamp(), not now(): two updates in one transaction differ.
CREATE FUNCTION herald_providers_touch() RETURNS trigger AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER providers_touch BEFORE UPDATE ON providers
    FOR EACH ROW EXECUTE FUNCTION herald_providers_touch();

-- Announce every change (payload: the provider name; empty for TRUNCATE).
-- Notifications are delivered on commit, so a listener reloading on one
-- sees the change.
CREATE FUNCTION herald_providers_notify() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('herald_providers', '');
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('herald_providers', OLD.name);
    ELSE
        PERFORM pg_notify('herald_providers', NEW.name);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER providers_notify AFTER INSERT OR UPDATE OR DELETE ON providers
    FOR EACH ROW EXECUTE FUNCTION herald_providers_notify();

CREATE TRIGGER providers_notify_truncate AFTER TRUNCATE ON providers
    FOR EACH STATEMENT EXECUTE FUNCTION herald_providers_notify();
