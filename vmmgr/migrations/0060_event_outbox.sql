-- Lifecycle events on their way to the notifier's log (vmmgr/event_outbox.py).
-- A row is written in the transaction of the change it reports, sent with its
-- key (the notifier appends a key once) until the notifier answers, then
-- deleted: a vmmgr or notifier killed in between loses none and doubles none.
-- Each vmmgr sends its own host's rows, in seq order.
CREATE TABLE event_outbox (
    seq         bigserial   PRIMARY KEY,
    key         text        NOT NULL UNIQUE DEFAULT 'vmmgr:' || gen_random_uuid()::text,
    host_id     text        NOT NULL,
    team_id     text        NOT NULL,
    body        jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX event_outbox_host ON event_outbox (host_id, seq);
