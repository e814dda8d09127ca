-- fraiseql_obs: error capture, counters and the triage workflow.
--
-- Capture is SECURITY DEFINER with a pinned search_path: a role that was
-- granted EXECUTE can capture without any privilege on the tables.

CREATE FUNCTION _fraiseql_severity_rank(severity text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE severity
        WHEN 'debug' THEN 0 WHEN 'info' THEN 1 WHEN 'warning' THEN 2
        WHEN 'error' THEN 3 WHEN 'critical' THEN 4 END
$$;

-- The capture path. Both public entry points run this one body, generated
-- below with format() so that a capture is a single PL/pgSQL call (a nested
-- call, with its own search_path switch, cost ~10% of capture throughput).
-- SECURITY DEFINER with a pinned search_path: a role that was granted EXECUTE
-- captures without any privilege on the tables.
-- Hot path: one call into Rust, one statement that finds the group and counts
-- on this backend's stripe, one occurrence insert. The group row itself is
-- only written when a group is created, regresses or escalates its severity.
DO $outer$
DECLARE
    body text := $body$
DECLARE
    $ARGS$
    v_prep     text[];
    v_fp       text;
    v_group    record;
    v_error_id uuid;
    v_meta     jsonb;
    v_message  text;
    v_stack    text;
    v_context  jsonb;
    v_stripe   integer;
    v_is_new   boolean := false;
    v_regressed boolean := false;
    v_stored   boolean := false;
    v_has_rules boolean := false;
BEGIN
    -- Validates (a clear error naming the argument; nothing is written before
    -- it), resolves environment and trace context, computes the fingerprint.
    v_prep := _fraiseql_prepare_capture(p_exception_type, p_message, p_stack_trace, jsonb_typeof(p_context),
                                        p_severity, p_occurred_at, p_environment, p_trace_id, p_span_id,
                                        p_fingerprint, p_context->'fingerprint', p_is_message);
    v_fp := v_prep[1];
    -- Oversized input is cut to the limits, with a visible marker.
    v_message := CASE WHEN octet_length(p_message) > current_setting('fraiseql_obs.max_message_bytes')::integer
                      THEN _fraiseql_clip_message(p_message) ELSE p_message END;
    v_stack   := CASE WHEN octet_length(p_stack_trace) > current_setting('fraiseql_obs.max_stack_trace_bytes')::integer
                      THEN _fraiseql_clip_stack_trace(p_stack_trace) ELSE p_stack_trace END;
    v_context := CASE WHEN pg_column_size(p_context) > current_setting('fraiseql_obs.max_context_bytes')::integer
                      THEN _fraiseql_clip_context(p_context) ELSE coalesce(p_context, '{}'::jsonb) END;

    -- Common case, ONE statement: the group exists and this backend already
    -- has a counter stripe for it. It counts on the stripe (never waits on
    -- other sessions: the stripe is this backend's own), reads the group,
    -- stores the occurrence and tells whether notification rules exist.
    -- (Data-modifying CTEs always run to completion.)
    v_stripe := _fraiseql_stripe();
    WITH counted AS (
        UPDATE tb_error_counter c
           SET occurrence_count = c.occurrence_count + 1,
               first_seen = least(c.first_seen, p_occurred_at),
               last_seen = greatest(c.last_seen, p_occurred_at)
          FROM tb_error_log g
         WHERE g.error_fingerprint = v_fp AND c.error_id = g.error_id AND c.stripe = v_stripe
        RETURNING g.error_id, g.status, g.severity, g.resolved_at
    ), stored AS (
        INSERT INTO tb_error_occurrence
            (error_id, occurred_at, error_type, message, stack_trace, context, severity,
             environment, release_version, trace_id, span_id)
        SELECT k.error_id, p_occurred_at, p_exception_type, v_message, v_stack, v_context,
               p_severity, v_prep[2], p_release_version, v_prep[3], v_prep[4]
          FROM counted k
        RETURNING 1
    )
    SELECT k.error_id, k.status, k.severity, k.resolved_at,
           EXISTS (SELECT 1 FROM tb_error_notification_config WHERE enabled) AS has_rules
      INTO v_group
      FROM counted k;
    v_stored := FOUND;
    IF v_stored THEN
        v_has_rules := v_group.has_rules;
    END IF;

    IF NOT v_stored THEN
        SELECT g.error_id, g.status, g.severity, g.resolved_at INTO v_group
          FROM tb_error_log g WHERE g.error_fingerprint = v_fp;
        IF NOT FOUND THEN
            v_meta := _fraiseql_group_meta(p_exception_type, p_message, p_stack_trace);
            INSERT INTO tb_error_log AS g
                (error_fingerprint, fingerprint_version, error_type, error_message, stack_trace,
                 title, culprit, severity, environment, release_version,
                 occurrence_count, first_seen, last_seen)
            VALUES (v_fp, fraiseql_fingerprint_version(), p_exception_type,
                    v_message, v_stack,
                    v_meta->>'title', v_meta->>'culprit', p_severity, v_prep[2], p_release_version,
                    1, p_occurred_at, p_occurred_at)
            ON CONFLICT (error_fingerprint) DO NOTHING
            RETURNING g.error_id INTO v_error_id;
            v_is_new := v_error_id IS NOT NULL;

            IF v_error_id IS NULL THEN
                -- Another session created the group first (we waited for it to commit).
                SELECT g.error_id, g.status, g.severity, g.resolved_at INTO v_group
                  FROM tb_error_log g WHERE g.error_fingerprint = v_fp;
            END IF;
        END IF;
        IF v_error_id IS NULL THEN
            -- first capture of this group by this backend: create its stripe
            INSERT INTO tb_error_counter AS c (error_id, stripe, occurrence_count, first_seen, last_seen)
            VALUES (v_group.error_id, v_stripe, 1, p_occurred_at, p_occurred_at)
            ON CONFLICT (error_id, stripe) DO UPDATE
                SET occurrence_count = c.occurrence_count + 1,
                    first_seen = least(c.first_seen, excluded.first_seen),
                    last_seen = greatest(c.last_seen, excluded.last_seen);
        END IF;
    END IF;

    IF v_error_id IS NULL THEN
        v_error_id := v_group.error_id;
        -- A resolved group that recurs after its resolution is a regression.
        IF v_group.status = 'resolved' AND (v_group.resolved_at IS NULL OR p_occurred_at > v_group.resolved_at) THEN
            UPDATE tb_error_log g
               SET status = 'unresolved', is_regression = true, regressed_at = now(),
                   regression_count = g.regression_count + 1,
                   resolved_at = NULL, resolved_by = NULL
             WHERE g.error_id = v_error_id AND g.status = 'resolved';
            v_regressed := FOUND;
        END IF;
        IF _fraiseql_severity_rank(p_severity) > _fraiseql_severity_rank(v_group.severity) THEN
            UPDATE tb_error_log g SET severity = p_severity
             WHERE g.error_id = v_error_id
               AND _fraiseql_severity_rank(g.severity) < _fraiseql_severity_rank(p_severity);
        END IF;
    END IF;

    IF NOT v_stored THEN
        INSERT INTO tb_error_occurrence
            (error_id, occurred_at, error_type, message, stack_trace, context, severity,
             environment, release_version, trace_id, span_id)
        VALUES (v_error_id, p_occurred_at, p_exception_type, v_message, v_stack, v_context,
                p_severity, v_prep[2], p_release_version, v_prep[3], v_prep[4]);
        v_has_rules := EXISTS (SELECT 1 FROM tb_error_notification_config WHERE enabled);
    END IF;

    -- Notifications are queued in this transaction: a rolled-back capture
    -- notifies nobody, a committed one is never lost.
    IF v_has_rules THEN
        PERFORM _fraiseql_notify_capture(v_error_id, v_fp, p_exception_type, p_severity, v_prep[2], v_is_new, v_regressed,
            jsonb_build_object('message', v_message, 'stack_trace', v_stack, 'context', v_context,
                               'environment', v_prep[2], 'release_version', p_release_version, 'trace_id', v_prep[3]));
        IF v_is_new THEN
            -- the creating capture is occurrence 1 (later counts come from the fold)
            PERFORM _fraiseql_notify_milestones(v_error_id, 0, 1);
        END IF;
    END IF;

    RETURN v_error_id;
END
$body$;
BEGIN
    EXECUTE format($f$
        CREATE FUNCTION fraiseql_capture_error(
            exception_type  text,
            message         text,
            stack_trace     text DEFAULT NULL,
            context         jsonb DEFAULT '{}',
            environment     text DEFAULT NULL,
            severity        text DEFAULT 'error',
            release_version text DEFAULT NULL,
            trace_id        text DEFAULT NULL,
            span_id         text DEFAULT NULL,
            fingerprint     text DEFAULT NULL,
            occurred_at     timestamptz DEFAULT now())
        RETURNS uuid LANGUAGE plpgsql SECURITY DEFINER SET search_path = @extschema@, pg_temp
        AS %L $f$,
        replace(body, '$ARGS$',
            'p_exception_type text := $1; p_message text := $2; p_stack_trace text := $3; p_context jsonb := $4;
             p_environment text := $5; p_severity text := $6; p_release_version text := $7; p_trace_id text := $8;
             p_span_id text := $9; p_fingerprint text := $10; p_occurred_at timestamptz := $11; p_is_message boolean := false;'));
    EXECUTE format($f$
        CREATE FUNCTION fraiseql_capture_message(
            message         text,
            severity        text DEFAULT 'info',
            context         jsonb DEFAULT '{}',
            environment     text DEFAULT NULL,
            release_version text DEFAULT NULL,
            trace_id        text DEFAULT NULL,
            span_id         text DEFAULT NULL,
            fingerprint     text DEFAULT NULL,
            occurred_at     timestamptz DEFAULT now())
        RETURNS uuid LANGUAGE plpgsql SECURITY DEFINER SET search_path = @extschema@, pg_temp
        AS %L $f$,
        replace(body, '$ARGS$',
            'p_exception_type text := ''Message''; p_message text := $1; p_stack_trace text := NULL; p_context jsonb := $3;
             p_environment text := $4; p_severity text := $2; p_release_version text := $5; p_trace_id text := $6;
             p_span_id text := $7; p_fingerprint text := $8; p_occurred_at timestamptz := $9; p_is_message boolean := true;'));
END
$outer$;

COMMENT ON FUNCTION fraiseql_capture_error(text, text, text, jsonb, text, text, text, text, text, text, timestamptz) IS
  'Record one occurrence of an error and return its group''s error_id.';
COMMENT ON FUNCTION fraiseql_capture_message(text, text, jsonb, text, text, text, text, text, timestamptz) IS
  'Record an event without an exception; messages group by their normalized text.';

-- Fold the striped counters into tb_error_log. The worker runs this every
-- flush_interval; call it by hand for exact counts right now. Returns the
-- number of groups updated.
-- It never waits: group rows and stripes that another transaction holds (a
-- capture still in progress) are skipped and folded next time. Waiting there
-- would make every capture on the stripes already taken queue behind it.
CREATE TYPE _fraiseql_fold AS (error_id uuid, old_count bigint, new_count bigint);

CREATE FUNCTION fraiseql_flush_counts() RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = @extschema@, pg_temp
AS $$
DECLARE
    n bigint;
    v_folds @extschema@._fraiseql_fold[];
BEGIN
    -- Stripes are zeroed, not deleted: the next capture on them is then a
    -- cheap in-place (HOT) update. Idle zero stripes are removed below.
    WITH groups AS (
        SELECT g.error_id FROM tb_error_log g
         WHERE g.error_id IN (SELECT DISTINCT c.error_id FROM tb_error_counter c WHERE c.occurrence_count > 0)
         FOR NO KEY UPDATE SKIP LOCKED
    ), stripes AS (
        SELECT c.error_id, c.stripe, c.occurrence_count, c.first_seen, c.last_seen
          FROM tb_error_counter c
         WHERE c.error_id IN (SELECT error_id FROM groups) AND c.occurrence_count > 0
         FOR UPDATE SKIP LOCKED
    ), drained AS (
        UPDATE tb_error_counter c SET occurrence_count = 0
          FROM stripes s
         WHERE c.error_id = s.error_id AND c.stripe = s.stripe
        RETURNING s.*
    ), agg AS (
        SELECT error_id, sum(occurrence_count) AS cnt, min(first_seen) AS fs, max(last_seen) AS ls
          FROM drained GROUP BY error_id
    ), folded AS (
        UPDATE tb_error_log g
           SET occurrence_count = g.occurrence_count + agg.cnt,
               first_seen = least(g.first_seen, agg.fs),
               last_seen = greatest(g.last_seen, agg.ls)
          FROM agg
         WHERE g.error_id = agg.error_id
        RETURNING g.error_id, g.occurrence_count AS new_count, agg.cnt AS added
    )
    SELECT coalesce(array_agg(ROW(f.error_id, f.new_count - f.added, f.new_count)::@extschema@._fraiseql_fold), '{}')
      INTO v_folds FROM folded f;
    n := cardinality(v_folds);
    -- Milestones (notify_on_occurrence) are decided here, where the count is
    -- exact: each fold of a group is serialized (its row is locked).
    IF n > 0 AND EXISTS (SELECT 1 FROM tb_error_notification_config c
                          WHERE c.enabled AND c.notify_on_occurrence IS NOT NULL) THEN
        FOR i IN 1..n LOOP
            PERFORM _fraiseql_notify_milestones(v_folds[i].error_id, v_folds[i].old_count, v_folds[i].new_count);
        END LOOP;
    END IF;
    -- stripes idle for a while: their backend is gone or busy elsewhere
    DELETE FROM tb_error_counter c
     WHERE c.occurrence_count = 0 AND c.last_seen < now() - interval '10 minutes'
       AND c.ctid IN (SELECT ctid FROM tb_error_counter WHERE occurrence_count = 0
                       AND last_seen < now() - interval '10 minutes' FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Error groups with live counts (folded + not yet folded).
CREATE VIEW v_error_groups AS
SELECT g.error_id, g.error_fingerprint, g.error_type, g.error_message, g.stack_trace, g.title, g.culprit,
       g.severity, g.environment, g.release_version, g.status, g.assigned_to,
       (g.occurrence_count + coalesce(c.cnt, 0))::bigint AS occurrence_count,
       least(g.first_seen, c.fs)                     AS first_seen,
       greatest(g.last_seen, c.ls)                   AS last_seen,
       g.resolved_at, g.resolved_by, g.is_regression, g.regressed_at, g.regression_count
  FROM tb_error_log g
  LEFT JOIN (SELECT error_id, sum(occurrence_count) AS cnt, min(first_seen) AS fs, max(last_seen) AS ls
               FROM tb_error_counter WHERE occurrence_count > 0 GROUP BY error_id) c ON c.error_id = g.error_id;

-- ---------------------------------------------------------------------------
-- Workflow
-- ---------------------------------------------------------------------------
CREATE FUNCTION _fraiseql_require_group(p_error_id uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = @extschema@, pg_temp
AS $$
BEGIN
    IF p_error_id IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: error_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM 1 FROM tb_error_log WHERE error_id = p_error_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fraiseql_obs: no error group with error_id %', p_error_id
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;

CREATE FUNCTION fraiseql_resolve_error(error_id uuid, resolved_by text DEFAULT NULL, notes text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = @extschema@, pg_temp
AS $$
BEGIN
    PERFORM _fraiseql_require_group($1);
    UPDATE tb_error_log g
       SET status = 'resolved', resolved_at = now(), resolved_by = $2, resolution_notes = $3,
           is_regression = false
     WHERE g.error_id = $1;
END
$$;

CREATE FUNCTION fraiseql_unresolve_error(error_id uuid) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = @extschema@, pg_temp
AS $$
BEGIN
    PERFORM _fraiseql_require_group($1);
    UPDATE tb_error_log g
       SET status = 'unresolved', resolved_at = NULL, resolved_by = NULL
     WHERE g.error_id = $1;
END
$$;

CREATE FUNCTION fraiseql_ignore_error(error_id uuid) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = @extschema@, pg_temp
AS $$
BEGIN
    PERFORM _fraiseql_require_group($1);
    UPDATE tb_error_log g SET status = 'ignored' WHERE g.error_id = $1;
END
$$;

CREATE FUNCTION fraiseql_assign_error(error_id uuid, assignee text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = @extschema@, pg_temp
AS $$
BEGIN
    PERFORM _fraiseql_require_group($1);
    UPDATE tb_error_log g SET assigned_to = nullif($2, '') WHERE g.error_id = $1;
END
$$;

-- ---------------------------------------------------------------------------
-- The seed's per-occurrence shape, monitoring.errors.
-- ---------------------------------------------------------------------------
CREATE VIEW monitoring.errors AS
SELECT o.occurrence_id          AS id,
       g.error_fingerprint      AS fingerprint,
       o.error_type             AS exception_type,
       o.message,
       o.stack_trace,
       o.context,
       o.environment,
       o.trace_id,
       o.span_id,
       o.occurred_at,
       g.resolved_at,
       (g.status = 'ignored')   AS ignored,
       g.assigned_to            AS assignee,
       o.error_id,
       o.severity,
       o.release_version
  FROM @extschema@.tb_error_occurrence o
  JOIN @extschema@.tb_error_log g ON g.error_id = o.error_id;

-- The seed's retention statement, DELETE FROM monitoring.errors WHERE ...,
-- deletes the occurrences (the groups stay; maintenance prunes empty groups).
CREATE FUNCTION _fraiseql_errors_view_delete() RETURNS trigger
LANGUAGE plpgsql
SET search_path = @extschema@, pg_temp
AS $$
BEGIN
    DELETE FROM tb_error_occurrence o
     WHERE o.occurrence_id = OLD.id AND o.occurred_at = OLD.occurred_at;
    RETURN OLD;
END
$$;

CREATE TRIGGER errors_delete INSTEAD OF DELETE ON monitoring.errors
    FOR EACH ROW EXECUTE FUNCTION _fraiseql_errors_view_delete();
