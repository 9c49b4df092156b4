-- What a running capsule's root filesystem holds (df's Used, MiB), refreshed by
-- vmmgr (vmmgr/disks.py); disk_size_mb then holds the filesystem's real size.
ALTER TABLE capsules ADD COLUMN disk_used_mb integer;
