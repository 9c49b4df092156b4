-- Every start of the service's process, recorded by the runtime; health
-- details report the count so a crash loop is visible from /healthz.
CREATE TABLE service_starts (
    id         bigserial PRIMARY KEY,
    host_id    text        NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
