-- Search over staged images (GET /images?q=): a succeeded staging is found by the words of its
-- source reference (registry, repository path, tag), its digest, its app GUID and the values of
-- its image's labels.

-- The image config's labels as the worker kept them (bounded and cleaned): {"key": "value"}.
ALTER TABLE stagings ADD COLUMN image_labels jsonb
    CHECK (image_labels IS NULL OR jsonb_typeof(image_labels) = 'object');

-- The words, with the 'simple' configuration (no stemming or stop words: image names are not
-- prose). A reference's separators become spaces, so `docker.io/library/redis:7` is found by
-- `redis`; a digest is found by its hex, whole or by prefix. Label values are split the same
-- way (`1.2.3`, `github.com/acme/app`, `ops@acme.io`); only `/`, `@` and `.` are turned into
-- spaces there, which keeps the JSON valid (its keys and values are strings only).
ALTER TABLE stagings ADD COLUMN search_words tsvector GENERATED ALWAYS AS (
    to_tsvector('simple'::regconfig,
        translate(source_image, '/:@.', '    ') || ' ' ||
        coalesce(replace(source_digest, 'sha256:', ''), '') || ' ' ||
        app_guid::text)
    || coalesce(jsonb_to_tsvector('simple'::regconfig,
                                  translate(image_labels::text, '/@.', '   ')::jsonb,
                                  '["string"]'), ''::tsvector)
) STORED;

-- Only what search answers: images that are staged and still kept.
CREATE INDEX stagings_search ON stagings USING gin (search_words)
    WHERE state = 'succeeded' AND pruned_at IS NULL;
-- Its order and its pages: newest first.
CREATE INDEX stagings_staged_newest ON stagings (created_at DESC, staging_guid DESC)
    WHERE state = 'succeeded' AND pruned_at IS NULL;
