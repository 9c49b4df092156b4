-- The durable lifecycle event log. ids only grow (one appender at a time, see
-- notifier/eventlog.py), so SSE readers resume with "id > Last-Event-ID".
-- team_id '' marks events only platform admins see (a platform host going down).
CREATE TABLE events (
    id          bigserial   PRIMARY KEY,
    team_id     text        NOT NULL,
    name        text        NOT NULL,
    body        jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_team_id ON events (team_id, id);
CREATE INDEX events_created_at ON events (created_at);
