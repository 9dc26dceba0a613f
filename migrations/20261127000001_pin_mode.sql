-- A staging's mode (issue: opt-in per app, and pin-only). `copy`, the default, copies the image
-- into the internal registry as before. `pin` resolves the tag upstream, checks the manifest and
-- the config, and answers upstream's reference pinned by digest: nothing is copied, the image
-- stays where it was published.
ALTER TABLE stagings ADD COLUMN mode text NOT NULL DEFAULT 'copy' CHECK (mode IN ('copy', 'pin'));

-- A pinned-only staging keeps nothing in the internal registry, so it has no tag there, moved
-- no bytes into it, and nothing of it is ever pruned.
ALTER TABLE stagings ADD CONSTRAINT pin_keeps_nothing_internal CHECK (
    mode = 'copy'
    OR (tagged_image IS NULL AND bytes_copied = 0 AND bytes_mounted = 0 AND blobs_copied = 0
        AND blobs_mounted = 0 AND pruned_at IS NULL)
);

-- `pinned_manifest` names a manifest revision in the internal registry, which only a copy has. A
-- pinned-only staging's upstream path could spell an internal repository's name
-- (`evil.example/tailor/<app>`), and the pruner and a failed staging's cleanup delete what this
-- column names: for a pin it is NULL. (PostgreSQL 15 cannot change a generated column's
-- expression in place, so it is made again; its index goes with it and is made again too.)
ALTER TABLE stagings DROP COLUMN pinned_manifest;
ALTER TABLE stagings ADD COLUMN pinned_manifest text GENERATED ALWAYS AS (
    CASE WHEN mode = 'copy' THEN substr(pinned_image, strpos(pinned_image, '/') + 1) END
) STORED;
CREATE INDEX stagings_manifest_in_registry ON stagings (pinned_manifest)
    WHERE state = 'succeeded' AND pruned_at IS NULL;
