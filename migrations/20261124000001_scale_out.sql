-- Trust boundaries and scale-out: staging deadlines, each staging's source registry (whose
-- rate-limit budget it spends), blob origins (which locations a tenant may mount from), leases
-- instead of locks held across network calls, the fleet's rate-limit budgets, callbacks
-- delivered one by one, and counters that keep /metrics O(1) in the number of stagings.

-- A staging fails with TIMEOUT at its deadline, wherever it is (queued, backing off, running).
-- Stagers set it from TAILOR_STAGING_TIMEOUT or the request; the default is that setting's.
ALTER TABLE stagings ADD COLUMN deadline_at timestamptz;
UPDATE stagings SET deadline_at = created_at + interval '15 minutes';
ALTER TABLE stagings ALTER COLUMN deadline_at SET DEFAULT now() + interval '15 minutes';
ALTER TABLE stagings ALTER COLUMN deadline_at SET NOT NULL;
CREATE INDEX stagings_deadline ON stagings (deadline_at) WHERE state IN ('queued', 'running');

-- The registry the image comes from, as named in references (source_image is always stored
-- fully qualified, registry first): the key of its rate-limit budget.
ALTER TABLE stagings ADD COLUMN source_registry text
    GENERATED ALWAYS AS (split_part(source_image, '/', 1)) STORED;
-- Whose budget: the registry for anonymous pulls, `registry#<hash of the account>` for pulls
-- with credentials (one tenant's exhausted quota is not everyone's).
ALTER TABLE stagings ADD COLUMN budget_key text;
UPDATE stagings SET budget_key = source_registry;
ALTER TABLE stagings ALTER COLUMN budget_key SET NOT NULL;
-- A row written without one (by hand, or by an older stager) spends its registry's.
CREATE FUNCTION default_budget_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.budget_key := coalesce(NEW.budget_key, split_part(NEW.source_image, '/', 1));
    RETURN NEW;
END $$;
CREATE TRIGGER stagings_default_budget_key BEFORE INSERT ON stagings
    FOR EACH ROW EXECUTE FUNCTION default_budget_key();

-- Why a queued staging is not running: backing off after `last_error`, waiting for its
-- registry's rate-limit budget, or for the internal registry's maintenance window to end.
ALTER TABLE stagings ADD COLUMN waiting_for text
    CHECK (waiting_for IN ('retry', 'rate_limit', 'maintenance'));
ALTER TABLE stagings ADD CONSTRAINT waiting_only_while_queued CHECK (
    waiting_for IS NULL OR state = 'queued'
);
CREATE INDEX stagings_waiting ON stagings (waiting_for) WHERE state = 'queued' AND waiting_for IS NOT NULL;
-- How many times a worker holding the staging vanished (its lease expired).
ALTER TABLE stagings ADD COLUMN workers_lost integer NOT NULL DEFAULT 0 CHECK (workers_lost >= 0);

-- Which upstream registry a location's copy of the blob was verified from. A staging mounts
-- only locations of its own source's origin; rows from before origins were recorded (NULL)
-- are never mount sources.
ALTER TABLE blob_locations ADD COLUMN origin_registry text;
CREATE INDEX blob_locations_origin ON blob_locations (digest, origin_registry);

-- Leases: exclusion that outlives no process. A row is held by `holder` until `expires_at`;
-- its heartbeat renews it; whoever finds it expired may take it. Shared holders of one
-- resource coexist; an exclusive holder excludes everyone else.
--   repository:<name>  stagings copying into it (shared) against the pruner (exclusive)
--   blob:<origin>:<digest>  the one copy fetching the blob from that upstream (exclusive)
--   prune              one prune run at a time (exclusive)
CREATE TABLE leases (
    resource    text NOT NULL,
    holder      text NOT NULL,
    exclusive   boolean NOT NULL,
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (resource, holder)
);
CREATE INDEX leases_holder ON leases (holder);

-- Takes (or renews) a lease if nobody conflicting holds it. The advisory lock only serialises
-- acquirers of one resource for the length of this call, never across a network call.
CREATE FUNCTION acquire_lease(p_resource text, p_holder text, p_exclusive boolean, p_seconds float8)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('tailor-lease:' || p_resource, 11));
    DELETE FROM leases WHERE resource = p_resource AND expires_at < now();
    IF EXISTS (SELECT 1 FROM leases
               WHERE resource = p_resource AND holder <> p_holder
                 AND (p_exclusive OR exclusive)) THEN
        RETURN false;
    END IF;
    INSERT INTO leases (resource, holder, exclusive, expires_at)
    VALUES (p_resource, p_holder, p_exclusive, now() + make_interval(secs => p_seconds))
    ON CONFLICT (resource, holder) DO UPDATE
        SET exclusive = excluded.exclusive, expires_at = excluded.expires_at;
    RETURN true;
