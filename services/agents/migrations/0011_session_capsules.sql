-- Capsule-bound agent sessions: the capsule is the session's credential and ends with it.
ALTER TABLE sessions ADD COLUMN capsule_id text;
ALTER TABLE sessions ADD COLUMN capsule_host text;
CREATE UNIQUE INDEX sessions_capsule ON sessions (capsule_id) WHERE capsule_id IS NOT NULL;
