-- Template store: a template is one scope (key, channel, tenant, app, locale);
-- its content lives in versions. Every update inserts a new version; at most
-- one version of a template is active. NULL tenant/app/locale mean "any".
CREATE TABLE templates (
    id          BIGSERIAL PRIMARY KEY,
    key         TEXT NOT NULL,
    channel     TEXT NOT NULL,
    name        TEXT,
    tenant_id   TEXT,
    app_id      TEXT,
    -- canonical BCP 47 spelling (`pt-BR`), NULL for the unlocalized template
    locale      TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One template per scope (NULLs compared as equal).
CREATE UNIQUE INDEX templates_scope_idx ON templates (
    key, channel, COALESCE(tenant_id, ''), COALESCE(app_id, ''), COALESCE(locale, ''));

CREATE TABLE template_versions (
    template_id      BIGINT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    version          INTEGER NOT NULL,
    -- jinja (minijinja) | text (${var} substitution) | static (no variables)
    engine           TEXT NOT NULL CHECK (engine IN ('jinja', 'text', 'static')),
    subject_template TEXT,
    body_template    TEXT,
    html_template    TEXT,
    content_type     TEXT,
    -- JSON Schema subset: {"required": [...], "properties": {"x": {"type": ...}}}
    variables_schema JSONB,
    is_active        BOOLEAN NOT NULL DEFAULT false,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (template_id, version)
);

-- At most one active version per template.
CREATE UNIQUE INDEX template_versions_one_active_idx ON template_versions (template_id)
    WHERE is_active;

-- API keys: only the SHA-256 of the token is stored.
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    token_sha256 BYTEA NOT NULL UNIQUE,
    -- admin | service | user
    role         TEXT NOT NULL CHECK (role IN ('admin', 'service', 'user')),
    tenant_id    TEXT,
    user_id      TEXT,
    name         TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at   TIMESTAMPTZ,
    CHECK (role <> 'user' OR user_id IS NOT NULL)
);

-- Query API: keyset pagination and the per-user filter.
CREATE INDEX notifications_created_id_idx ON notifications (created_at DESC, id DESC);
CREATE INDEX notifications_recipient_user_idx
    ON notifications ((payload -> 'recipient' ->> 'user_id'), created_at DESC);
