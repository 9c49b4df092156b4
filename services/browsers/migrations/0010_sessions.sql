-- Browser sessions (the browser sessions reference), their action log, captured
-- console and network entries, and artifacts. Every read is scoped to a team.
CREATE TABLE sessions (
    id              text        PRIMARY KEY,
    team_id         text        NOT NULL,
    host_id         text        NOT NULL,
    machine_id      text        NOT NULL,
    provider        text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('creating', 'running', 'completed', 'failed', 'cancelled')),
    initial_prompt  text,
    viewport        jsonb       NOT NULL,
    recording       text        NOT NULL DEFAULT 'screenshots',
    current_url     text,
    title           text,
    navigations     jsonb       NOT NULL DEFAULT '[]'::jsonb,
    status_history  jsonb       NOT NULL DEFAULT '[]'::jsonb,
    error_code      text,
    error_message   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    ended_at        timestamptz,
    last_active_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_team ON sessions (team_id, created_at DESC);

CREATE TABLE actions (
    session_id  text        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq         integer     NOT NULL,
    type        text        NOT NULL,
    at          timestamptz NOT NULL,
    success     boolean     NOT NULL,
    details     jsonb       NOT NULL,
    duration_ms integer     NOT NULL,
    tokens      integer     NOT NULL DEFAULT 0,
    price       double precision NOT NULL DEFAULT 0,
    source      text        NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- Console and network entries are kept in bounded buffers while the session
-- lives and written here once, at its end.
CREATE TABLE captures (
    session_id  text        PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    console     jsonb       NOT NULL,
    network     jsonb       NOT NULL
);

CREATE TABLE artifacts (
    object_id   text        PRIMARY KEY,
    session_id  text        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    type        text        NOT NULL,
    storage_key text        NOT NULL,
    at          timestamptz NOT NULL
);
CREATE INDEX artifacts_session ON artifacts (session_id, at);
