-- Capsules: one row per capsule ever created, on any host. The row outlives
-- the VM (status 'stopped', 'error', 'missing'); host_id names the vmmgr that
-- runs it (bus name "vmmgr.<host_id>").
CREATE TABLE capsules (
    id             text        PRIMARY KEY,
    team_id        text        NOT NULL,
    created_by     text        NOT NULL DEFAULT '',
    host_id        text        NOT NULL,
    template       text        NOT NULL,
    vcpus          integer     NOT NULL CHECK (vcpus > 0),
    memory_mb      integer     NOT NULL CHECK (memory_mb > 0),
    disk_size_mb   integer     NOT NULL CHECK (disk_size_mb > 0),
    timeout_sec    integer     NOT NULL DEFAULT 0 CHECK (timeout_sec >= 0),
    status         text        NOT NULL CHECK (status IN (
                       'pending', 'starting', 'running', 'pausing', 'paused', 'resuming',
                       'stopping', 'hibernated', 'stopped', 'missing', 'error')),
    metadata       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error          text,
    guest_ip       text        NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    last_active_at timestamptz,
    stopped_at     timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The team's capsules, newest first (list), and the live ones per team (caps).
CREATE INDEX capsules_team_created ON capsules (team_id, created_at DESC);
CREATE INDEX capsules_live_by_team ON capsules (team_id)
    WHERE status NOT IN ('stopped', 'missing', 'error', 'paused', 'hibernated');
-- Reconcile reads one host's live capsules at start.
CREATE INDEX capsules_host_status ON capsules (host_id, status);
