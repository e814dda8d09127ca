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

-- The capture path: fraiseql_capture_error() and fraiseql_capture_message()
-- are C functions (src/capture_path.rs). In the common case they only insert
-- the occurrence row; everything else is done here, by the slow path, which
-- they call when a fingerprint is new to the backend, when a resolved group
-- recurs, when a capture raises a group's severity, or when notification
-- rules exist. What it returns about the group is cached (src/group_cache.rs).
CREATE FUNCTION _fraiseql_capture_slow(
    p_fingerprint     text,
    p_occurred_at     timestamptz,
    p_exception_type  text,
    p_message         text,      -- clipped to the limits
    p_stack_trace     text,      -- clipped to the limits
    p_context         jsonb,     -- clipped to the limits
    p_severity        text,
    p_environment     text,
    p_release_version text,
    p_trace_id        text,
    p_span_id         text,
    p_sampled_out     boolean,   -- stored without its heavy parts (spike protection)
    p_raw_message     text,      -- as given: title and culprit are made from it
    p_raw_stack_trace text,
    OUT error_id      uuid,
    OUT resolved      boolean,
    OUT resolved_at   timestamptz,
    OUT severity      text,
    OUT changed       boolean,   -- created or changed by this call
    OUT row_xmin      xid)       -- who wrote the group row as read
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_group     record;
    v_meta      jsonb;
    v_is_new    boolean := false;
    v_regressed boolean := false;
    v_has_rules boolean;
BEGIN
    SELECT g.error_id, g.status, g.severity, g.resolved_at, g.xmin INTO v_group
      FROM @extschema@.tb_error_log g WHERE g.error_fingerprint = p_fingerprint;
    IF NOT FOUND THEN
        v_meta := @extschema@._fraiseql_group_meta(p_exception_type, p_raw_message, p_raw_stack_trace);
        -- occurrence_count starts at 0: the fold counts this occurrence too
        INSERT INTO @extschema@.tb_error_log AS g
            (error_fingerprint, fingerprint_version, error_type, error_message, stack_trace,
             title, culprit, severity, environment, release_version,
             occurrence_count, first_seen, last_seen)
        VALUES (p_fingerprint, @extschema@.fraiseql_fingerprint_version(), p_exception_type,
                p_message, p_stack_trace,
                v_meta->>'title', v_meta->>'culprit', p_severity, p_environment, p_release_version,
                0, p_occurred_at, p_occurred_at)
        ON CONFLICT (error_fingerprint) DO NOTHING
        RETURNING g.error_id, g.status, g.severity, g.resolved_at, g.xmin INTO v_group;
        v_is_new := FOUND;
        IF NOT v_is_new THEN
            -- another session created the group first (we waited for it to commit)
            SELECT g.error_id, g.status, g.severity, g.resolved_at, g.xmin INTO v_group
              FROM @extschema@.tb_error_log g WHERE g.error_fingerprint = p_fingerprint;
        END IF;
    END IF;
    error_id := v_group.error_id;
    resolved := v_group.status = 'resolved';
    resolved_at := v_group.resolved_at;
    severity := v_group.severity;
    row_xmin := v_group.xmin;
    changed := v_is_new;

    IF NOT v_is_new THEN
        -- A resolved group that recurs after its resolution is a regression.
        IF resolved AND (resolved_at IS NULL OR p_occurred_at > resolved_at) THEN
            UPDATE @extschema@.tb_error_log g
               SET status = 'unresolved', is_regression = true, regressed_at = now(),
                   regression_count = g.regression_count + 1,
                   resolved_at = NULL, resolved_by = NULL
             WHERE g.error_id = v_group.error_id AND g.status = 'resolved';
            v_regressed := FOUND;
            resolved := false;
            resolved_at := NULL;
            changed := true;
        END IF;
        IF @extschema@._fraiseql_severity_rank(p_severity) > @extschema@._fraiseql_severity_rank(severity) THEN
            UPDATE @extschema@.tb_error_log g SET severity = p_severity
             WHERE g.error_id = v_group.error_id
               AND @extschema@._fraiseql_severity_rank(g.severity) < @extschema@._fraiseql_severity_rank(p_severity);
            severity := p_severity;
            changed := true;
        END IF;
    END IF;

    INSERT INTO @extschema@.tb_error_occurrence
        (error_id, occurred_at, error_type, message, stack_trace, context, severity,
         environment, release_version, trace_id, span_id, sampled_out)
    VALUES (error_id, p_occurred_at, p_exception_type, p_message, p_stack_trace, p_context,
            p_severity, p_environment, p_release_version, p_trace_id, p_span_id, p_sampled_out);

    -- Notifications are queued in this transaction: a rolled-back capture
    -- notifies nobody, a committed one is never lost.
    v_has_rules := EXISTS (SELECT 1 FROM @extschema@.tb_error_notification_config c WHERE c.enabled);
    IF v_has_rules THEN
        PERFORM @extschema@._fraiseql_notify_capture(error_id, p_fingerprint, p_exception_type, p_severity, p_environment,
            v_is_new, v_regressed,
            jsonb_build_object('message', p_message, 'stack_trace', p_stack_trace, 'context', p_context,
                               'environment', p_environment, 'release_version', p_release_version,
                               'trace_id', p_trace_id));
    END IF;
