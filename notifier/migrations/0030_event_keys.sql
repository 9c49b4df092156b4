-- A publisher's idempotency key per event (bus/messages/events.py, RecordEvent.key):
-- an event sent again with the key of one the log holds is not appended twice.
-- vmmgr's outbox (vmmgr/event_outbox.py) retries until it has an answer, so a
-- notifier that died after its commit and before its reply sees the event again.
ALTER TABLE events ADD COLUMN source_key text;
CREATE UNIQUE INDEX events_source_key ON events (source_key) WHERE source_key IS NOT NULL;
