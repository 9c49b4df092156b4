-- Snapshot templates: a frozen VM (disk, RAM file, device state) on the host
-- that made it (files in <data_dir>/templates/<id>/). team_id '' would be a
-- platform template; the built-in "minimal" is not a row (every host builds it).
CREATE TABLE templates (
    id          text        PRIMARY KEY,
    team_id     text        NOT NULL,
    name        text        NOT NULL,
    kind        text        NOT NULL DEFAULT 'snapshot' CHECK (kind IN ('base', 'snapshot')),
    host_id     text        NOT NULL,
    status      text        NOT NULL DEFAULT 'creating' CHECK (status IN ('creating', 'ready')),
    vcpus       integer     NOT NULL,
    memory_mb   integer     NOT NULL,
    disk_size_mb integer    NOT NULL,
    size_bytes  bigint      NOT NULL DEFAULT 0,
    source_capsule text     NOT NULL DEFAULT '',
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (team_id, name)
);
