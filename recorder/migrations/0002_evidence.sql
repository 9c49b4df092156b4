-- The recorder's evidence: subjects (a desktop session, later a browser
-- session or an agent run), their append-only timelines, screenshots stored
-- once by SHA-256 (blobs) and referenced per subject, artifacts, and exports.
CREATE TABLE subjects (
    id                        text PRIMARY KEY,
    kind                      text        NOT NULL,
    team_id                   text        NOT NULL,
    state                     text        NOT NULL DEFAULT 'open'
                              CHECK (state IN ('open', 'closed', 'dropped')),
    meta                      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    last_seq                  bigint      NOT NULL DEFAULT 0,
    entry_bytes               bigint      NOT NULL DEFAULT 0,
    last_captured_at          timestamptz,
    failed_reason             text,
    pinned_until              timestamptz,
    exported_seq              bigint,
    export_generation         integer     NOT NULL DEFAULT 0,
    export_bytes              bigint      NOT NULL DEFAULT 0,
    zip_generation            integer     NOT NULL DEFAULT 0,
    created_at                timestamptz NOT NULL DEFAULT now(),
    closed_at                 timestamptz,
    dropped_at                timestamptz,
    drop_reason               text
);

CREATE TABLE blobs (
    sha256     text PRIMARY KEY,
    key        text        NOT NULL,
    size       bigint      NOT NULL,
    mime_type  text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per (subject, blob): the blob's references. A blob with none is orphaned.
CREATE TABLE subject_blobs (
    subject_id text NOT NULL REFERENCES subjects (id) ON DELETE CASCADE,
    sha256     text NOT NULL REFERENCES blobs (sha256),
    PRIMARY KEY (subject_id, sha256)
);
CREATE INDEX subject_blobs_sha ON subject_blobs (sha256);

CREATE TABLE entries (
    subject_id        text        NOT NULL REFERENCES subjects (id) ON DELETE CASCADE,
    seq               bigint      NOT NULL,
    at                timestamptz NOT NULL,
    kind              text        NOT NULL,
    actor             text        NOT NULL,
    summary           jsonb       NOT NULL,
    screenshot_sha256 text,
    PRIMARY KEY (subject_id, seq)
);

CREATE TABLE artifacts (
    subject_id text        NOT NULL REFERENCES subjects (id) ON DELETE CASCADE,
    name       text        NOT NULL,
    kind       text        NOT NULL,
    mime_type  text        NOT NULL,
    sha256     text        NOT NULL,
    size       bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_id, name)
);

-- Screenshots already in a subject's export bundle (never uploaded twice).
-- Exports are never deleted by Dovecote, so neither are these rows.
CREATE TABLE exported_screens (
    subject_id text NOT NULL,
    sha256     text NOT NULL,
    PRIMARY KEY (subject_id, sha256)
);

CREATE TABLE exports (
    subject_id       text        NOT NULL,
    generation       integer     NOT NULL,
    prefix           text        NOT NULL,
    last_seq         bigint      NOT NULL,
    event_count      integer     NOT NULL,
    screenshot_count integer     NOT NULL,
    bytes            bigint      NOT NULL,
    uploaded         integer     NOT NULL,
    files            jsonb       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_id, generation)
);