END
$$;

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
RETURNS uuid
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'fraiseql_capture_error_c';

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
RETURNS uuid
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'fraiseql_capture_message_c';

COMMENT ON FUNCTION fraiseql_capture_error(text, text, text, jsonb, text, text, text, text, text, text, timestamptz) IS
  'Record one occurrence of an error and return its group''s error_id.';
COMMENT ON FUNCTION fraiseql_capture_message(text, text, jsonb, text, text, text, text, text, timestamptz) IS
  'Record an event without an exception; messages group by their normalized text.';

-- Backends cache what capture needs to know about a group; any change to a
-- group's status or severity, a deleted group or a changed rule makes every
-- backend forget (at commit).
CREATE FUNCTION _fraiseql_capture_cache_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@._fraiseql_invalidate_capture_cache();
    RETURN NULL;
END
$$;

CREATE TRIGGER tb_error_log_capture_cache
    AFTER UPDATE OF status, severity, resolved_at OR DELETE ON tb_error_log
    FOR EACH STATEMENT EXECUTE FUNCTION _fraiseql_capture_cache_changed();
CREATE TRIGGER tb_error_log_capture_cache_truncate
    AFTER TRUNCATE ON tb_error_log
    FOR EACH STATEMENT EXECUTE FUNCTION _fraiseql_capture_cache_changed();

-- ---------------------------------------------------------------------------
-- Counting. Captures never update a shared row (on a hot fingerprint that is a
-- lock convoy). Each occurrence row carries the id of the transaction that
-- stored it (capture_xid). The fold counts the rows of the transactions that
-- finished since the previous fold, as PgQ reads its queue between two
-- snapshots: its state says which transactions are counted already (every
-- one below `above`, except those in `in_progress`, which were still running
-- then), and each fold counts the rows of the others that its own snapshot
-- sees finished. So each occurrence is counted exactly once, however long
-- its transaction ran, and a transaction that stays open (here or in another
-- database, prepared or not) delays its own rows only, never the others'.
-- ---------------------------------------------------------------------------
CREATE TYPE _fraiseql_fold AS (error_id uuid, old_count bigint, new_count bigint);

