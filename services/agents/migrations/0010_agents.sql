-- The agent runtime. Every row carries its team; every query filters on it.

CREATE TABLE workspaces (
    id         text        PRIMARY KEY,
    team_id    text        NOT NULL,
    name       text        NOT NULL,
    root_dir   text        NOT NULL DEFAULT '',
    task_seq   integer     NOT NULL DEFAULT 0,
    created_by text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (team_id, name)
);

-- Per-workspace coordinator settings (absent: the service's defaults).
CREATE TABLE coordinators (
    workspace_id        text        PRIMARY KEY REFERENCES workspaces (id) ON DELETE CASCADE,
    team_id             text        NOT NULL,
    enabled             boolean     NOT NULL,
    agent_name          text        NOT NULL DEFAULT '',
    provider            text        NOT NULL DEFAULT '',
    model               text        NOT NULL DEFAULT '',
    max_children        integer     NOT NULL,
    max_depth           integer     NOT NULL,
    max_active_sessions integer     NOT NULL,
    default_ttl_seconds integer     NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Agent sessions. token_hash is sha256 of the agent token (shown once).
-- state: starting | active | stopping | stopped.
CREATE TABLE sessions (
    id                  text        PRIMARY KEY,
    team_id             text        NOT NULL,
    workspace_id        text        NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    agent_name          text        NOT NULL,
    name                text        NOT NULL DEFAULT '',
    channel             text        NOT NULL DEFAULT '',
    provider            text        NOT NULL DEFAULT '',
    model               text        NOT NULL DEFAULT '',
    type                text        NOT NULL CHECK (type IN ('user', 'spawned')),
    state               text        NOT NULL CHECK (state IN ('starting', 'active', 'stopping', 'stopped')),
    token_hash          bytea       NOT NULL,
    capabilities        text[]      NOT NULL DEFAULT '{}',
    root_session_id     text        NOT NULL,
    parent_session_id   text        REFERENCES sessions (id) ON DELETE CASCADE,
    spawn_depth         integer     NOT NULL DEFAULT 0,
    spawn_role          text        NOT NULL DEFAULT '',
    permission_policy   jsonb       NOT NULL,
    spawn_budget        jsonb       NOT NULL,
    auto_stop_on_parent boolean     NOT NULL DEFAULT true,
    ttl_seconds         integer,
    ttl_expires_at      timestamptz,
    idempotency_key     text,
    stop_reason         text,
    stop_detail         text        NOT NULL DEFAULT '',
    created_by          text        NOT NULL DEFAULT '',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (parent_session_id, idempotency_key)
);
CREATE INDEX sessions_team_workspace ON sessions (team_id, workspace_id, state);
CREATE INDEX sessions_parent ON sessions (parent_session_id);
CREATE INDEX sessions_ttl ON sessions (ttl_expires_at) WHERE state <> 'stopped' AND ttl_expires_at IS NOT NULL;

CREATE TABLE tasks (
    id                    text        PRIMARY KEY,
    team_id               text        NOT NULL,
    workspace_id          text        NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    identifier            text        NOT NULL,
    title                 text        NOT NULL,
    description           text        NOT NULL DEFAULT '',
    priority              text        NOT NULL CHECK (priority IN ('low', 'medium', 'high', 'urgent')),
    status                text        NOT NULL,
    network_channel       text        NOT NULL DEFAULT '',
    required_capabilities text[]      NOT NULL DEFAULT '{}',
    owner_kind            text        NOT NULL,
    owner_ref             text        NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tasks_team_workspace ON tasks (team_id, workspace_id, created_at);

CREATE TABLE channels (
    id                    text        PRIMARY KEY,
    team_id               text        NOT NULL,
    workspace_id          text        NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    channel               text        NOT NULL,
    display_name          text        NOT NULL DEFAULT '',
    purpose               text        NOT NULL DEFAULT '',
    task_id               text,
    run_id                text,
    allowed_message_kinds text[]      NOT NULL,
    last_seq              bigint      NOT NULL DEFAULT 0,
    last_activity_at      timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, channel)
);

-- status: queued | claimed | starting | running | completed | failed | canceled | needs_attention.
-- claim_token_hash: sha256 hex of the current lease's random claim token (never stored raw).
CREATE TABLE runs (
    id                      text        PRIMARY KEY,
    team_id                 text        NOT NULL,
    workspace_id            text        NOT NULL,
    task_id                 text        NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    status                  text        NOT NULL CHECK (status IN ('queued', 'claimed', 'starting', 'running',
                                                        'completed', 'failed', 'canceled', 'needs_attention')),
    priority_rank           integer     NOT NULL,
    attempt                 integer     NOT NULL DEFAULT 1,
    max_attempts            integer     NOT NULL,
    claim_token_hash        text,
    session_id              text,
    claimed_at              timestamptz,
    heartbeat_at            timestamptz,
    lease_until             timestamptz,
    started_at              timestamptz,
    ended_at                timestamptz,
    queued_at               timestamptz NOT NULL DEFAULT now(),
    error                   text,
    failure_kind            text,
    result                  jsonb,
    idempotency_key         text,
    network_channel         text        NOT NULL DEFAULT '',
    required_capabilities   text[]      NOT NULL DEFAULT '{}',
    coordination_channel_id text        NOT NULL REFERENCES channels (id),
    origin_kind             text        NOT NULL,
    origin_ref              text        NOT NULL,
    UNIQUE (task_id, idempotency_key)
);
-- claim-next: the best queued run of a workspace (priority, then age).
CREATE INDEX runs_queued ON runs (workspace_id, priority_rank DESC, queued_at, id) WHERE status = 'queued';
CREATE INDEX runs_leases ON runs (lease_until) WHERE status = 'claimed';
CREATE INDEX runs_session ON runs (session_id) WHERE status = 'claimed';
CREATE INDEX runs_task ON runs (task_id);

-- A message's seq is its channel's counter at send (sends lock the channel row):
-- per-channel order is commit order, with no gaps a reader could skip.
CREATE TABLE messages (
    id              text        PRIMARY KEY,
    channel_id      text        NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    seq             bigint      NOT NULL,
    team_id         text        NOT NULL,
    from_session_id text        NOT NULL,
    to_session_id   text,
    kind            text        NOT NULL,
    metadata        jsonb       NOT NULL,
    body            jsonb,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (channel_id, seq),
    UNIQUE (channel_id, from_session_id, idempotency_key)
);

-- What each reader has received of each channel (delivered once per reader).
CREATE TABLE cursors (
    session_id text   NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    channel_id text   NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    last_seq   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, channel_id)
);

-- Soul documents: every PUT is a revision; the newest is the agent's soul.
CREATE TABLE souls (
    revision_id text        PRIMARY KEY,
    team_id     text        NOT NULL,
    agent_name  text        NOT NULL,
    body        text        NOT NULL,
    frontmatter jsonb       NOT NULL,
    diagnostics jsonb       NOT NULL,
    valid       boolean     NOT NULL,
    digest      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX souls_agent ON souls (team_id, agent_name, created_at DESC);

-- Every state change, with who made it.
CREATE TABLE audit_log (
    id            bigserial   PRIMARY KEY,
    team_id       text        NOT NULL,
    actor_kind    text        NOT NULL,
    actor_id      text        NOT NULL,
    action        text        NOT NULL,
    resource_type text        NOT NULL,
    resource_id   text        NOT NULL,
    metadata      jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_team ON audit_log (team_id, id);
