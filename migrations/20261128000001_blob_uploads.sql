-- Resuming inside a blob: where an interrupted chunked upload into the internal registry
-- stands. The upload session at `location` holds the blob's first `uploaded` bytes, read from
-- `origin_registry`, and `hash_state` is the SHA-256 state of those bytes (the digest crate's
-- serialised state). Written after each chunk by the copy holding the blob's fetch lease
-- (blob:<origin>:<digest>), read by the next one; deleted when the blob is done or cannot be
-- resumed. Writes and deletes are fenced by that lease (a holder whose lease expired changes
-- nothing). The hash state is not checked against the uploaded bytes here; the registry checks
-- the whole blob against `digest` when the upload is committed.
CREATE TABLE blob_uploads (
    repository      text NOT NULL,
    digest          text NOT NULL,
    origin_registry text NOT NULL,
    size            bigint NOT NULL,
    location        text NOT NULL CHECK (length(location) BETWEEN 1 AND 4096),
    -- A checkpoint is strictly inside its blob: the last chunk commits, it is never recorded.
    uploaded        bigint NOT NULL,
    hash_state      bytea NOT NULL CHECK (octet_length(hash_state) BETWEEN 1 AND 256),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repository, digest, origin_registry),
    CONSTRAINT checkpoint_inside_its_blob CHECK (uploaded > 0 AND uploaded < size)
);
-- The pruner forgets checkpoints older than the registry keeps unfinished uploads.
CREATE INDEX blob_uploads_updated ON blob_uploads (updated_at);
