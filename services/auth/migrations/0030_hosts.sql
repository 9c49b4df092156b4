-- Hosts (services/auth/hosts.py): the machines that run capsules, their
-- one-time registration tokens, refresh-token chains and tags. Tokens are
-- stored only as SHA-256 hashes; host JWTs are not stored (they are signed).

CREATE TABLE hosts (
    id                 text PRIMARY KEY,
    type               text NOT NULL CHECK (type IN ('regular', 'byoc')),
    team_id            text REFERENCES teams (id),
    provider           text,
    availability_zone  text,
    arch               text,
    cpu_cores          integer,
    memory_mb          bigint,
    disk_gb            bigint,
    address            text,
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'online', 'offline', 'draining', 'unreachable')),
    last_heartbeat_at  timestamptz,
    created_by         text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- A BYOC host belongs to a team; a regular (platform) host to none.
    CHECK ((type = 'byoc') = (team_id IS NOT NULL))
);
CREATE INDEX hosts_team ON hosts (team_id) WHERE team_id IS NOT NULL;
-- The silence monitor scans online hosts by their last heartbeat.
CREATE INDEX hosts_online_heartbeat ON hosts (last_heartbeat_at) WHERE status = 'online';

CREATE TABLE host_registration_tokens (
    token_hash  bytea PRIMARY KEY,
    host_id     text NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX host_registration_tokens_host ON host_registration_tokens (host_id);

-- One chain per registration: each refresh rotates the token within the
-- chain; presenting a rotated token revokes the whole chain (and the JWTs
-- issued in it, which carry the chain id).
CREATE TABLE host_token_chains (
    id          text PRIMARY KEY,
    host_id     text NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    revoked_reason text
);
CREATE INDEX host_token_chains_host ON host_token_chains (host_id);

CREATE TABLE host_refresh_tokens (
    token_hash  bytea PRIMARY KEY,
    chain_id    text NOT NULL REFERENCES host_token_chains (id) ON DELETE CASCADE,
    host_id     text NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    expires_at  timestamptz NOT NULL,
    rotated_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX host_refresh_tokens_chain ON host_refresh_tokens (chain_id);

CREATE TABLE host_tags (
    host_id     text NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    tag         text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host_id, tag)
);
