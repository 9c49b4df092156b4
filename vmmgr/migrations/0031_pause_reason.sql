-- Why a capsule was last paused: 'user' (POST .../pause), 'ttl_expired' (its
-- inactivity timeout) or 'shutdown' (vmmgr stopped with dovecote up). Set when
-- the capsule enters 'pausing' and kept while it is 'paused': at start, vmmgr
-- resumes the capsules of its host paused by its own shutdown, and only those.
ALTER TABLE capsules ADD COLUMN pause_reason text
    CHECK (pause_reason IN ('user', 'ttl_expired', 'shutdown'));
