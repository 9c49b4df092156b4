-- Desktop sessions (one row each, kept after teardown with state 'stopped').
-- record is the SessionRecord the API shows (jsonb, rewritten on each change);
-- the columns beside it are what the service queries and scopes by.
CREATE TABLE sessions (
    id             text        PRIMARY KEY,
    team_id        text        NOT NULL,
    host_id        text        NOT NULL,
    provider       text        NOT NULL CHECK (provider IN ('qemu', 'xvfb')),
    state          text        NOT NULL CHECK (state IN ('starting', 'running', 'failed', 'stopped')),
    capsule_id     text,
    runtime_dir    text,
    record         jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_active_at timestamptz NOT NULL DEFAULT now(),
    stopped_at     timestamptz
);
CREATE INDEX sessions_team ON sessions (team_id, created_at);
CREATE INDEX sessions_live ON sessions (host_id) WHERE state <> 'stopped';

-- Tasks bound to a session (the reference's camelCase Task is built from a row).
CREATE TABLE tasks (
    id               text        PRIMARY KEY,
    team_id          text        NOT NULL,
    session_id       text        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    description      text        NOT NULL,
    status           text        NOT NULL
                     CHECK (status IN ('pending', 'running', 'paused', 'terminated', 'completed')),
    thought_summary  text,
    require_approval boolean     NOT NULL DEFAULT false,
    last_receipt     jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tasks_team ON tasks (team_id, created_at);

-- Every action run on a session, with its receipt: the session's history
-- (the newest 250 are shown) and, with who asked, the audit trail of actions.
CREATE TABLE actions (
    id          bigserial   PRIMARY KEY,
    session_id  text        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    team_id     text        NOT NULL,
    kind        text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('ok', 'error')),
    action      jsonb       NOT NULL,
    receipt     jsonb       NOT NULL,
    source      text        NOT NULL DEFAULT 'api',
    task_id     text,
    actor_type  text        NOT NULL,
    actor_id    text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX actions_session ON actions (session_id, id DESC);

-- Session and task lifecycle changes and refused actions (who, what, when).
CREATE TABLE audit (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    team_id     text        NOT NULL,
    actor_type  text        NOT NULL,
    actor_id    text        NOT NULL,
    event       text        NOT NULL,
    session_id  text,
    task_id     text,
    detail      jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_team ON audit (team_id, at);
