-- Teams, user search and API keys: indexes for the queries they run.

-- /v1/users/search matches live addresses by prefix (LIKE 'ana@%').
CREATE INDEX users_email_prefix ON users (lower(email) text_pattern_ops) WHERE deleted_at IS NULL;

-- Moving or revoking the sessions whose active team a user lost.
CREATE INDEX sessions_team_user ON sessions (team_id, user_id) WHERE revoked_at IS NULL;

-- Revoking the keys a departing member created in a team.
CREATE INDEX api_keys_team_creator ON api_keys (team_id, created_by) WHERE deleted_at IS NULL;
