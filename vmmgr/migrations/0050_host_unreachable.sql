-- A capsule whose host went silent keeps its status; this says since when the
-- host has not answered (NULL: reachable). Operations answer 503
-- host_unavailable meanwhile; after DOVECOTE_HOST_LOST_AFTER_S the capsule
-- becomes 'missing' with the marker kept, so a returning host re-adopts it.
ALTER TABLE capsules ADD COLUMN host_unreachable_since timestamptz;
CREATE INDEX capsules_host_unreachable ON capsules (host_unreachable_since)
    WHERE host_unreachable_since IS NOT NULL;
