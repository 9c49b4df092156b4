-- Template builds (/v1/admin/builds): a capsule from base_template runs the
-- steps in order; on success it is snapshotted into the platform template
-- `name`. steps holds each step's command and, once run, its log.
CREATE TABLE builds (
    id             text        PRIMARY KEY,
    name           text        NOT NULL,
    base_template  text        NOT NULL,
    host_id        text        NOT NULL,
    status         text        NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    steps          jsonb       NOT NULL,
    step_timeout_sec integer   NOT NULL,
    capsule_id     text,
    template       text,
    error          text,
    created_by     text        NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz
);

-- One live build per template name.
CREATE UNIQUE INDEX builds_live_name ON builds (name) WHERE status IN ('queued', 'running');
CREATE INDEX builds_created ON builds (created_at DESC);
