-- Stagings: one row per staging request. The table is also the work queue: workers claim
-- queued rows whose run_after has passed with FOR UPDATE SKIP LOCKED and hold them by a lease.

CREATE TYPE staging_state AS ENUM ('queued', 'running', 'succeeded', 'failed', 'cancelled');

CREATE TABLE stagings (
    staging_guid        uuid PRIMARY KEY,
    app_guid            uuid NOT NULL,
    -- The reference as the client sent it and as parsed (registry/repository[:tag][@digest]).
    source_image        text NOT NULL,
    platform            text NOT NULL,
    -- sha256 of the normalised request, so a repeated POST is idempotent and a different
    -- body under the same staging GUID is a conflict.
    request_fingerprint bytea NOT NULL,
    completion_callback text,
    -- 'stage' (POST /stage) or 'diego' (PUT /v1/staging): the shape of the completion callback.
    api                 text NOT NULL DEFAULT 'stage' CHECK (api IN ('stage', 'diego')),
    -- AES-256-GCM (nonce || ciphertext) of the registry credentials, present only while the
    -- staging is queued or running.
    encrypted_credentials bytea,

    state               staging_state NOT NULL DEFAULT 'queued',
    attempts            integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    run_after           timestamptz NOT NULL DEFAULT now(),
    lease_owner         text,
    lease_expires_at    timestamptz,
    cancel_requested    boolean NOT NULL DEFAULT false,

    error_code          text,
    error_message       text,
    -- When the last attempt failed transiently, why (the staging is queued again).
    last_error          text,

    source_digest       text,
    pinned_image        text,
    tagged_image        text,
    bytes_total         bigint,
    bytes_done          bigint NOT NULL DEFAULT 0,
    bytes_copied        bigint NOT NULL DEFAULT 0,
    bytes_mounted       bigint NOT NULL DEFAULT 0,
    bytes_skipped       bigint NOT NULL DEFAULT 0,
    blobs_copied        integer NOT NULL DEFAULT 0,
    blobs_mounted       integer NOT NULL DEFAULT 0,
    blobs_skipped       integer NOT NULL DEFAULT 0,
    -- Derived from the image config for the platform: the start command and Diego's
    -- execution metadata (a JSON string).
    start_command       text,
    execution_metadata  text,

    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    -- Set when the platform no longer needs the image (DELETE on a finished staging).
    released_at         timestamptz,

    -- A lease belongs to a running staging and only to one.
    CONSTRAINT lease_only_while_running CHECK (
        (state = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)
    ),
    CONSTRAINT result_only_when_succeeded CHECK (
        (state = 'succeeded') = (pinned_image IS NOT NULL)
    ),
    CONSTRAINT credentials_only_while_active CHECK (
        encrypted_credentials IS NULL OR state IN ('queued', 'running')
    )
);

CREATE INDEX stagings_app ON stagings (app_guid, created_at DESC);
-- The queue's hot path: the next claimable staging.
CREATE INDEX stagings_claimable ON stagings (created_at) WHERE state = 'queued';
CREATE INDEX stagings_leases ON stagings (lease_expires_at) WHERE state = 'running';

-- The blob index: which internal repositories hold which blob. It is the list of mount
-- sources for cross-repository mounts and the ledger that lets a staging skip blobs
-- another staging already brought in.
CREATE TABLE blobs (
    digest      text PRIMARY KEY CHECK (digest ~ '^sha256:[0-9a-f]{64}$'),
    size        bigint NOT NULL CHECK (size >= 0),
    media_type  text NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE blob_locations (
    digest      text NOT NULL REFERENCES blobs (digest) ON DELETE CASCADE,
    repository  text NOT NULL,
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (digest, repository)
);

-- The callback outbox: a staging's end and its completion callback are written in one
-- transaction; deliverers claim due rows with FOR UPDATE SKIP LOCKED and retry with backoff,
-- so a callback survives any restart.
CREATE TABLE callbacks (
    id              bigserial PRIMARY KEY,
    staging_guid    uuid NOT NULL REFERENCES stagings (staging_guid) ON DELETE CASCADE,
    url             text NOT NULL,
    payload         jsonb NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE delivered_at IS NULL;