-- The transactions still not counted after a fold that read with `snap`:
-- those its snapshot saw running among the ones not counted before (all
-- from `above`, and `in_progress`). The new state is (xmax of snap, this).
CREATE FUNCTION _fraiseql_still_running(snap pg_snapshot, above xid8, in_progress xid8[]) RETURNS xid8[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY(SELECT x FROM pg_snapshot_xip(snap) AS x WHERE x >= above OR x = ANY (in_progress) ORDER BY x)
$$;

-- Fold the counts into tb_error_log. The worker runs this every
-- flush_interval; call it by hand to bring tb_error_log up to date now
-- (v_error_groups is always exact). Returns the number of groups updated.
-- It never waits: one fold runs at a time (a concurrent call returns 0), and
-- a group row another transaction holds is folded next time. With nothing
-- to count it writes nothing (no transaction id, no WAL).
CREATE FUNCTION fraiseql_flush_counts() RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n       bigint;
    v_state record;
    v_new   bigint;
    v_folds @extschema@._fraiseql_fold[];
BEGIN
    -- One fold at a time: a table lock, which (unlike a row lock) takes no
    -- transaction id, and which (unlike an advisory lock) no other role can
    -- take and hold, since it needs the right to write the table.
    BEGIN
        LOCK TABLE @extschema@.tb_error_fold_state IN SHARE ROW EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;
    END;
    SELECT s.above, s.in_progress INTO v_state FROM @extschema@.tb_error_fold_state s;
    IF NOT FOUND THEN
        RETURN 0;  -- a restore in progress has not brought the state yet
    END IF;

    -- Rows restored from a logical dump of another cluster carry that
    -- cluster's transaction ids. Those not yet reached by this cluster's
    -- counter would be counted again when it gets there: the restored group
    -- counts already include them, so they are set aside once.
    -- (Ids at or past the snapshot's xmax cannot belong to a finished
    -- transaction of this cluster; this transaction's own rows excepted.)
    UPDATE @extschema@.tb_error_occurrence o SET capture_xid = '0'
     WHERE o.capture_xid >= pg_snapshot_xmax(pg_current_snapshot())
       AND o.capture_xid <> coalesce(pg_current_xact_id_if_assigned(), '0');

    -- One statement, one snapshot: count the rows of the transactions it
    -- sees finished that were not counted before, and move the state.
    WITH cur AS (
        SELECT pg_current_snapshot() AS snap
    ), new AS MATERIALIZED (
        SELECT o.error_id, o.occurred_at, o.sampled_out
          FROM @extschema@.tb_error_occurrence o, cur
         WHERE (o.capture_xid >= v_state.above OR o.capture_xid = ANY (v_state.in_progress))
           AND pg_visible_in_snapshot(o.capture_xid, cur.snap)
    ), counted AS (
        SELECT n.error_id, count(*) AS cnt, count(*) FILTER (WHERE n.sampled_out) AS light,
               min(n.occurred_at) AS fs, max(n.occurred_at) AS ls
          FROM new n GROUP BY n.error_id
    ), pending AS (
        INSERT INTO @extschema@.tb_error_count_pending AS p (error_id, occurrence_count, not_stored, first_seen, last_seen)
        SELECT error_id, cnt, light, fs, ls FROM counted
        ON CONFLICT (error_id) DO UPDATE
           SET occurrence_count = p.occurrence_count + excluded.occurrence_count,
               not_stored = p.not_stored + excluded.not_stored,
               first_seen = least(p.first_seen, excluded.first_seen),
               last_seen = greatest(p.last_seen, excluded.last_seen)
    ), moved AS (
        -- only when something was counted: an idle fold writes nothing
        UPDATE @extschema@.tb_error_fold_state s
           SET above = greatest(v_state.above, pg_snapshot_xmax(cur.snap)),
               in_progress = @extschema@._fraiseql_still_running(cur.snap, v_state.above, v_state.in_progress),
               folded_at = now()
          FROM cur
         WHERE EXISTS (SELECT 1 FROM new)
    )
    SELECT count(*) INTO v_new FROM new;

    IF v_new = 0 AND NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_count_pending) THEN
        RETURN 0;
    END IF;

    -- Pending counts go into the group rows that are free now.
    WITH groups AS (
        SELECT g.error_id FROM @extschema@.tb_error_log g
         WHERE g.error_id IN (SELECT p.error_id FROM @extschema@.tb_error_count_pending p)
         FOR NO KEY UPDATE SKIP LOCKED
    ), drained AS (
        DELETE FROM @extschema@.tb_error_count_pending p USING groups
         WHERE p.error_id = groups.error_id
        RETURNING p.*
    ), folded AS (
        UPDATE @extschema@.tb_error_log g
           SET occurrence_count = g.occurrence_count + d.occurrence_count,
               occurrences_not_stored = g.occurrences_not_stored + d.not_stored,
               first_seen = least(g.first_seen, d.first_seen),
               last_seen = greatest(g.last_seen, d.last_seen)
          FROM drained d
         WHERE g.error_id = d.error_id
        RETURNING g.error_id, g.occurrence_count AS new_count, d.occurrence_count AS added
    )
    SELECT coalesce(array_agg(ROW(f.error_id, f.new_count - f.added, f.new_count)::@extschema@._fraiseql_fold), '{}')
      INTO v_folds FROM folded f;
    -- counts of groups deleted meanwhile
    DELETE FROM @extschema@.tb_error_count_pending p
     WHERE NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_log g WHERE g.error_id = p.error_id);

    n := cardinality(v_folds);
    -- Milestones (notify_on_occurrence) are decided here, where the count is
    -- exact: each fold of a group is serialized (its row is locked).
    IF n > 0 AND EXISTS (SELECT 1 FROM @extschema@.tb_error_notification_config c
                          WHERE c.enabled AND c.notify_on_occurrence IS NOT NULL) THEN
        FOR i IN 1..n LOOP
            PERFORM @extschema@._fraiseql_notify_milestones(v_folds[i].error_id, v_folds[i].old_count, v_folds[i].new_count);
        END LOOP;
    END IF;
    RETURN n;