END $$;

-- The fleet's rate-limit budget per upstream registry (and account: see stagings.budget_key),
-- learned from 429s (`Retry-After`) and
-- Docker Hub's `ratelimit-*` headers. Until `blocked_until` nobody sends to the registry; after
-- it, one worker probes (`probe_holder` until `probe_until`) while the others keep waiting.
CREATE TABLE registry_budgets (
    budget_key      text PRIMARY KEY,
    blocked_until   timestamptz,
    probe_holder    text,
    probe_until     timestamptz,
    limit_count     integer,
    remaining       integer,
    window_seconds  integer,
    rate_limited_total bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- May `p_holder` start work spending budget `p_budget_key` now? 'go' when nothing is known against it;
-- 'probe' when a block has just expired and this holder is the one to try (until
-- `p_probe_seconds` from now); 'wait' (with when) while blocked or while another holder probes.
CREATE FUNCTION admit_to_registry(p_budget_key text, p_holder text, p_probe_seconds float8,
                                  OUT verdict text, OUT wait_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    b registry_budgets%ROWTYPE;
BEGIN
    SELECT * INTO b FROM registry_budgets WHERE budget_key = p_budget_key FOR UPDATE;
    IF NOT FOUND OR b.blocked_until IS NULL THEN
        verdict := 'go';
    ELSIF b.blocked_until > now() THEN
        verdict := 'wait';
        wait_until := b.blocked_until;
    ELSIF b.probe_holder IS NOT NULL AND b.probe_holder <> p_holder AND b.probe_until > now() THEN
        verdict := 'wait';
        wait_until := b.probe_until;
    ELSE
        UPDATE registry_budgets
        SET probe_holder = p_holder, probe_until = now() + make_interval(secs => p_probe_seconds),
            updated_at = now()
        WHERE budget_key = p_budget_key;
        verdict := 'probe';
    END IF;
END $$;

-- Callbacks are claimed one by one for the length of one delivery attempt, and given up
-- after the configured retry period.
ALTER TABLE callbacks ADD COLUMN claimed_until timestamptz;
ALTER TABLE callbacks ADD COLUMN gave_up_at timestamptz;
DROP INDEX callbacks_due;
CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE delivered_at IS NULL AND gave_up_at IS NULL;
-- The oldest callback still pending (an alert's input), without a scan.
CREATE INDEX callbacks_pending_age ON callbacks (created_at) WHERE delivered_at IS NULL AND gave_up_at IS NULL;

-- /metrics without scanning stagings: every change of state appends a delta (appends never
-- contend), and scrapes fold the deltas into totals.
CREATE TABLE staging_state_deltas (
    id    bigserial PRIMARY KEY,
    state staging_state NOT NULL,
    delta bigint NOT NULL
);
CREATE TABLE staging_state_totals (
    state staging_state PRIMARY KEY,
    n     bigint NOT NULL
);

-- Failures by error code, for alerts on what fails; counted the same way.
CREATE TABLE staging_failure_deltas (
    id    bigserial PRIMARY KEY,
    code  text NOT NULL,
    delta bigint NOT NULL
);
CREATE TABLE staging_failure_totals (
    code text PRIMARY KEY,
    n    bigint NOT NULL
);
INSERT INTO staging_failure_totals (code, n)
SELECT coalesce(error_code, 'UNKNOWN'), count(*) FROM stagings WHERE state = 'failed' GROUP BY 1;

CREATE FUNCTION count_inserted_stagings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO staging_state_deltas (state, delta)
    SELECT state, count(*) FROM new_rows GROUP BY state;
    INSERT INTO staging_failure_deltas (code, delta)
    SELECT coalesce(error_code, 'UNKNOWN'), count(*) FROM new_rows WHERE state = 'failed' GROUP BY 1;
    RETURN NULL;
END $$;

CREATE FUNCTION count_updated_stagings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO staging_state_deltas (state, delta)
    SELECT state, sum(delta) FROM (
        SELECT o.state, -1 AS delta FROM old_rows o JOIN new_rows n USING (staging_guid)
        WHERE o.state <> n.state
        UNION ALL
        SELECT n.state, 1 FROM old_rows o JOIN new_rows n USING (staging_guid)
        WHERE o.state <> n.state
    ) AS changes GROUP BY state;
    INSERT INTO staging_failure_deltas (code, delta)
    SELECT coalesce(n.error_code, 'UNKNOWN'), count(*)
    FROM old_rows o JOIN new_rows n USING (staging_guid)
    WHERE o.state <> n.state AND n.state = 'failed' GROUP BY 1;
    RETURN NULL;
END $$;

CREATE FUNCTION count_deleted_stagings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO staging_state_deltas (state, delta)
    SELECT state, -count(*) FROM old_rows GROUP BY state;
    RETURN NULL;
END $$;

CREATE TRIGGER stagings_count_insert AFTER INSERT ON stagings
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_inserted_stagings();
CREATE TRIGGER stagings_count_update AFTER UPDATE ON stagings
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_updated_stagings();
CREATE TRIGGER stagings_count_delete AFTER DELETE ON stagings
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_deleted_stagings();

INSERT INTO staging_state_totals (state, n)
SELECT state, count(*) FROM stagings GROUP BY state;

-- Successful copies, for the byte counters and the duration histogram: one delta row per
-- success (written with it), folded into one totals row like the state counts.
CREATE TABLE staging_success_deltas (
    id            bigserial PRIMARY KEY,
    bytes_copied  bigint NOT NULL,
    bytes_mounted bigint NOT NULL,
    bytes_skipped bigint NOT NULL,
    seconds       float8 NOT NULL
);
CREATE TABLE staging_success_totals (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    bytes_copied  bigint NOT NULL DEFAULT 0,
    bytes_mounted bigint NOT NULL DEFAULT 0,
    bytes_skipped bigint NOT NULL DEFAULT 0,
    count         bigint NOT NULL DEFAULT 0,
    seconds_sum   float8 NOT NULL DEFAULT 0,
    -- Cumulative counts at or under each bound of the histogram (see staging::metrics).
    buckets       bigint[] NOT NULL DEFAULT '{0,0,0,0,0,0,0,0,0}'
);
INSERT INTO staging_success_totals (bytes_copied, bytes_mounted, bytes_skipped, count, seconds_sum, buckets)
SELECT coalesce(sum(bytes_copied), 0), coalesce(sum(bytes_mounted), 0), coalesce(sum(bytes_skipped), 0),
       count(*), coalesce(sum(secs), 0),
       ARRAY[count(*) FILTER (WHERE secs <= 0.1), count(*) FILTER (WHERE secs <= 0.25),
             count(*) FILTER (WHERE secs <= 0.5), count(*) FILTER (WHERE secs <= 1),
             count(*) FILTER (WHERE secs <= 2.5), count(*) FILTER (WHERE secs <= 5),
             count(*) FILTER (WHERE secs <= 10), count(*) FILTER (WHERE secs <= 30),
             count(*) FILTER (WHERE secs <= 120)]
FROM (SELECT bytes_copied, bytes_mounted, bytes_skipped,
             extract(epoch FROM finished_at - started_at)::float8 AS secs
      FROM stagings WHERE state = 'succeeded') AS s;

-- Pending callbacks, counted the same way.
CREATE TABLE callback_pending_deltas (
    id    bigserial PRIMARY KEY,
    delta bigint NOT NULL
);
CREATE TABLE callback_pending_total (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    n  bigint NOT NULL DEFAULT 0
);
INSERT INTO callback_pending_total (n)
SELECT count(*) FROM callbacks WHERE delivered_at IS NULL;

CREATE FUNCTION count_callbacks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO callback_pending_deltas (delta)
        SELECT count(*) FROM new_rows WHERE delivered_at IS NULL AND gave_up_at IS NULL
        HAVING count(*) > 0;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO callback_pending_deltas (delta)
        SELECT sum(CASE WHEN n.delivered_at IS NULL AND n.gave_up_at IS NULL THEN 1 ELSE 0 END
                 - CASE WHEN o.delivered_at IS NULL AND o.gave_up_at IS NULL THEN 1 ELSE 0 END)
        FROM old_rows o JOIN new_rows n USING (id)
        HAVING sum(CASE WHEN n.delivered_at IS NULL AND n.gave_up_at IS NULL THEN 1 ELSE 0 END
                 - CASE WHEN o.delivered_at IS NULL AND o.gave_up_at IS NULL THEN 1 ELSE 0 END) <> 0;
    ELSE
        INSERT INTO callback_pending_deltas (delta)
        SELECT -count(*) FROM old_rows WHERE delivered_at IS NULL AND gave_up_at IS NULL
        HAVING count(*) > 0;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER callbacks_count_insert AFTER INSERT ON callbacks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_callbacks();
CREATE TRIGGER callbacks_count_update AFTER UPDATE ON callbacks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_callbacks();
CREATE TRIGGER callbacks_count_delete AFTER DELETE ON callbacks
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_callbacks();
