-- The artifacts copied with a staging's image because they refer to it (signatures, SBOMs,
-- attestations): [{digest, media_type, artifact_type?, size, tag?}], what GET /stage/{guid}
-- lists. Bounded by the copy (64 at most). Only a copy has any: a pin copies nothing.
ALTER TABLE stagings ADD COLUMN referrers jsonb NOT NULL DEFAULT '[]'::jsonb
    CHECK (jsonb_typeof(referrers) = 'array');
ALTER TABLE stagings ADD CONSTRAINT pin_copies_no_referrers CHECK (
    mode = 'copy' OR referrers = '[]'::jsonb
);