END
$$;

-- Error groups with live counts: folded + pending + not yet folded.
CREATE VIEW v_error_groups AS
SELECT g.error_id, g.error_fingerprint, g.error_type, g.error_message, g.stack_trace, g.title, g.culprit,
       g.severity, g.environment, g.release_version, g.status, g.assigned_to,
       (g.occurrence_count + coalesce(p.occurrence_count, 0) + coalesce(l.cnt, 0))::bigint AS occurrence_count,
       least(g.first_seen, p.first_seen, l.fs)   AS first_seen,
       greatest(g.last_seen, p.last_seen, l.ls)  AS last_seen,
       g.resolved_at, g.resolved_by, g.is_regression, g.regressed_at, g.regression_count,
       (g.occurrences_not_stored + coalesce(p.not_stored, 0) + coalesce(l.light, 0))::bigint AS occurrences_not_stored
  FROM tb_error_log g
  LEFT JOIN tb_error_count_pending p ON p.error_id = g.error_id
  LEFT JOIN (SELECT o.error_id, count(*) AS cnt, count(*) FILTER (WHERE o.sampled_out) AS light,
                    min(o.occurred_at) AS fs, max(o.occurred_at) AS ls
               FROM tb_error_occurrence o
              WHERE o.capture_xid >= (SELECT s.above FROM tb_error_fold_state s)
                 OR o.capture_xid = ANY ((SELECT s.in_progress FROM tb_error_fold_state s)::xid8[])
              GROUP BY o.error_id) l ON l.error_id = g.error_id;

-- ---------------------------------------------------------------------------
-- Workflow
-- ---------------------------------------------------------------------------
CREATE FUNCTION _fraiseql_require_group(p_error_id uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_error_id IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: error_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM 1 FROM @extschema@.tb_error_log WHERE error_id = p_error_id;
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
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@._fraiseql_require_group($1);
    UPDATE @extschema@.tb_error_log g
       SET status = 'resolved', resolved_at = now(), resolved_by = $2, resolution_notes = $3,
           is_regression = false
     WHERE g.error_id = $1;
END
$$;

CREATE FUNCTION fraiseql_unresolve_error(error_id uuid) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@._fraiseql_require_group($1);
    UPDATE @extschema@.tb_error_log g
       SET status = 'unresolved', resolved_at = NULL, resolved_by = NULL
     WHERE g.error_id = $1;
END
$$;

CREATE FUNCTION fraiseql_ignore_error(error_id uuid) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@._fraiseql_require_group($1);
    UPDATE @extschema@.tb_error_log g SET status = 'ignored' WHERE g.error_id = $1;
END
$$;

CREATE FUNCTION fraiseql_assign_error(error_id uuid, assignee text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@._fraiseql_require_group($1);
    UPDATE @extschema@.tb_error_log g SET assigned_to = nullif($2, '') WHERE g.error_id = $1;
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
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM @extschema@.tb_error_occurrence o
     WHERE o.occurrence_id = OLD.id AND o.occurred_at = OLD.occurred_at;
    RETURN OLD;
END
$$;

CREATE TRIGGER errors_delete INSTEAD OF DELETE ON monitoring.errors
    FOR EACH ROW EXECUTE FUNCTION _fraiseql_errors_view_delete();
