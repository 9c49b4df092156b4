-- Notification channels and their deliveries (notifier/channels.py, notifier/delivery.py).
--
-- A channel's whole provider config (webhook URLs, bot and access tokens, the
-- webhook secret) is one pynacl SecretBox of {"channel_id", "config"} JSON:
-- 24-byte nonce followed by the ciphertext. The key is never in the database
-- (DOVECOTE_CHANNEL_KEY, else <data_dir>/channel.key); key_id is the first 16
-- hex digits of its SHA-256, so a channel sealed under another key is named
-- as such instead of failing obscurely.
CREATE TABLE channels (
    id            text        PRIMARY KEY,
    team_id       text        NOT NULL,
    name          text        NOT NULL,
    provider      text        NOT NULL,
    events        text[]      NOT NULL,
    config_sealed bytea       NOT NULL,
    key_id        text        NOT NULL,
    created_by    text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT channels_team_name UNIQUE (team_id, name)
);

-- One row per (event, subscribed channel), inserted in the event's append
-- transaction. status: pending -> delivered | failed. A worker claims a due
-- row by counting the attempt and pushing next_attempt_at past its lease, so a
-- notifier killed mid-request retries it once the lease ends (at least once).
-- Deliveries go with their event (log retention) or their channel (deletion).
CREATE TABLE deliveries (
    id              bigserial   PRIMARY KEY,
    event_id        bigint      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    channel_id      text        NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    team_id         text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CONSTRAINT deliveries_event_channel UNIQUE (event_id, channel_id)
);

CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_channel ON deliveries (channel_id, id);

-- Every HTTP attempt: the answer's status (NULL when none came), how long it
-- took, and the error (NULL when delivered; config values masked).
CREATE TABLE delivery_attempts (
    id          bigserial   PRIMARY KEY,
    delivery_id bigint      NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    status_code integer,
    latency_ms  integer     NOT NULL,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, id);
