-- Accounts, teams, sessions, API keys, one-time tokens, OAuth identities,
-- the mail outbox, rate-limit hits and the audit log. Secrets (session ids,
-- CSRF tokens, API keys, one-time tokens) are stored only as SHA-256 hashes;
-- passwords as argon2id hashes.

CREATE TABLE users (
    id               text PRIMARY KEY,
    email            text NOT NULL,
    name             text NOT NULL,
    password_hash    text,
    is_active        boolean NOT NULL DEFAULT false,
    is_admin         boolean NOT NULL DEFAULT false,
    activation_sent_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz,
    purge_after      timestamptz
);
-- One live account per address; a soft-deleted one keeps its row until purged.
CREATE UNIQUE INDEX users_email_live ON users (lower(email)) WHERE deleted_at IS NULL;

CREATE TABLE teams (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    slug        text NOT NULL UNIQUE,
    is_default  boolean NOT NULL DEFAULT false,
    byoc        boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

CREATE TABLE team_members (
    team_id    text NOT NULL REFERENCES teams (id),
    user_id    text NOT NULL REFERENCES users (id),
    role       text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX team_members_user ON team_members (user_id);
-- Exactly one owner per team.
CREATE UNIQUE INDEX team_members_one_owner ON team_members (team_id) WHERE role = 'owner';

CREATE TABLE sessions (
    id           text PRIMARY KEY,
    sid_hash     bytea NOT NULL UNIQUE,
    csrf_hash    bytea NOT NULL,
    user_id      text NOT NULL REFERENCES users (id),
    team_id      text NOT NULL REFERENCES teams (id),
    user_agent   text NOT NULL DEFAULT '',
    ip_address   text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz
);
CREATE INDEX sessions_user ON sessions (user_id) WHERE revoked_at IS NULL;

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    team_id     text NOT NULL REFERENCES teams (id),
    created_by  text NOT NULL REFERENCES users (id),
    name        text NOT NULL,
    key_prefix  text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_used   timestamptz,
    deleted_at  timestamptz
);
CREATE INDEX api_keys_team ON api_keys (team_id) WHERE deleted_at IS NULL;

CREATE TABLE one_time_tokens (
    token_hash  bytea PRIMARY KEY,
    purpose     text NOT NULL CHECK (purpose IN ('activation', 'password_reset')),
    user_id     text NOT NULL REFERENCES users (id),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX one_time_tokens_user ON one_time_tokens (user_id, purpose);

CREATE TABLE oauth_identities (
    provider          text NOT NULL,
    provider_user_id  text NOT NULL,
    user_id           text NOT NULL REFERENCES users (id),
    email             text NOT NULL DEFAULT '',
    login             text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, provider_user_id),
    UNIQUE (user_id, provider)
);

CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    to_addr     text NOT NULL,
    subject     text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    error       text
);

CREATE TABLE rate_limit_hits (
    bucket  text NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rate_limit_hits_bucket ON rate_limit_hits (bucket, at);

CREATE TABLE audit_log (
    id             bigserial PRIMARY KEY,
    team_id        text,
    actor_type     text NOT NULL CHECK (actor_type IN ('user', 'api_key', 'host', 'system')),
    actor_id       text NOT NULL DEFAULT '',
    actor_name     text NOT NULL DEFAULT '',
    resource_type  text NOT NULL,
    resource_id    text NOT NULL DEFAULT '',
    action         text NOT NULL,
    scope          text NOT NULL CHECK (scope IN ('team', 'admin', 'user')),
    status         text NOT NULL CHECK (status IN ('success', 'failure')),
    metadata       jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_team ON audit_log (team_id, id DESC);
