-- 30-second averages of each capsule, as its vmmgr hands them over (one row
-- per capsule and bucket; a bucket sent twice is stored once). ts is the
-- bucket's start; samples how many 500 ms samples the average holds. Kept
-- DOVECOTE_METRICS_POINTS_RETENTION_H hours: the history of a capsule whose
-- vmmgr no longer holds its rings (paused across a restart, stopped).
CREATE TABLE capsule_points (
    capsule_id text             NOT NULL,
    ts         timestamptz      NOT NULL,
    team_id    text             NOT NULL,
    host_id    text             NOT NULL,
    samples    integer          NOT NULL CHECK (samples > 0),
    cpu_pct    double precision NOT NULL,
    mem_bytes  bigint           NOT NULL,
    disk_bytes bigint           NOT NULL,
    vcpus      integer          NOT NULL,
    memory_mb  integer          NOT NULL,
    PRIMARY KEY (capsule_id, ts)
);
CREATE INDEX capsule_points_ts ON capsule_points (ts);
CREATE INDEX capsule_points_team ON capsule_points (team_id);

-- What each team's sampled capsules held in each 30-second bucket (summed
-- over hosts as their points arrive). Feeds /v1/capsules/stats; kept
-- DOVECOTE_METRICS_TEAM_RETENTION_D days (the 30-day range and peaks).
CREATE TABLE team_points (
    team_id       text        NOT NULL,
    ts            timestamptz NOT NULL,
    running_count integer     NOT NULL,
    vcpus         integer     NOT NULL,
    memory_mb     integer     NOT NULL,
    PRIMARY KEY (team_id, ts)
);
CREATE INDEX team_points_ts ON team_points (ts);

-- Reserved vCPU-minutes and RAM MB-minutes per team and UTC day, added to as
-- points arrive. Feeds /v1/capsules/usage; kept DOVECOTE_METRICS_USAGE_RETENTION_D days.
CREATE TABLE daily_usage (
    team_id        text             NOT NULL,
    day            date             NOT NULL,
    cpu_minutes    double precision NOT NULL DEFAULT 0,
    ram_mb_minutes double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (team_id, day)
);
