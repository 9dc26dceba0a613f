-- The manifest revision a succeeded staging is pinned to, as `repository@digest`: its pinned
-- reference without the registry host, so two stagings with the same value share one manifest
-- even if the internal registry was renamed in between. The pruner groups by it and a failed
-- staging's cleanup looks it up; written once here instead of as an expression in each query.
ALTER TABLE stagings ADD COLUMN pinned_manifest text
    GENERATED ALWAYS AS (substr(pinned_image, strpos(pinned_image, '/') + 1)) STORED;
DROP INDEX stagings_manifest_in_registry;
CREATE INDEX stagings_manifest_in_registry ON stagings (pinned_manifest)
    WHERE state = 'succeeded' AND pruned_at IS NULL;
