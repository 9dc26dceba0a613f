-- Pruning: the reference ledger the platform feeds, what every staged image is made of, and
-- an audit trail of what the pruner deleted.

-- Set by a reference sync (PUT /references) that did not list the staging; cleared by one
-- that lists it again. Together with released_at it says whether an image is still in use.
ALTER TABLE stagings ADD COLUMN unreferenced_at timestamptz;
-- Set when the pruner deleted the staging's manifest from the internal registry.
ALTER TABLE stagings ADD COLUMN pruned_at timestamptz;
ALTER TABLE stagings ADD CONSTRAINT pruned_only_when_succeeded CHECK (
    pruned_at IS NULL OR state = 'succeeded'
);
-- The pruner's scans: images still in the registry, by app and by manifest revision (the
-- pinned reference without its host: which other stagings share a manifest).
CREATE INDEX stagings_in_registry ON stagings (app_guid, finished_at DESC)
    WHERE state = 'succeeded' AND pruned_at IS NULL;
CREATE INDEX stagings_manifest_in_registry
    ON stagings ((substr(pinned_image, strpos(pinned_image, '/') + 1)))
    WHERE state = 'succeeded' AND pruned_at IS NULL;

-- Apps the platform deleted (DELETE /apps/{guid}): their newest image is no longer protected.
-- A new staging for the app removes the row (the app is evidently alive).
CREATE TABLE deleted_apps (
    app_guid    uuid PRIMARY KEY,
    deleted_at  timestamptz NOT NULL DEFAULT now()
);

-- Every object a staged image is made of in the internal registry: its manifest, its config
-- and its layers, with sizes. The pruner reports as reclaimable the objects that only pruned
-- images use.
CREATE TABLE staging_objects (
    staging_guid uuid NOT NULL REFERENCES stagings (staging_guid) ON DELETE CASCADE,
    digest       text NOT NULL CHECK (digest ~ '^sha256:[0-9a-f]{64}$'),
    size         bigint NOT NULL CHECK (size >= 0),
    PRIMARY KEY (staging_guid, digest)
);
CREATE INDEX staging_objects_digest ON staging_objects (digest);

-- One row per prune run that changed something or tried to (dry runs write nothing).
CREATE TABLE prune_runs (
    id                bigserial PRIMARY KEY,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    grace_seconds     bigint NOT NULL CHECK (grace_seconds >= 0),
    outcome           text NOT NULL DEFAULT 'running'
                      CHECK (outcome IN ('running', 'nothing_to_do', 'pruned', 'error')),
    images_pruned     integer NOT NULL DEFAULT 0,
    manifests_deleted integer NOT NULL DEFAULT 0,
    bytes_reclaimable bigint NOT NULL DEFAULT 0,
    error             text
);

-- Every staging the pruner removed, and why. Kept when stagings are gone.
CREATE TABLE prune_audit (
    id              bigserial PRIMARY KEY,
    run_id          bigint NOT NULL REFERENCES prune_runs (id),
    pruned_at       timestamptz NOT NULL DEFAULT now(),
    staging_guid    uuid NOT NULL,
    app_guid        uuid NOT NULL,
    repository      text NOT NULL,
    manifest_digest text NOT NULL,
    -- Why the image was no longer needed.
    reason          text NOT NULL CHECK (reason IN ('released', 'unreferenced', 'app_deleted')),
    -- 'deleting': written (and committed) before the DELETE is sent, so a deletion is on
    -- record even if what follows fails; 'deleted': this run deleted the manifest;
    -- 'already_gone': the registry no longer had it.
    action          text NOT NULL CHECK (action IN ('deleting', 'deleted', 'already_gone'))
);
CREATE INDEX prune_audit_staging ON prune_audit (staging_guid);
