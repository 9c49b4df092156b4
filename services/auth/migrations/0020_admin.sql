-- The admin plane: the last-admin check (services/auth/admin.py) reads and
-- locks every active platform admin's row.
CREATE INDEX users_active_admins ON users (id) WHERE is_admin AND is_active AND deleted_at IS NULL;
