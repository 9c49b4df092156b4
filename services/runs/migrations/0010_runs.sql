-- Agent runs (one row each; record is the RunRecord the API shows, rewritten on each change).
CREATE TABLE runs (
    id          text        PRIMARY KEY,
    team_id     text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('Draft', 'PreparingMachine', 'Ready', 'Running',
                            'Verifying', 'Succeeded', 'Failed', 'Retrying', 'Blocked', 'Stopped')),
    actor       jsonb       NOT NULL,
    record      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX runs_team ON runs (team_id, created_at DESC);

-- Live sessions (record is the LiveSession the API shows).
CREATE TABLE live_sessions (
    id          text        PRIMARY KEY,
    team_id     text        NOT NULL,
    status      text        NOT NULL,
    actor       jsonb       NOT NULL,
    record      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX live_sessions_team ON live_sessions (team_id, created_at DESC);

-- Events of runs and live sessions, in order (id is the SSE position).
CREATE TABLE events (
    id          bigserial   PRIMARY KEY,
    subject_id  text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('run', 'live')),
    team_id     text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    type        text        NOT NULL,
    level       text        NOT NULL CHECK (level IN ('info', 'warning', 'error')),
    message     text        NOT NULL,
    payload     jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX events_subject ON events (subject_id, id);

-- Screenshots of a subject, stored once per distinct content.
CREATE TABLE screenshots (
    subject_id  text        NOT NULL,
    sha256      text        NOT NULL,
    png         bytea       NOT NULL,
    width       integer     NOT NULL DEFAULT 0,
    height      integer     NOT NULL DEFAULT 0,
    first_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_id, sha256)
);

-- Memory entries (global, or per app profile).
CREATE TABLE memory (
    id               text        PRIMARY KEY,
    team_id          text        NOT NULL,
    scope            text        NOT NULL CHECK (scope IN ('app', 'global')),
    app_context      text,
    category         text        NOT NULL,
    content          text        NOT NULL,
    tags             jsonb       NOT NULL DEFAULT '[]'::jsonb,
    confidence       double precision NOT NULL,
    access_count     integer     NOT NULL DEFAULT 0,
    last_accessed_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX memory_team ON memory (team_id, scope, lower(app_context));
