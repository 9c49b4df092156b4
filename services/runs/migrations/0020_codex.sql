-- codex-oauth sign-ins, per team. Tokens are sealed (pynacl SecretBox, key codex.key or
-- DOVECOTE_CODEX_KEY): "sealed" holds access token, refresh token and expiry; key_id names the key.
CREATE TABLE codex_credentials (
    team_id     text        PRIMARY KEY,
    sealed      bytea       NOT NULL,
    key_id      text        NOT NULL,
    expires_at  timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Authorization requests in flight: the one-time state, its team and the sealed PKCE verifier.
CREATE TABLE codex_logins (
    state         text        PRIMARY KEY,
    team_id       text        NOT NULL,
    sealed        bytea       NOT NULL,
    redirect_uri  text        NOT NULL,
    expires_at    timestamptz NOT NULL
);
