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
-- are C functions (src/capture_path.rs) that insert the occurrence row and
-- nothing else: no table is read, no shared row written, so no capture ever
-- waits for another session. The group's id is derived from the
-- fingerprint (fraiseql_error_id). Everything else -- creating the group,
-- counting, regression, severity, notification rules -- is done by the fold
-- below, on committed rows.
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
    occurred_at     timestamptz DEFAULT now(),
    -- stored by the worker, whatever becomes of the caller's transaction
    -- (src/autonomous.rs)
    autonomous      boolean DEFAULT false)
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
    occurred_at     timestamptz DEFAULT now(),
    autonomous      boolean DEFAULT false)
RETURNS uuid
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'fraiseql_capture_message_c';

COMMENT ON FUNCTION fraiseql_capture_error(text, text, text, jsonb, text, text, text, text, text, text, timestamptz, boolean) IS
  'Record one occurrence of an error and return its group''s error_id.';
COMMENT ON FUNCTION fraiseql_capture_message(text, text, jsonb, text, text, text, text, text, timestamptz, boolean) IS
  'Record an event without an exception; messages group by their normalized text.';

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

-- An occurrence a fold counted, as the notification rules see it.
CREATE TYPE _fraiseql_occurrence_ref AS (
    occurrence_id uuid, occurred_at timestamptz, error_id uuid,
    error_type text, severity text, environment text);

-- The transactions still not counted after a fold that read with `snap`:
-- those its snapshot saw running among the ones not counted before (all
-- from `above`, and `in_progress`). The new state is (xmax of snap, this).
CREATE FUNCTION _fraiseql_still_running(snap pg_snapshot, above xid8, in_progress xid8[]) RETURNS xid8[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY(SELECT x FROM pg_snapshot_xip(snap) AS x WHERE x >= above OR x = ANY (in_progress) ORDER BY x)
$$;

CREATE FUNCTION _fraiseql_severity_name(rank integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (ARRAY['debug', 'info', 'warning', 'error', 'critical'])[rank + 1] $$;

-- The fold: everything a capture leaves to be done, on the occurrences
-- committed since the previous fold. It creates the groups of new
-- fingerprints (from their first occurrence), counts, takes back what was
-- deleted (tb_error_tombstone), reopens a resolved group that recurred
-- after its resolution (a regression), raises a group's severity, decides
-- milestones and evaluates the notification rules -- each occurrence once,
-- in the transaction that counts it, so a rolled-back capture notifies
-- nobody and a committed one is never missed.
--
-- The worker runs it every flush_interval, and at once when a capture
-- commits while rules exist; call it by hand to bring tb_error_log up to
-- date now (v_error_groups is always exact). Returns the number of groups
-- updated. It never waits: one fold runs at a time (a concurrent call
-- returns 0), and a group row another transaction holds is folded next
-- time. With nothing to do it writes nothing (no transaction id, no WAL).
-- Release-aware resolution: whether an occurrence of p_release may reopen a
-- group resolved at p_resolved_at in p_threshold (this release or a later
-- one: by semantic version where both are one, else by when each was first
-- seen; a threshold not seen yet counts as first seen at the resolution).
-- An occurrence without a release never does.
-- (Keys compare byte by byte, COLLATE "C": a linguistic collation skips
-- the punctuation they are built with. No SET clause: every name is
-- qualified, and the function stays inlinable into the fold.)
CREATE FUNCTION _fraiseql_release_at_least(p_release text, p_threshold text, p_resolved_at timestamptz)
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT CASE
        WHEN p_release IS NULL THEN false
        WHEN p_release OPERATOR(pg_catalog.=) p_threshold THEN true
        WHEN @extschema@.fraiseql_release_key(p_release) IS NOT NULL
         AND @extschema@.fraiseql_release_key(p_threshold) IS NOT NULL
            THEN @extschema@.fraiseql_release_key(p_release) COLLATE "C"
                 OPERATOR(pg_catalog.>=) @extschema@.fraiseql_release_key(p_threshold) COLLATE "C"
        ELSE coalesce((SELECT r.first_seen FROM @extschema@.tb_release r WHERE r.release OPERATOR(pg_catalog.=) p_release),
                      'infinity'::timestamptz)
             OPERATOR(pg_catalog.>)
             coalesce((SELECT r.first_seen FROM @extschema@.tb_release r WHERE r.release OPERATOR(pg_catalog.=) p_threshold),
                      p_resolved_at)
    END
$$;

-- "Resolved in the next release": an occurrence of a release first seen
-- after the resolution (one already seen then is the release still running).
CREATE FUNCTION _fraiseql_release_is_next(p_release text, p_resolved_at timestamptz) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT p_release IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM @extschema@.tb_release r
                        WHERE r.release OPERATOR(pg_catalog.=) p_release
                          AND r.first_seen OPERATOR(pg_catalog.<=) p_resolved_at)
$$;

-- The error_ids whose occurrences make up the group an error_id leads to
-- (a merged fingerprint's id leads to its target): the group's own, and
-- those of the fingerprints merged into it (tb_error_merge). For reads
-- through the occurrences' index: o.error_id = ANY (fraiseql_error_group_ids(id)).
-- With the caller's rights (dashboards use it): it reads tb_error_merge.
CREATE FUNCTION fraiseql_error_group_ids(error_id uuid) RETURNS uuid[]
LANGUAGE sql STABLE
AS $$
    SELECT ARRAY(SELECT m.source_id FROM @extschema@.tb_error_merge m
                  WHERE m.target_id OPERATOR(pg_catalog.=) t.id) OPERATOR(pg_catalog.||) t.id
      FROM (SELECT coalesce((SELECT m.target_id FROM @extschema@.tb_error_merge m
                              WHERE m.source_id OPERATOR(pg_catalog.=) $1), $1) AS id) t
$$;

-- First and last seen of a group's occurrences: each error_id's ends through
-- its index, whatever their number.
CREATE FUNCTION _fraiseql_group_seen(p_error_id uuid, OUT fs timestamptz, OUT ls timestamptz)
LANGUAGE sql STABLE
AS $$
    SELECT min(x.fs), max(x.ls)
      FROM unnest(@extschema@.fraiseql_error_group_ids(p_error_id)) AS i(id)
     CROSS JOIN LATERAL (SELECT (SELECT min(o.occurred_at) FROM @extschema@.tb_error_occurrence o
                                  WHERE o.error_id OPERATOR(pg_catalog.=) i.id) AS fs,
                                (SELECT max(o.occurred_at) FROM @extschema@.tb_error_occurrence o
                                  WHERE o.error_id OPERATOR(pg_catalog.=) i.id) AS ls) x
$$;

CREATE TYPE _fraiseql_unmerge AS (source_id uuid, target_id uuid);

-- The user an occurrence affected: context.user_id, or user.id of a
-- Sentry-shaped context. (Inlined: no SET clause.)
CREATE FUNCTION _fraiseql_user_of(context jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT coalesce(context OPERATOR(pg_catalog.->>) 'user_id',
                      (context OPERATOR(pg_catalog.->) 'user') OPERATOR(pg_catalog.->>) 'id') $$;

-- Whether an archived group (fraiseql_archive_error) met one of its
-- conditions now that p_added more occurrences are counted: that many more,
-- that many within the rate window, or that many distinct users since it
-- was archived (or within the users window). The rate reads at most as many
-- of the group's occurrences as it needs, through their index; users are
-- read from tb_error_user, one row per user.
CREATE FUNCTION _fraiseql_archive_condition_met(g tb_error_log, p_added bigint) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT (g.archive_until_occurrences IS NOT NULL
            AND (g.archive_added OPERATOR(pg_catalog.+) p_added) OPERATOR(pg_catalog.>=) g.archive_until_occurrences)
        OR (g.archive_until_rate IS NOT NULL
            AND (SELECT count(*) FROM (
                    SELECT 1 FROM @extschema@.tb_error_occurrence o
                     WHERE o.error_id OPERATOR(pg_catalog.=) ANY (@extschema@.fraiseql_error_group_ids(g.error_id))
                       AND o.occurred_at OPERATOR(pg_catalog.>) g.archived_at
                       AND o.occurred_at OPERATOR(pg_catalog.>) (now() OPERATOR(pg_catalog.-) g.archive_rate_window)
                       AND o.occurred_at OPERATOR(pg_catalog.<=) (clock_timestamp() OPERATOR(pg_catalog.+) interval '1 minute')
                     LIMIT g.archive_until_rate) x) OPERATOR(pg_catalog.>=) g.archive_until_rate)
        OR (g.archive_until_users IS NOT NULL
            AND (SELECT count(*) FROM (
                    SELECT DISTINCT u.user_key FROM @extschema@.tb_error_user u
                     WHERE u.error_id OPERATOR(pg_catalog.=) ANY (@extschema@.fraiseql_error_group_ids(g.error_id))
                       AND u.last_seen OPERATOR(pg_catalog.>=) date_trunc('minute', g.archived_at)
                       AND u.last_seen OPERATOR(pg_catalog.>)
                           coalesce(now() OPERATOR(pg_catalog.-) g.archive_users_window, '-infinity')
                     LIMIT g.archive_until_users) x)
                OPERATOR(pg_catalog.>=) g.archive_until_users)
$$;

-- The owner of a new group by the ownership rules (tb_ownership_rule):
-- the assignee of the last matching rule, or NULL. Stack frames are parsed
-- only when a path or module rule exists.
CREATE FUNCTION _fraiseql_owner_of(p_type text, p_stack text, p_context jsonb) RETURNS text
LANGUAGE sql STABLE
AS $$
    WITH frames AS MATERIALIZED (
        SELECT x.f FROM pg_catalog.jsonb_array_elements(
            CASE WHEN EXISTS (SELECT 1 FROM @extschema@.tb_ownership_rule r
                               WHERE r.enabled AND r.match_kind OPERATOR(pg_catalog.=) ANY ('{path,module}'))
                 THEN @extschema@.fraiseql_parse_stack_trace(p_stack) OPERATOR(pg_catalog.->) 'frames' END) x(f)
    )
    SELECT r.assignee FROM @extschema@.tb_ownership_rule r
     WHERE r.enabled AND CASE r.match_kind
         WHEN 'type' THEN p_type OPERATOR(pg_catalog.~) r.regex
         WHEN 'path' THEN EXISTS (SELECT 1 FROM frames x
                                   WHERE (x.f OPERATOR(pg_catalog.->>) 'file') OPERATOR(pg_catalog.~)
                                         ('(^|/)' OPERATOR(pg_catalog.||) pg_catalog.substr(r.regex, 2)))
         WHEN 'module' THEN EXISTS (SELECT 1 FROM frames x
                                     WHERE (x.f OPERATOR(pg_catalog.->>) 'module') OPERATOR(pg_catalog.~) r.regex)
         WHEN 'tag' THEN coalesce((p_context OPERATOR(pg_catalog.->) 'tags') OPERATOR(pg_catalog.->>) r.tag_key,
                                  p_context OPERATOR(pg_catalog.->>) r.tag_key) OPERATOR(pg_catalog.~) r.regex
         WHEN 'url' THEN coalesce((p_context OPERATOR(pg_catalog.->) 'request') OPERATOR(pg_catalog.->>) 'url',
                                  p_context OPERATOR(pg_catalog.->>) 'url') OPERATOR(pg_catalog.~) r.regex
     END
     ORDER BY coalesce(r.position, r.rule_id) DESC, r.rule_id DESC
     LIMIT 1
$$;

CREATE FUNCTION fraiseql_flush_counts() RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off  -- (see the worker's settings)
-- Its statements read a few recent rows through indexes. PL/pgSQL keeps
-- their plans for the session, and the worker's session lives long: a plan
-- made while a partition or a queue table was nearly empty (the start of
-- each month) would scan it whole at every fold until the next ANALYZE.
SET enable_seqscan = off
AS $$
DECLARE
    n           bigint;
    v_state     record;
    v_new       bigint;
    v_gone      uuid[];
    v_created   uuid[];
    v_regressed uuid[];
    v_escalated uuid[];
    v_cutoff    xid8;
    v_unmerges  @extschema@._fraiseql_unmerge[];
    v_rule      uuid;
    v_msg       text;
    v_out_of_time uuid[] := '{}';
    v_free      uuid[];
    v_orphans   uuid[];
    v_recounted bigint;
    v_has_rules boolean;
    v_batch     @extschema@._fraiseql_occurrence_ref[];
    v_folds     @extschema@._fraiseql_fold[];
    v_created_folds @extschema@._fraiseql_fold[];
BEGIN
    -- One fold at a time: a table lock, which (unlike a row lock) takes no
    -- transaction id, and which (unlike an advisory lock) no other role can
    -- take and hold, since it needs the right to write the table.
    BEGIN
        LOCK TABLE @extschema@.tb_error_fold_state IN SHARE ROW EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;
    END;
    SELECT s.above, s.in_progress, s.windows_pruned_at INTO v_state FROM @extschema@.tb_error_fold_state s;
    IF NOT FOUND THEN
        RETURN 0;  -- a restore in progress has not brought the state yet
    END IF;
    -- nor while a restore is loading the tables (groups, merges, pending
    -- counts and unmerges arrive one after the other)
    IF EXISTS (SELECT FROM @extschema@.tb_restore_session) AND @extschema@._fraiseql_complete_install() THEN
        RETURN 0;
    END IF;
    -- The tables the fold reads that other roles are granted to write (the
    -- rules): a role holding one locked (LOCK TABLE, an ALTER) makes no fold
    -- wait: it is tried again next time, and the worker goes on with its
    -- other work meanwhile. (The others only the owner can lock.)
    BEGIN
        LOCK TABLE @extschema@.tb_error_notification_config, @extschema@.tb_ownership_rule
              IN ACCESS SHARE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;
    END;

    -- Groups archived for an interval that has passed are unresolved again
    -- (an index probe; writes, and takes a transaction id, only when one is
    -- due; a row another transaction holds is done next time).
    UPDATE @extschema@.tb_error_log g
       SET status = 'unresolved', archived_at = NULL, archived_by = NULL, archive_until = NULL,
           archive_added = NULL, archive_until_occurrences = NULL, archive_until_rate = NULL,
           archive_rate_window = NULL, archive_until_users = NULL, archive_users_window = NULL
     WHERE g.error_id IN (SELECT e.error_id FROM @extschema@.tb_error_log e
                           WHERE e.archive_until <= now() AND e.status = 'ignored'
                             FOR NO KEY UPDATE SKIP LOCKED);

    -- Rows restored from a logical dump of another cluster carry that
    -- cluster's transaction ids. Those not yet reached by this cluster's
    -- counter would be counted again when it gets there: the restored group
    -- counts already include them, so they are set aside once.
    -- (Ids at or past the snapshot's xmax cannot belong to a finished
    -- transaction of this cluster; this transaction's own rows excepted.)
    UPDATE @extschema@.tb_error_occurrence o SET capture_xid = '0'
     WHERE o.capture_xid >= pg_snapshot_xmax(pg_current_snapshot())
       AND o.capture_xid <> coalesce(pg_current_xact_id_if_assigned(), '0');

    -- Unmerges to settle, before anything is counted (fraiseql_unmerge_error):
    -- exactly those this statement takes out of the queue.
    IF EXISTS (SELECT 1 FROM @extschema@.tb_error_unmerge_request) THEN
        WITH d AS (DELETE FROM @extschema@.tb_error_unmerge_request r RETURNING r.*)
        SELECT array_agg(ROW(d.source_id, d.target_id)::@extschema@._fraiseql_unmerge ORDER BY d.requested_at)
          INTO v_unmerges FROM d;
        FOR i IN 1 .. coalesce(cardinality(v_unmerges), 0) LOOP
            PERFORM @extschema@._fraiseql_settle_unmerge(v_unmerges[i].source_id, v_unmerges[i].target_id,
                                                         v_state.above, v_state.in_progress);
        END LOOP;
    END IF;

    -- Pending counts of a group deleted since (see below): those of a
    -- fingerprint merged meanwhile (counted by a fold that did not see the
    -- merge yet) go to its target; for the others the group made again
    -- counts its rows afresh.
    WITH o AS (
        DELETE FROM @extschema@.tb_error_count_pending p
         WHERE NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_log g WHERE g.error_id = p.error_id)
        RETURNING p.*
    ), mapped AS (
        SELECT o.*, m.target_id
          FROM o JOIN (SELECT x.source_id, x.target_id FROM @extschema@.tb_error_merge x
                       UNION
                       SELECT x.source_id, x.target_id FROM @extschema@.tb_error_unmerge_request x) m
            ON m.source_id = o.error_id
    ), redirected AS (
        INSERT INTO @extschema@.tb_error_count_pending AS p
            (error_id, occurrence_count, not_stored, added, first_seen, last_seen, severity_rank,
             regress_after, regress_release)
        SELECT m.target_id, sum(m.occurrence_count), sum(m.not_stored), sum(m.added),
               min(m.first_seen), max(m.last_seen), max(m.severity_rank),
               max(m.regress_after), (array_agg(m.regress_release ORDER BY m.regress_after DESC NULLS LAST))[1]
          FROM mapped m
         GROUP BY m.target_id
        ON CONFLICT (error_id) DO UPDATE
           SET occurrence_count = p.occurrence_count + excluded.occurrence_count,
               not_stored = p.not_stored + excluded.not_stored,
               added = p.added + excluded.added,
               first_seen = least(p.first_seen, excluded.first_seen),
               last_seen = greatest(p.last_seen, excluded.last_seen),
               severity_rank = greatest(p.severity_rank, excluded.severity_rank),
               regress_release = CASE WHEN p.regress_after IS NULL OR excluded.regress_after >= p.regress_after
                                      THEN coalesce(excluded.regress_release, p.regress_release)
                                      ELSE p.regress_release END,
               regress_after = greatest(p.regress_after, excluded.regress_after)
    )
    SELECT array_agg(o.error_id) FILTER (WHERE o.error_id NOT IN (SELECT m.error_id FROM mapped m))
      INTO v_orphans FROM o;

    -- One statement, one snapshot: the rows of the transactions it sees
    -- finished that were not counted before, and the deletes it sees
    -- committed (a deleted row it counted before is taken back; one it did
    -- not count, it does not see). New fingerprints get their group here.
    -- At most about 50,000 rows a fold, in whole transactions: a backlog
    -- (a stalled worker, a bulk load) is worked off over several folds, each
    -- of bounded time and memory, instead of one that never fits. (The
    -- transactions from `above` on, by the capture_xid index.)
    v_cutoff := (SELECT o.capture_xid FROM @extschema@.tb_error_occurrence o
                  WHERE o.capture_xid >= v_state.above ORDER BY o.capture_xid OFFSET 50000 LIMIT 1);
    IF v_cutoff IS NOT NULL THEN
        -- (one transaction larger than that is taken whole)
        v_cutoff := greatest(v_cutoff,
            ((SELECT min(o.capture_xid) FROM @extschema@.tb_error_occurrence o
               WHERE o.capture_xid >= v_state.above)::text::numeric + 1)::text::xid8);
    END IF;

    WITH cur AS (
        SELECT pg_current_snapshot() AS snap,
               CASE WHEN v_cutoff IS NULL THEN pg_snapshot_xmax(pg_current_snapshot())
                    ELSE least(v_cutoff, pg_snapshot_xmax(pg_current_snapshot())) END AS upto
    ), rules AS (
        -- in the snapshot that sees the rows: a capture committed after a
        -- rule was is evaluated against it
        SELECT EXISTS (SELECT 1 FROM @extschema@.tb_error_notification_config c
                        WHERE c.enabled AND c.notify_on_occurrence IS NULL) AS present
    ), owners AS (
        SELECT EXISTS (SELECT 1 FROM @extschema@.tb_ownership_rule r WHERE r.enabled) AS present
    ), new AS MATERIALIZED (
        -- (a merged fingerprint's occurrences count for the group it was
        -- merged into)
        SELECT o.occurrence_id, o.occurred_at, coalesce(m.target_id, o.error_id) AS error_id,
               o.error_type, o.severity, o.environment,
               o.sampled_out, o.release_version, o.created_at,
               o.error_id AS own_id, md5(@extschema@._fraiseql_user_of(o.context))::uuid AS user_key
          FROM @extschema@.tb_error_occurrence o
         CROSS JOIN cur
          -- (an unmerge not settled yet counts as merged still)
          LEFT JOIN (SELECT x.source_id, x.target_id FROM @extschema@.tb_error_merge x
                  UNION ALL
                  SELECT x.source_id, x.target_id FROM @extschema@.tb_error_unmerge_request x) m ON m.source_id = o.error_id
         WHERE ((o.capture_xid >= v_state.above AND o.capture_xid < cur.upto)
                OR o.capture_xid = ANY (v_state.in_progress))
           AND pg_visible_in_snapshot(o.capture_xid, cur.snap)
    ), seen_users AS (
        INSERT INTO @extschema@.tb_error_user AS u (error_id, user_key, first_seen, last_seen)
        SELECT n.own_id, n.user_key, date_trunc('minute', least(min(n.occurred_at), clock_timestamp())),
               least(max(n.occurred_at), clock_timestamp())
          FROM new n WHERE n.user_key IS NOT NULL GROUP BY 1, 2
        ON CONFLICT (error_id, user_key) DO UPDATE
           SET first_seen = least(u.first_seen, excluded.first_seen),
               last_seen = greatest(u.last_seen, excluded.last_seen)
         WHERE excluded.last_seen > u.last_seen + interval '1 minute' OR excluded.first_seen < u.first_seen
    ), gone_rows AS (
        DELETE FROM @extschema@.tb_error_tombstone t RETURNING t.*
    ), gone AS (
        SELECT t.capture_xid, t.occurred_at, t.sampled_out, t.n,
               coalesce(m.target_id, t.error_id) AS error_id
          FROM gone_rows t
          LEFT JOIN (SELECT x.source_id, x.target_id FROM @extschema@.tb_error_merge x
                  UNION ALL
                  SELECT x.source_id, x.target_id FROM @extschema@.tb_error_unmerge_request x) m ON m.source_id = t.error_id
    ), fresh AS (
        SELECT n.error_id, count(*) AS cnt, count(*) FILTER (WHERE n.sampled_out) AS light,
               min(n.occurred_at) AS fs, max(n.occurred_at) AS ls,
               max(@extschema@._fraiseql_severity_rank(n.severity)) AS rank,
               (array_agg(n.release_version ORDER BY n.occurred_at DESC)
                  FILTER (WHERE n.release_version IS NOT NULL))[1] AS latest_release
          FROM new n GROUP BY n.error_id
    ), releases AS (
        -- (read by the conditions below as they were before this statement:
        -- a release first seen now is new to them)
        -- (by the server's clock: a caller's occurred_at may be late or
        -- early, and "first seen after the resolution" compares with now())
        INSERT INTO @extschema@.tb_release AS r (release, first_seen, last_seen, occurrences)
        SELECT n.release_version, min(n.created_at), max(n.created_at), count(*)
          FROM new n WHERE n.release_version IS NOT NULL GROUP BY n.release_version
        ON CONFLICT (release) DO UPDATE
           SET first_seen = least(r.first_seen, excluded.first_seen),
               last_seen = greatest(r.last_seen, excluded.last_seen),
               occurrences = r.occurrences + excluded.occurrences
    ), conditioned AS MATERIALIZED (
        -- resolved groups that only a release may reopen (a probe by key each)
        SELECT g.error_id, g.resolved_at, g.resolved_in_release, g.resolved_in_next_release
          FROM fresh f
         CROSS JOIN LATERAL (SELECT g.error_id, g.resolved_at, g.resolved_in_release, g.resolved_in_next_release
                               FROM @extschema@.tb_error_log g
                              WHERE g.error_id = f.error_id AND g.status = 'resolved'
                                AND (g.resolved_in_release IS NOT NULL OR g.resolved_in_next_release)) g
    ), reopening AS (
        -- of their rows, those of the release named or a later one, or of a
        -- release first seen after the resolution
        SELECT n.error_id, max(n.occurred_at) AS after,
               (array_agg(n.release_version ORDER BY n.occurred_at DESC))[1] AS release
          FROM new n JOIN conditioned c ON c.error_id = n.error_id
         WHERE CASE WHEN c.resolved_in_next_release
                    THEN @extschema@._fraiseql_release_is_next(n.release_version, c.resolved_at)
                    ELSE @extschema@._fraiseql_release_at_least(n.release_version, c.resolved_in_release, c.resolved_at) END
         GROUP BY n.error_id
    ), created AS (
        -- from the group's first occurrence stored whole, with the count of
        -- its rows seen now (written once: no pending count, no second row
        -- version). A group made again (deleted by hand while rows of it
        -- remain) also counts the rows of it counted before.
        INSERT INTO @extschema@.tb_error_log AS g
            (error_fingerprint, fingerprint_version, error_type, error_message, stack_trace,
             title, culprit, severity, environment, release_version,
             occurrence_count, occurrences_not_stored, first_seen, last_seen, assigned_to)
        SELECT o.fingerprint, @extschema@.fraiseql_fingerprint_version(), o.error_type, o.message, o.stack_trace,
               m.meta->>'title', m.meta->>'culprit', @extschema@._fraiseql_severity_name(fr.rank),
               o.environment, o.release_version,
               k.cnt + fr.cnt, k.light + fr.light, least(fr.fs, k.fs), greatest(fr.ls, k.ls),
               -- (the ownership rules, when there are any)
               CASE WHEN (SELECT r.present FROM owners r)
                    THEN @extschema@._fraiseql_owner_of(o.error_type, o.stack_trace, o.context) END
          FROM (SELECT DISTINCT ON (n.error_id) n.error_id, n.occurrence_id, n.occurred_at
                  FROM new n
                 -- (a probe by key for each, whatever the estimates)
                 WHERE (SELECT true FROM @extschema@.tb_error_log e WHERE e.error_id = n.error_id) IS NULL
                 ORDER BY n.error_id, n.sampled_out, n.occurred_at, n.occurrence_id) f
          JOIN fresh fr ON fr.error_id = f.error_id
         CROSS JOIN LATERAL (SELECT o.* FROM @extschema@.tb_error_occurrence o
                              WHERE o.occurrence_id = f.occurrence_id AND o.occurred_at = f.occurred_at
                              LIMIT 1) o
         CROSS JOIN LATERAL (SELECT @extschema@._fraiseql_group_meta(o.error_type, o.message, o.stack_trace) AS meta) m
         CROSS JOIN LATERAL (
               SELECT count(*) AS cnt, count(*) FILTER (WHERE k.sampled_out) AS light,
                      min(k.occurred_at) AS fs, max(k.occurred_at) AS ls
                 FROM @extschema@.tb_error_occurrence k
                WHERE k.error_id = f.error_id
                  -- (by the group's key alone: IS TRUE keeps the planner from
                  -- adding the capture_xid index, which it did, reading the
                  -- whole range of that index for every new group)
                  AND (k.capture_xid < v_state.above) IS TRUE AND NOT k.capture_xid = ANY (v_state.in_progress)) k
        ON CONFLICT DO NOTHING
        RETURNING g.error_id, g.occurrence_count
    ), counted AS (
        -- (a group the INSERT above did not make, because it exists after
        -- all, is counted here)
        SELECT f.error_id, f.cnt, f.light, f.cnt AS added, f.fs, f.ls, f.rank,
               CASE WHEN c.error_id IS NULL THEN f.ls ELSE r.after END AS regress_after,
               CASE WHEN c.error_id IS NULL THEN f.latest_release ELSE r.release END AS regress_release,
               c.resolved_at AS regress_resolved_at
          FROM fresh f
          LEFT JOIN conditioned c ON c.error_id = f.error_id
          LEFT JOIN reopening r ON r.error_id = f.error_id
         WHERE f.error_id NOT IN (SELECT c.error_id FROM created c)
        UNION ALL
        -- a deleted row counted before is taken back from its group (one
        -- deleted with its group went with it)
        SELECT t.error_id, -sum(t.n), -coalesce(sum(t.n) FILTER (WHERE t.sampled_out), 0), 0,
               'infinity', '-infinity', 0, NULL, NULL, NULL
          FROM gone t
         WHERE t.capture_xid < v_state.above AND NOT t.capture_xid = ANY (v_state.in_progress)
           AND EXISTS (SELECT 1 FROM @extschema@.tb_error_log e WHERE e.error_id = t.error_id)
         GROUP BY t.error_id
    ), pending AS (
        INSERT INTO @extschema@.tb_error_count_pending AS p
            (error_id, occurrence_count, not_stored, added, first_seen, last_seen, severity_rank,
             regress_after, regress_release, regress_resolved_at)
        SELECT c.error_id, sum(c.cnt), sum(c.light), sum(c.added), min(c.fs), max(c.ls), max(c.rank),
               max(c.regress_after), (array_agg(c.regress_release ORDER BY c.regress_after DESC NULLS LAST))[1],
               min(c.regress_resolved_at)
          FROM counted c GROUP BY c.error_id
        ON CONFLICT (error_id) DO UPDATE
           SET occurrence_count = p.occurrence_count + excluded.occurrence_count,
               not_stored = p.not_stored + excluded.not_stored,
               added = p.added + excluded.added,
               first_seen = least(p.first_seen, excluded.first_seen),
               last_seen = greatest(p.last_seen, excluded.last_seen),
               severity_rank = greatest(p.severity_rank, excluded.severity_rank),
               regress_release = CASE WHEN p.regress_after IS NULL OR excluded.regress_after >= p.regress_after
                                      THEN coalesce(excluded.regress_release, p.regress_release)
                                      ELSE p.regress_release END,
               regress_after = greatest(p.regress_after, excluded.regress_after),
               regress_resolved_at = CASE WHEN p.regress_resolved_at IS NOT DISTINCT FROM excluded.regress_resolved_at
                                          THEN p.regress_resolved_at END
    ), moved AS (
        -- only when something was counted: an idle fold writes nothing
        UPDATE @extschema@.tb_error_fold_state s
           SET above = greatest(v_state.above, cur.upto),
               in_progress = ARRAY(SELECT x FROM unnest(@extschema@._fraiseql_still_running(cur.snap, v_state.above,
                                                                                            v_state.in_progress)) x
                                    WHERE x < greatest(v_state.above, cur.upto)),
               folded_at = now()
          FROM cur
         WHERE EXISTS (SELECT 1 FROM new)
    )
    SELECT (SELECT count(*) FROM new),
           (SELECT array_agg(DISTINCT t.error_id) FROM gone t),
           (SELECT coalesce(array_agg(c.error_id), '{}') FROM created c),
           (SELECT coalesce(array_agg(ROW(c.error_id, c.occurrence_count - f.cnt, c.occurrence_count)
                                      ::@extschema@._fraiseql_fold), '{}')
              FROM created c JOIN fresh f ON f.error_id = c.error_id),
           (SELECT r.present FROM rules r),
           CASE WHEN (SELECT r.present FROM rules r) THEN
               (SELECT coalesce(array_agg(ROW(n.occurrence_id, n.occurred_at, n.error_id, n.error_type,
                                              n.severity, n.environment)::@extschema@._fraiseql_occurrence_ref
                                          ORDER BY n.error_id, n.occurred_at, n.occurrence_id), '{}')
                  FROM new n)
           END
      INTO v_new, v_gone, v_created, v_created_folds, v_has_rules, v_batch;

    IF v_new = 0 AND v_gone IS NULL AND v_orphans IS NULL
       AND NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_count_pending)
       AND NOT EXISTS (SELECT 1 FROM @extschema@.tb_recount_request r WHERE r.consumer = 'groups') THEN
        RETURN 0;
    END IF;

    -- Pending counts go into the group rows that are free now; a resolved
    -- group that recurred after its resolution reopens as a regression.
    -- (Lookups by key only, through arrays and LATERAL: the queue tables
    -- are tiny or huge from one fold to the next, so no plan may depend on
    -- their statistics.)
    SELECT coalesce(array_agg(p.error_id), '{}'),
           coalesce(array_agg(p.error_id) FILTER (
               WHERE g.status = 'resolved' AND p.regress_after IS NOT NULL
                 AND (g.resolved_at IS NULL OR p.regress_after > g.resolved_at)
                 -- a release condition: decided against this very resolution
                 -- (one made after the rows were counted is checked on them)
                 AND (NOT (g.resolved_in_release IS NOT NULL OR g.resolved_in_next_release)
                      OR p.regress_resolved_at = g.resolved_at
                      OR EXISTS (
                          SELECT 1 FROM @extschema@.tb_error_occurrence o
                           WHERE o.error_id = ANY (@extschema@.fraiseql_error_group_ids(p.error_id))
                             AND o.occurred_at > g.resolved_at
                             AND CASE WHEN g.resolved_in_next_release
                                      THEN @extschema@._fraiseql_release_is_next(o.release_version, g.resolved_at)
                                      ELSE @extschema@._fraiseql_release_at_least(o.release_version, g.resolved_in_release, g.resolved_at)
                                 END))), '{}'),
           -- an archived group that met one of its conditions escalates
           coalesce(array_agg(p.error_id) FILTER (
               WHERE g.status = 'ignored' AND p.added > 0
                 AND @extschema@._fraiseql_archive_condition_met(g.g, p.added)), '{}')
      INTO v_free, v_regressed, v_escalated
      FROM @extschema@.tb_error_count_pending p
     CROSS JOIN LATERAL (SELECT g.status, g.resolved_at, g.resolved_in_release, g.resolved_in_next_release,
                                g.occurrence_count, g
                           FROM @extschema@.tb_error_log g
                          WHERE g.error_id = p.error_id
                            FOR NO KEY UPDATE SKIP LOCKED) g;
    WITH drained AS (
        DELETE FROM @extschema@.tb_error_count_pending p
         WHERE p.error_id = ANY (v_free)
        RETURNING p.*
    ), folded AS (
        UPDATE @extschema@.tb_error_log g
           SET occurrence_count = greatest(g.occurrence_count + d.occurrence_count, 0),
               occurrences_not_stored = greatest(g.occurrences_not_stored + d.not_stored, 0),
               first_seen = least(g.first_seen, d.first_seen),
               last_seen = greatest(g.last_seen, d.last_seen),
               severity = CASE WHEN d.severity_rank > @extschema@._fraiseql_severity_rank(g.severity)
                               THEN @extschema@._fraiseql_severity_name(d.severity_rank) ELSE g.severity END,
               status = CASE WHEN d.regressed OR d.escalated THEN 'unresolved' ELSE g.status END,
               is_escalating = g.is_escalating OR d.escalated,
               escalated_at = CASE WHEN d.escalated THEN now() ELSE g.escalated_at END,
               archived_at = CASE WHEN d.escalated THEN NULL ELSE g.archived_at END,
               archived_by = CASE WHEN d.escalated THEN NULL ELSE g.archived_by END,
               archive_until = CASE WHEN d.escalated THEN NULL ELSE g.archive_until END,
               archive_added = CASE WHEN d.escalated THEN NULL
                                    WHEN g.archived_at IS NOT NULL THEN g.archive_added + d.added
                                    ELSE g.archive_added END,
               archive_until_occurrences = CASE WHEN d.escalated THEN NULL ELSE g.archive_until_occurrences END,
               archive_until_rate = CASE WHEN d.escalated THEN NULL ELSE g.archive_until_rate END,
               archive_rate_window = CASE WHEN d.escalated THEN NULL ELSE g.archive_rate_window END,
               archive_until_users = CASE WHEN d.escalated THEN NULL ELSE g.archive_until_users END,
               archive_users_window = CASE WHEN d.escalated THEN NULL ELSE g.archive_users_window END,
               is_regression = g.is_regression OR d.regressed,
               regressed_at = CASE WHEN d.regressed THEN now() ELSE g.regressed_at END,
               regression_count = g.regression_count + d.regressed::integer,
               resolved_at = CASE WHEN d.regressed THEN NULL ELSE g.resolved_at END,
               resolved_by = CASE WHEN d.regressed THEN NULL ELSE g.resolved_by END,
               resolved_in_release = CASE WHEN d.regressed THEN NULL ELSE g.resolved_in_release END,
               resolved_in_next_release = g.resolved_in_next_release AND NOT d.regressed,
               regressed_in_release = CASE WHEN d.regressed THEN d.regress_release ELSE g.regressed_in_release END
          FROM (SELECT d.*, d.error_id = ANY (v_regressed) AS regressed,
                       d.error_id = ANY (v_escalated) AS escalated FROM drained d) d
         WHERE g.error_id = d.error_id
        RETURNING g.error_id, g.occurrence_count AS new_count, d.occurrence_count AS added,
                  CASE WHEN d.regressed THEN d.regress_release END AS regress_release
    ), blamed AS (
        -- the regressions each release caused
        UPDATE @extschema@.tb_release r SET regressions = r.regressions + b.n
          FROM (SELECT f.regress_release, count(*) AS n FROM folded f
                 WHERE f.regress_release IS NOT NULL GROUP BY f.regress_release) b
         WHERE r.release = b.regress_release
    )
    SELECT v_created_folds
           || coalesce(array_agg(ROW(f.error_id, f.new_count - f.added, f.new_count)::@extschema@._fraiseql_fold), '{}')
      INTO v_folds FROM folded f;
    -- Counts whose group was deleted meanwhile (by pruning as the fold
    -- counted a new occurrence of it, or by hand): a group that still has
    -- occurrences is made again from them, with the count of those counted.
    IF v_orphans IS NOT NULL THEN
        INSERT INTO @extschema@.tb_error_log AS g
            (error_fingerprint, fingerprint_version, error_type, error_message, stack_trace,
             title, culprit, severity, environment, release_version,
             occurrence_count, occurrences_not_stored, first_seen, last_seen)
        SELECT o.fingerprint, @extschema@.fraiseql_fingerprint_version(), o.error_type, o.message, o.stack_trace,
               m.meta->>'title', m.meta->>'culprit', o.severity, o.environment, o.release_version,
               k.cnt, k.light, k.fs, k.ls
          FROM unnest(v_orphans) AS x(id)
         CROSS JOIN LATERAL (SELECT * FROM @extschema@.tb_error_occurrence o
                              WHERE o.error_id = x.id AND @extschema@.fraiseql_error_id(o.fingerprint) = x.id
                              ORDER BY o.sampled_out, o.occurred_at LIMIT 1) o
         CROSS JOIN LATERAL (SELECT @extschema@._fraiseql_group_meta(o.error_type, o.message, o.stack_trace) AS meta) m
         CROSS JOIN LATERAL (
               SELECT count(*) AS cnt, count(*) FILTER (WHERE k.sampled_out) AS light,
                      min(k.occurred_at) AS fs, max(k.occurred_at) AS ls
                 FROM @extschema@.tb_error_occurrence k
                 JOIN @extschema@.tb_error_fold_state s ON true
                WHERE k.error_id = x.id
                  AND (k.capture_xid < s.above) IS TRUE AND NOT k.capture_xid = ANY (s.in_progress)) k  -- (see above)
         WHERE NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_log e WHERE e.error_id = x.id)
        ON CONFLICT DO NOTHING;
    END IF;
    -- after deletes, first and last seen are those of the rows that remain
    -- (a group row another transaction holds keeps its times: no fold waits)
    IF v_gone IS NOT NULL THEN
        UPDATE @extschema@.tb_error_log g
           SET first_seen = r.fs, last_seen = r.ls
          FROM (SELECT x.id, s.fs, s.ls FROM unnest(v_gone) AS x(id),
                       LATERAL @extschema@._fraiseql_group_seen(x.id) s) r
         WHERE g.error_id = r.id AND r.fs IS NOT NULL
           AND (g.first_seen, g.last_seen) IS DISTINCT FROM (r.fs, r.ls)
           AND g.error_id IN (SELECT e.error_id FROM @extschema@.tb_error_log e
                               WHERE e.error_id = ANY (v_gone) FOR NO KEY UPDATE SKIP LOCKED);
    END IF;
    -- What rules' windows no longer need, hourly, in a fold that counted
    -- (no other transaction deletes rows the fold upserts, so none waits)
    IF v_new > 0 AND coalesce(v_state.windows_pruned_at < now() - interval '1 hour', true) THEN
        PERFORM @extschema@._fraiseql_prune_user_windows();
        UPDATE @extschema@.tb_error_fold_state SET windows_pruned_at = now();
    END IF;

    -- A partition dropped by hand took rows without tombstones: every group
    -- is recounted from what remains. In one snapshot, with this fold's
    -- lock: a group's count plus its pending count is the rows counted,
    -- plus the counted rows deleted whose tombstones the next fold takes
    -- back. A group row another transaction holds is recounted next time.
    IF EXISTS (SELECT 1 FROM @extschema@.tb_recount_request r WHERE r.consumer = 'groups') THEN
        WITH req AS (
            DELETE FROM @extschema@.tb_recount_request r WHERE r.consumer = 'groups' RETURNING r.*
        ), st AS (
            SELECT s.above, s.in_progress FROM @extschema@.tb_error_fold_state s
        ), rows_ AS (
            SELECT coalesce(m.target_id, o.error_id) AS error_id, count(*) AS n,
                   count(*) FILTER (WHERE o.sampled_out) AS light,
                   min(o.occurred_at) AS fs, max(o.occurred_at) AS ls
              FROM @extschema@.tb_error_occurrence o
             CROSS JOIN st
              LEFT JOIN (SELECT x.source_id, x.target_id FROM @extschema@.tb_error_merge x
                  UNION ALL
                  SELECT x.source_id, x.target_id FROM @extschema@.tb_error_unmerge_request x) m ON m.source_id = o.error_id
             WHERE o.capture_xid < st.above AND NOT o.capture_xid = ANY (st.in_progress)
             GROUP BY 1
        ), graves AS (
            SELECT coalesce(m.target_id, t.error_id) AS error_id, sum(t.n) AS n,
                   coalesce(sum(t.n) FILTER (WHERE t.sampled_out), 0) AS light
              FROM @extschema@.tb_error_tombstone t
             CROSS JOIN st
              LEFT JOIN (SELECT x.source_id, x.target_id FROM @extschema@.tb_error_merge x
                  UNION ALL
                  SELECT x.source_id, x.target_id FROM @extschema@.tb_error_unmerge_request x) m ON m.source_id = t.error_id
             WHERE t.capture_xid < st.above AND NOT t.capture_xid = ANY (st.in_progress)
             GROUP BY 1
        ), free AS (
            SELECT g.error_id FROM @extschema@.tb_error_log g FOR NO KEY UPDATE SKIP LOCKED
        ), recounted AS (
            UPDATE @extschema@.tb_error_log g
               SET occurrence_count = greatest(coalesce(r.n, 0) + coalesce(t.n, 0) - coalesce(p.occurrence_count, 0), 0),
                   occurrences_not_stored = greatest(coalesce(r.light, 0) + coalesce(t.light, 0) - coalesce(p.not_stored, 0), 0),
                   first_seen = coalesce(r.fs, g.first_seen),
                   last_seen = coalesce(r.ls, g.last_seen)
              FROM free f
              LEFT JOIN rows_ r ON r.error_id = f.error_id
              LEFT JOIN graves t ON t.error_id = f.error_id
              LEFT JOIN @extschema@.tb_error_count_pending p ON p.error_id = f.error_id
             WHERE g.error_id = f.error_id
            RETURNING 1
        )
        SELECT count(*) INTO v_recounted FROM recounted;
        IF v_recounted < (SELECT count(*) FROM @extschema@.tb_error_log) THEN
            INSERT INTO @extschema@.tb_recount_request (consumer, partition) VALUES ('groups', '(groups held, again)');
        END IF;
    END IF;

    n := cardinality(v_folds);
    -- Milestones (notify_on_occurrence) are decided here, where the count is
    -- exact: each fold of a group is serialized (its row is locked).
    -- A rule that fails (whatever its cause) must not stop the counts: the
    -- rules are then evaluated one by one, and one that still fails is
    -- skipped for this fold with a warning, and suspended for a while
    -- (tb_notification_rule_strike: a minute, doubling up to an hour), so
    -- that it does not cost every fold its time again.
    -- In the worker, each of the two kinds of rules has a time budget in a
    -- fold (fraiseql_obs.rules_timeout): all together, then as much again
    -- to retry them one by one, each with a quarter of it; a rule that runs
    -- past its quarter is skipped like one that fails, and those for which
    -- less than a quarter is left are skipped for this fold, not struck (the
    -- deadline's cancel is caught here, with the errors). So no rule, nor
    -- many, holds the counts longer than four times rules_timeout.
    IF n > 0 AND EXISTS (SELECT 1 FROM @extschema@.tb_error_notification_config c
                          WHERE c.enabled AND c.notify_on_occurrence IS NOT NULL) THEN
        PERFORM @extschema@._fraiseql_rules_budget(true);
        BEGIN
            PERFORM @extschema@._fraiseql_rules_deadline(true);
            PERFORM @extschema@._fraiseql_notify_milestones(v_folds);
            PERFORM @extschema@._fraiseql_rules_deadline(false);
        EXCEPTION WHEN OTHERS OR query_canceled THEN
            PERFORM @extschema@._fraiseql_rules_deadline(false);
            FOR v_rule IN SELECT c.config_id FROM @extschema@.tb_error_notification_config c
                           WHERE c.enabled AND c.notify_on_occurrence IS NOT NULL
                             AND @extschema@._fraiseql_rule_live(c.config_id)
                           -- (in no set order: the budget, when short, is not
                           -- always short for the same rules)
                           ORDER BY random() LOOP
                IF NOT @extschema@._fraiseql_rules_budget(false) THEN
                    v_out_of_time := v_out_of_time || v_rule;
                    CONTINUE;
                END IF;
                BEGIN
                    PERFORM @extschema@._fraiseql_rules_deadline(true);
                    PERFORM @extschema@._fraiseql_notify_milestones(v_folds, v_rule);
                    PERFORM @extschema@._fraiseql_rules_deadline(false);
                EXCEPTION WHEN OTHERS OR query_canceled THEN
                    PERFORM @extschema@._fraiseql_rules_deadline(false);
                    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
                    PERFORM @extschema@._fraiseql_rule_struck(v_rule, v_msg);
                END;
            END LOOP;
        END;
    END IF;
    -- The other rules, on each occurrence counted now.
    IF v_has_rules AND (cardinality(v_batch) > 0 OR cardinality(v_regressed) > 0 OR cardinality(v_escalated) > 0) THEN
        PERFORM @extschema@._fraiseql_rules_budget(true);
        BEGIN
            PERFORM @extschema@._fraiseql_rules_deadline(true);
            PERFORM @extschema@._fraiseql_notify_batch(v_batch, v_created, v_regressed, v_escalated);
            PERFORM @extschema@._fraiseql_rules_deadline(false);
        EXCEPTION WHEN OTHERS OR query_canceled THEN
            PERFORM @extschema@._fraiseql_rules_deadline(false);
            FOR v_rule IN SELECT c.config_id FROM @extschema@.tb_error_notification_config c
                           WHERE c.enabled AND c.notify_on_occurrence IS NULL
                             AND @extschema@._fraiseql_rule_live(c.config_id)
                           ORDER BY random() LOOP
                IF NOT @extschema@._fraiseql_rules_budget(false) THEN
                    v_out_of_time := v_out_of_time || v_rule;
                    CONTINUE;
                END IF;
                BEGIN
                    PERFORM @extschema@._fraiseql_rules_deadline(true);
                    PERFORM @extschema@._fraiseql_notify_batch(v_batch, v_created, v_regressed, v_escalated, v_rule);
                    PERFORM @extschema@._fraiseql_rules_deadline(false);
                EXCEPTION WHEN OTHERS OR query_canceled THEN
                    PERFORM @extschema@._fraiseql_rules_deadline(false);
                    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
                    PERFORM @extschema@._fraiseql_rule_struck(v_rule, v_msg);
                END;
            END LOOP;
        END;
    END IF;
    IF cardinality(v_out_of_time) > 0 THEN
        RAISE WARNING 'fraiseql_obs: notification rules % skipped for this fold: the fold''s time for rules (fraiseql_obs.rules_timeout) was spent', v_out_of_time;
    END IF;
    RETURN n;
END
$$;

-- Deleted occurrences leave tombstones for the fold and the rollups (see
-- tb_error_tombstone): the statements that write them for the deleted rows
-- given as a query (a transition table, a partition about to be dropped),
-- run by the caller (a transition table is visible to its trigger only).
CREATE FUNCTION _fraiseql_bury_statements(p_rows text, p_rollups boolean DEFAULT true) RETURNS SETOF text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT format($q$
        INSERT INTO @extschema@.tb_error_tombstone (error_id, capture_xid, occurred_at, sampled_out, n)
        SELECT d.error_id,
               CASE WHEN d.capture_xid < s.above AND NOT d.capture_xid = ANY (s.in_progress) THEN '0' ELSE d.capture_xid END,
               max(d.occurred_at), d.sampled_out, count(*)
          FROM (%s) d, @extschema@.tb_error_fold_state s
         GROUP BY 1, 2, 4$q$, p_rows)
    UNION ALL
    SELECT format($q$
        INSERT INTO @extschema@.tb_rollup_tombstone (error_id, environment, minute, capture_xid, n)
        SELECT d.error_id, d.environment, date_trunc('minute', d.occurred_at),
               CASE WHEN d.capture_xid < s.error_above AND NOT d.capture_xid = ANY (s.error_in_progress)
                    THEN '0' ELSE d.capture_xid END,
               count(*)
          FROM (%s) d, @extschema@.tb_rollup_state s
         GROUP BY 1, 2, 3, 4$q$, p_rows)
     WHERE p_rollups
$$;

-- SECURITY DEFINER: a role allowed to delete occurrences (through
-- monitoring.errors, say) needs no right on the tombstones; it can only
-- record the rows its own statement removed.
CREATE FUNCTION _fraiseql_occurrences_deleted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT @extschema@._fraiseql_bury_statements('SELECT * FROM gone') LOOP
        EXECUTE q;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER tb_error_occurrence_deleted
    AFTER DELETE ON tb_error_occurrence REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION _fraiseql_occurrences_deleted();

-- The occurrences not counted yet (the fold's own condition).
CREATE VIEW _fraiseql_unfolded AS
SELECT o.*, coalesce(m.target_id, o.error_id) AS group_id
  FROM tb_error_occurrence o
  LEFT JOIN tb_error_merge m ON m.source_id = o.error_id
 WHERE o.capture_xid >= (SELECT s.above FROM tb_error_fold_state s)
    OR o.capture_xid = ANY ((SELECT s.in_progress FROM tb_error_fold_state s)::xid8[]);

-- Error groups with live counts: folded + pending + not yet folded, and the
-- groups of new fingerprints the fold has not created yet.
CREATE VIEW v_error_groups AS
SELECT g.error_id, g.error_fingerprint, g.error_type, g.error_message, g.stack_trace, g.title, g.culprit,
       CASE WHEN greatest(p.severity_rank, l.rank) > _fraiseql_severity_rank(g.severity)
            THEN _fraiseql_severity_name(greatest(p.severity_rank, l.rank)) ELSE g.severity END AS severity,
       g.environment, g.release_version, g.status, g.assigned_to,
       greatest(g.occurrence_count + coalesce(p.occurrence_count, 0) + coalesce(l.cnt, 0), 0)::bigint AS occurrence_count,
       least(g.first_seen, p.first_seen, l.fs)   AS first_seen,
       greatest(g.last_seen, p.last_seen, l.ls)  AS last_seen,
       g.resolved_at, g.resolved_by, g.is_regression, g.regressed_at, g.regression_count,
       greatest(g.occurrences_not_stored + coalesce(p.not_stored, 0) + coalesce(l.light, 0), 0)::bigint AS occurrences_not_stored,
       -- distinct users among the group's stored occurrences (context.user_id,
       -- or user.id of a Sentry-shaped context): exact, from an index range
       -- of the group, so paid only by a query that selects the column (a
       -- subquery, not a function: a view reads tables with its owner's
       -- rights, a function it calls with the caller's). Occurrences stored
       -- light (spike protection) carry no context; rows dropped by
       -- retention are forgotten with their users.
       (SELECT count(DISTINCT _fraiseql_user_of(o.context))
          FROM tb_error_occurrence o
         WHERE o.error_id = ANY (pg_catalog.array_append(
                                     ARRAY(SELECT m.source_id FROM tb_error_merge m WHERE m.target_id = g.error_id),
                                     g.error_id))) AS users_affected,
       g.resolved_in_release, g.resolved_in_next_release, g.regressed_in_release,
       -- Sentry's substatus
       CASE g.status
           WHEN 'ignored' THEN CASE WHEN g.archived_at IS NOT NULL THEN 'archived_until_condition_met'
                                    ELSE 'archived_forever' END
           WHEN 'unresolved' THEN CASE WHEN g.is_escalating THEN 'escalating'
                                       WHEN g.is_regression THEN 'regressed'
                                       WHEN least(g.first_seen, p.first_seen, l.fs) > now() - interval '7 days' THEN 'new'
                                       ELSE 'ongoing' END
       END AS substatus,
       g.is_escalating, g.escalated_at, g.archived_at, g.archived_by,
       jsonb_strip_nulls(jsonb_build_object(
           'until', g.archive_until, 'occurrences', g.archive_until_occurrences,
           'rate', g.archive_until_rate, 'rate_window', g.archive_rate_window,
           'users', g.archive_until_users, 'users_window', g.archive_users_window)) AS archive_conditions
  FROM tb_error_log g
  LEFT JOIN tb_error_count_pending p ON p.error_id = g.error_id
  -- (sums cast back to bigint, and no polymorphic operator: see
  -- _fraiseql_foreign_dependencies)
  LEFT JOIN (SELECT u.error_id, sum(u.cnt)::bigint AS cnt, sum(u.light)::bigint AS light,
                    min(u.fs) AS fs, max(u.ls) AS ls, max(u.rank) AS rank
               FROM (SELECT o.group_id AS error_id, count(*) AS cnt, count(*) FILTER (WHERE o.sampled_out) AS light,
                            min(o.occurred_at) AS fs, max(o.occurred_at) AS ls,
                            max(_fraiseql_severity_rank(o.severity)) AS rank
                       FROM _fraiseql_unfolded o
                      GROUP BY o.group_id
                     UNION ALL
                     -- counted rows deleted since: taken back
                     SELECT coalesce(m.target_id, t.error_id), -sum(t.n), -coalesce(sum(t.n) FILTER (WHERE t.sampled_out), 0),
                            NULL, NULL, 0
                       FROM tb_error_tombstone t
                      CROSS JOIN tb_error_fold_state s
                       LEFT JOIN tb_error_merge m ON m.source_id = t.error_id
                      WHERE t.capture_xid < s.above AND NOT t.capture_xid = ANY (s.in_progress)
                      GROUP BY 1) u
              GROUP BY u.error_id) l ON l.error_id = g.error_id
UNION ALL
SELECT a.error_id, f.fingerprint, f.error_type, f.message, f.stack_trace,
       m.meta->>'title', m.meta->>'culprit',
       _fraiseql_severity_name(a.rank), f.environment, f.release_version, 'unresolved'::text, NULL::text,
       a.cnt, a.fs, a.ls, NULL::timestamptz, NULL::text, false, NULL::timestamptz, 0, a.light,
       (SELECT count(DISTINCT _fraiseql_user_of(o.context))
          FROM tb_error_occurrence o WHERE o.error_id = a.error_id),
       NULL::text, false, NULL::text,
       'new'::text, false, NULL::timestamptz, NULL::timestamptz, NULL::text, '{}'::jsonb
  FROM (SELECT o.error_id, count(*) AS cnt, count(*) FILTER (WHERE o.sampled_out) AS light,
               min(o.occurred_at) AS fs, max(o.occurred_at) AS ls,
               max(_fraiseql_severity_rank(o.severity)) AS rank
          FROM _fraiseql_unfolded o
         WHERE NOT EXISTS (SELECT 1 FROM tb_error_log e WHERE e.error_id = o.group_id)
         GROUP BY o.error_id) a
 CROSS JOIN LATERAL (SELECT o.fingerprint, o.error_type, o.message, o.stack_trace, o.environment, o.release_version
                       FROM _fraiseql_unfolded o WHERE o.error_id = a.error_id
                      ORDER BY o.sampled_out, o.occurred_at LIMIT 1) f
 CROSS JOIN LATERAL (SELECT _fraiseql_group_meta(f.error_type, f.message, f.stack_trace) AS meta) m;

-- Releases, oldest first (semantic versions by version, the others by
-- when they were first seen), with the regressions each caused and the
-- groups it reopened that are still open.
CREATE VIEW v_releases AS
SELECT r.release, fraiseql_release_key(r.release) IS NOT NULL AS is_semver,
       r.first_seen, r.last_seen, r.occurrences, r.regressions,
       coalesce(o.groups, '{}') AS open_regressions
  FROM tb_release r
  LEFT JOIN (SELECT g.regressed_in_release, array_agg(g.error_id ORDER BY g.regressed_at) AS groups
               FROM tb_error_log g
              WHERE g.is_regression AND g.status = 'unresolved' AND g.regressed_in_release IS NOT NULL
              GROUP BY g.regressed_in_release) o ON o.regressed_in_release = r.release
 ORDER BY fraiseql_release_key(r.release) IS NULL, fraiseql_release_key(r.release) COLLATE "C", r.first_seen;

-- ---------------------------------------------------------------------------
-- Workflow
-- ---------------------------------------------------------------------------
-- The group of error_id, for the workflow functions. A new fingerprint's
-- group is made by the fold from committed captures (fraiseql_flush_counts);
-- until then (a flush interval) it is waited for here, in READ COMMITTED,
-- a little longer than the worker needs. The fold is not run from here: a
-- fold in the caller's transaction would hold the fold's lock until that
-- transaction ends, and every count, milestone and rule with it.
CREATE FUNCTION _fraiseql_require_group(p_error_id uuid) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_deadline timestamptz;
BEGIN
    IF p_error_id IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: error_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- a group merged into another is that other one now (the id a capture
    -- of its fingerprint returns still leads there)
    SELECT coalesce((SELECT m.target_id FROM @extschema@.tb_error_merge m WHERE m.source_id = p_error_id), p_error_id)
      INTO p_error_id;
    PERFORM 1 FROM @extschema@.tb_error_log WHERE error_id = p_error_id;
    IF FOUND THEN
        RETURN p_error_id;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_occurrence o WHERE o.error_id = p_error_id) THEN
        RAISE EXCEPTION 'fraiseql_obs: no error group with error_id %', p_error_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_occurrence o
                    WHERE o.error_id = p_error_id
                      AND o.capture_xid IS DISTINCT FROM pg_current_xact_id_if_assigned()) THEN
        RAISE EXCEPTION 'fraiseql_obs: the error group % was first captured in this transaction and is made when it commits', p_error_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Commit the capture first; v_error_groups shows the group meanwhile.';
    END IF;
    v_deadline := clock_timestamp()
        + 2 * @extschema@.fraiseql_setting('fraiseql_obs.flush_interval')::interval + interval '2 seconds';
    IF current_setting('transaction_isolation') = 'read committed' THEN
        WHILE clock_timestamp() < v_deadline LOOP
            PERFORM pg_sleep(0.02);
            PERFORM 1 FROM @extschema@.tb_error_log WHERE error_id = p_error_id;
            IF FOUND THEN
                RETURN p_error_id;
            END IF;
        END LOOP;
    END IF;
    RAISE EXCEPTION 'fraiseql_obs: the error group % is not made yet (the worker makes it at its next fold)', p_error_id
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'Try again in a moment; without the background worker, CALL fraiseql_deliver_notifications() or SELECT fraiseql_flush_counts() folds.';
END
$$;

-- A triage action: the new status, and what the previous one left ends
-- (an archive's conditions, escalation, a release condition).
CREATE FUNCTION _fraiseql_set_status(p_error_id uuid, p_status text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE @extschema@.tb_error_log g
       SET status = p_status, is_escalating = false,
           archived_at = NULL, archived_by = NULL, archive_until = NULL, archive_added = NULL,
           archive_until_occurrences = NULL, archive_until_rate = NULL, archive_rate_window = NULL,
           archive_until_users = NULL, archive_users_window = NULL,
           resolved_in_release = NULL, resolved_in_next_release = false,
           resolved_at = CASE WHEN p_status = 'resolved' THEN now() END,
           resolved_by = CASE WHEN p_status = 'resolved' THEN g.resolved_by END
     WHERE g.error_id = p_error_id
$$;

-- in_release: only an occurrence of that release or a later one reopens
-- the group (an older release still running does not); in_next_release:
-- only one of a release first seen after now.
CREATE FUNCTION fraiseql_resolve_error(error_id uuid, resolved_by text DEFAULT NULL, notes text DEFAULT NULL,
                                       in_release text DEFAULT NULL, in_next_release boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id uuid;
BEGIN
    IF nullif(btrim($4), '') IS NOT NULL AND $5 THEN
        RAISE EXCEPTION 'fraiseql_obs: in_release and in_next_release exclude each other'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF $4 IS NOT NULL AND nullif(btrim($4), '') IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: in_release must name a release'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_id := @extschema@._fraiseql_require_group($1);
    PERFORM @extschema@._fraiseql_set_status(v_id, 'resolved');
    UPDATE @extschema@.tb_error_log g
       SET resolved_by = $2, resolution_notes = $3,
           is_regression = false, resolved_in_release = btrim($4),
           resolved_in_next_release = coalesce($5, false)
     WHERE g.error_id = v_id;
END
$$;

CREATE FUNCTION fraiseql_unresolve_error(error_id uuid) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@._fraiseql_set_status(@extschema@._fraiseql_require_group($1), 'unresolved');
END
$$;

-- Ignore for good (Sentry's "archive forever"): no rule notifies about the
-- group, and no occurrence reopens it.
CREATE FUNCTION fraiseql_ignore_error(error_id uuid) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@._fraiseql_set_status(@extschema@._fraiseql_require_group($1), 'ignored');
END
$$;

-- Archive until a condition (Sentry's "ignore until"), any combination,
-- the first met wins: until_occurrences more occurrences; until_users
-- distinct users (since now, or within users_window); until_rate
-- occurrences within rate_window; for_interval (then it is simply
-- unresolved again). Meanwhile the group is 'ignored' and no rule notifies
-- about it; a count, user or rate condition met reopens it as escalating
-- (rules with notify_on_escalation hear of it). Without a condition this
-- is fraiseql_ignore_error.
CREATE FUNCTION fraiseql_archive_error(error_id uuid, until_occurrences bigint DEFAULT NULL,
                                       until_users integer DEFAULT NULL, for_interval interval DEFAULT NULL,
                                       until_rate integer DEFAULT NULL, rate_window interval DEFAULT interval '1 hour',
                                       users_window interval DEFAULT NULL, archived_by text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id uuid;
    v_count bigint;
BEGIN
    IF until_occurrences < 1 OR until_users < 1 OR until_rate < 1 THEN
        RAISE EXCEPTION 'fraiseql_obs: until_occurrences, until_users and until_rate must be at least 1'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF for_interval <= interval '0' OR for_interval > interval '10 years' THEN
        RAISE EXCEPTION 'fraiseql_obs: for_interval must be positive and at most 10 years'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rate_window <= interval '0' OR rate_window > interval '30 days'
       OR users_window <= interval '0' OR users_window > interval '30 days' THEN
        RAISE EXCEPTION 'fraiseql_obs: rate_window and users_window must be positive and at most 30 days'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF until_rate IS NOT NULL AND rate_window IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: until_rate needs rate_window' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_id := @extschema@._fraiseql_require_group($1);
    PERFORM @extschema@._fraiseql_set_status(v_id, 'ignored');
    IF num_nonnulls(until_occurrences, until_users, for_interval, until_rate) = 0 THEN
        RETURN;
    END IF;
    -- "N more" counts from now: the group's occurrences not counted yet
    -- (committed before now, folded after) are not among them
    SELECT coalesce((SELECT sum(p.added) FROM @extschema@.tb_error_count_pending p WHERE p.error_id = v_id), 0)
         + (SELECT count(*) FROM @extschema@._fraiseql_unfolded u WHERE u.group_id = v_id)
      INTO v_count;
    UPDATE @extschema@.tb_error_log g
       SET archived_at = now(), archived_by = $8, archive_until = now() + for_interval,
           archive_added = -v_count,
           archive_until_occurrences = until_occurrences,
           archive_until_rate = until_rate, archive_rate_window = CASE WHEN until_rate IS NOT NULL THEN rate_window END,
           archive_until_users = until_users, archive_users_window = CASE WHEN until_users IS NOT NULL THEN users_window END
     WHERE g.error_id = v_id;
END
$$;

CREATE FUNCTION fraiseql_assign_error(error_id uuid, assignee text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id uuid := @extschema@._fraiseql_require_group($1);
BEGIN
    UPDATE @extschema@.tb_error_log g SET assigned_to = nullif($2, '') WHERE g.error_id = v_id;
END
$$;

-- An ownership rule, written as in Sentry: "path:src/payments/*",
-- "module:billing*", "type:PaymentError", "tags.customer:acme*",
-- "url:*/checkout*". It goes after the existing ones (and so wins over
-- them). With the caller's rights: it needs INSERT and SELECT on
-- tb_ownership_rule.
CREATE FUNCTION fraiseql_add_ownership_rule(rule text, assignee text) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind text;
    v_key  text;
    v_pattern text;
    v_id   bigint;
    m      text[];
BEGIN
    m := regexp_match(btrim(rule), '^(path|module|type|url|tags\.([^:\s]+)):\s*(\S.*)$');
    IF m IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: an ownership rule is path:, module:, type:, url: or tags.<key>: and a pattern, got %', rule
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'For example: path:src/payments/*';
    END IF;
    IF nullif(btrim($2), '') IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: an ownership rule needs an assignee' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_kind := CASE WHEN m[2] IS NOT NULL THEN 'tag' ELSE m[1] END;
    v_key := m[2];
    v_pattern := btrim(m[3]);
    -- (after the others by its rule_id: no lock, no read of the table)
    INSERT INTO @extschema@.tb_ownership_rule (match_kind, tag_key, pattern, assignee)
    VALUES (v_kind, v_key, v_pattern, btrim($2))
    RETURNING tb_ownership_rule.rule_id INTO v_id;
    RETURN v_id;
END
$$;

-- ---------------------------------------------------------------------------
-- Merge and unmerge (see tb_error_merge). Neither takes the fold's lock in
-- the caller's transaction (one left open would stop every count): a merge
-- locks the group rows it changes (their counts wait meanwhile, nobody
-- else's), and counts a fold made before it saw the merge are moved to the
-- target by the next fold; an unmerge is settled by the next fold.
-- ---------------------------------------------------------------------------
-- A group deleted (by hand, pruned, truncated) takes its merges with it: the
-- fingerprints merged into it are their own again, and the next fold makes
-- their groups from the occurrences that remain (a zero pending count each,
-- which the fold treats as a group deleted with rows left).
CREATE FUNCTION _fraiseql_groups_deleted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH freed AS (
        DELETE FROM @extschema@.tb_error_merge m
         WHERE m.target_id IN (SELECT d.error_id FROM gone d)
        RETURNING m.source_id
    )
    INSERT INTO @extschema@.tb_error_count_pending (error_id, occurrence_count, first_seen, last_seen)
    SELECT f.source_id, 0, 'infinity', '-infinity' FROM freed f
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER tb_error_log_deleted
    AFTER DELETE ON tb_error_log REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION _fraiseql_groups_deleted();

CREATE FUNCTION _fraiseql_groups_truncated() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM @extschema@.tb_error_merge;
    DELETE FROM @extschema@.tb_error_unmerge_request;
    RETURN NULL;
END
$$;

CREATE TRIGGER tb_error_log_truncated
    AFTER TRUNCATE ON tb_error_log
    FOR EACH STATEMENT EXECUTE FUNCTION _fraiseql_groups_truncated();

-- Merge the groups `sources` into `target`: their counts, first and last
-- seen and highest severity go to the target, their rows go, and their
-- fingerprints' occurrences, past and future, count for the target (a
-- source that was itself a merge target brings its own sources). The
-- target keeps its status, assignee and history (an archive's "N more"
-- counts new occurrences only). Returns how many groups were merged in.
CREATE FUNCTION fraiseql_merge_errors(target uuid, sources uuid[], merged_by text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_target  uuid;
    v_sources uuid[];
    v_locked  uuid[];
    n         integer;
BEGIN
    IF sources IS NULL OR cardinality(sources) = 0 OR array_position(sources, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: sources must list the error_ids to merge' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_target := @extschema@._fraiseql_require_group(target);
    SELECT array_agg(DISTINCT r.id) INTO v_sources
      FROM unnest(sources) s(id), LATERAL (SELECT @extschema@._fraiseql_require_group(s.id) AS id) r
     WHERE r.id <> v_target;
    IF v_sources IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: nothing to merge: every source is the target already'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the rows, in one order (no deadlock between two merges); a group
    -- merged or deleted meanwhile is not there any more
    SELECT array_agg(g.error_id) INTO v_locked
      FROM (SELECT g.error_id FROM @extschema@.tb_error_log g
             WHERE g.error_id = ANY (v_sources || v_target) ORDER BY g.error_id FOR UPDATE) g;
    IF EXISTS (SELECT 1 FROM @extschema@.tb_error_unmerge_request r
                WHERE r.source_id = ANY (v_sources || v_target) OR r.target_id = ANY (v_sources || v_target)) THEN
        RAISE EXCEPTION 'fraiseql_obs: an unmerge of these groups is being settled'
              USING ERRCODE = 'serialization_failure', HINT = 'Try again in a moment.';
    END IF;
    IF v_locked IS NULL OR NOT v_locked @> (v_sources || v_target) THEN
        RAISE EXCEPTION 'fraiseql_obs: a group to merge was merged or deleted meanwhile'
              USING ERRCODE = 'serialization_failure', HINT = 'Try again.';
    END IF;
    -- the fingerprints merged into a source now count for the target
    UPDATE @extschema@.tb_error_merge m SET target_id = v_target WHERE m.target_id = ANY (v_sources);
    WITH gone AS (
        DELETE FROM @extschema@.tb_error_log g WHERE g.error_id = ANY (v_sources) RETURNING g.*
    ), merges AS (
        INSERT INTO @extschema@.tb_error_merge (source_id, fingerprint, target_id, merged_by)
        SELECT g.error_id, g.error_fingerprint, v_target, merged_by FROM gone g
    ), sums AS (
        SELECT sum(g.occurrence_count) AS n, sum(g.occurrences_not_stored) AS light, min(g.first_seen) AS fs,
               max(g.last_seen) AS ls, max(@extschema@._fraiseql_severity_rank(g.severity)) AS rank
          FROM gone g
    ), merged AS (
        UPDATE @extschema@.tb_error_log t
           SET occurrence_count = t.occurrence_count + x.n,
               occurrences_not_stored = t.occurrences_not_stored + x.light,
               first_seen = least(t.first_seen, x.fs), last_seen = greatest(t.last_seen, x.ls),
               severity = CASE WHEN x.rank > @extschema@._fraiseql_severity_rank(t.severity)
                               THEN @extschema@._fraiseql_severity_name(x.rank) ELSE t.severity END
          FROM sums x
         WHERE t.error_id = v_target
    )
    SELECT count(*) INTO n FROM gone;
    -- (their pending counts stay: the next fold moves them to the target;
    -- their rate-limit windows and digest rows too, unused, until pruned:
    -- rows a fold may upsert are never deleted from a caller's transaction)
    RETURN n;
END
$$;

-- Give a fingerprint merged into `target` its own group again, with the
-- occurrences of it that remain (their count leaves the target). It stays
-- separate: only another merge joins them again. Its occurrences are its
-- own from now on; the next fold (within fraiseql_obs.flush_interval)
-- makes its group and moves the count. Returns the fingerprint's error_id.
CREATE FUNCTION fraiseql_unmerge_error(target uuid, fingerprint text) RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_target uuid;
    v_source uuid := @extschema@.fraiseql_error_id(fingerprint);
BEGIN
    IF fingerprint IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: fingerprint must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_target := @extschema@._fraiseql_require_group(target);
    DELETE FROM @extschema@.tb_error_merge m WHERE m.source_id = v_source AND m.target_id = v_target;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fraiseql_obs: the fingerprint % is not merged into the group %', fingerprint, target
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'v_error_merges lists what is merged where.';
    END IF;
    INSERT INTO @extschema@.tb_error_unmerge_request (source_id, target_id) VALUES (v_source, v_target);
    PERFORM @extschema@._fraiseql_wake_worker();
    RETURN v_source;
END
$$;

-- Settles an unmerge, in the fold, under its lock, before it counts (its
-- state: above, in_progress). The target counted the fingerprint's counted
-- rows, and its counted rows deleted whose tombstones are still to be taken
-- back, except what sits in the fingerprint's own pending count (counted by
-- a fold that did not see the merge). That leaves the target for the
-- fingerprint's group, made from its first remaining occurrence; with none
-- left, the tombstones and pending count go to the target instead.
CREATE FUNCTION _fraiseql_settle_unmerge(p_source uuid, p_target uuid, p_above xid8, p_in_progress xid8[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    v_n      bigint;
    v_light  bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM @extschema@.tb_error_merge m WHERE m.source_id = p_source) THEN
        RETURN;  -- merged again since (a merge refuses while this waits; by hand, then): nothing moves
    END IF;
    -- one statement, one snapshot
    SELECT (SELECT count(*) FROM @extschema@.tb_error_occurrence o
             WHERE o.error_id = p_source AND (o.capture_xid < p_above) IS TRUE  -- (by key: see the fold)
               AND NOT o.capture_xid = ANY (p_in_progress)) AS rows_n,
           (SELECT count(*) FROM @extschema@.tb_error_occurrence o
             WHERE o.error_id = p_source AND o.sampled_out
               AND (o.capture_xid < p_above) IS TRUE AND NOT o.capture_xid = ANY (p_in_progress)) AS rows_light,
           (SELECT coalesce(sum(t.n), 0) FROM @extschema@.tb_error_tombstone t
             WHERE t.error_id = p_source AND t.capture_xid < p_above AND NOT t.capture_xid = ANY (p_in_progress)) AS graves_n,
           (SELECT coalesce(sum(t.n), 0) FROM @extschema@.tb_error_tombstone t
             WHERE t.error_id = p_source AND t.sampled_out
               AND t.capture_xid < p_above AND NOT t.capture_xid = ANY (p_in_progress)) AS graves_light,
           (SELECT coalesce(sum(p.occurrence_count), 0) FROM @extschema@.tb_error_count_pending p
             WHERE p.error_id = p_source) AS pend_n,
           (SELECT coalesce(sum(p.not_stored), 0) FROM @extschema@.tb_error_count_pending p
             WHERE p.error_id = p_source) AS pend_light,
           EXISTS (SELECT 1 FROM @extschema@.tb_error_occurrence o WHERE o.error_id = p_source) AS any_row,
           EXISTS (SELECT 1 FROM @extschema@.tb_error_log g WHERE g.error_id = p_source) AS has_group
      INTO v;
    v_n := v.rows_n + v.graves_n - v.pend_n;
    v_light := v.rows_light + v.graves_light - v.pend_light;
    IF NOT v.any_row THEN
        -- nothing left to make a group of: the target keeps the count of
        -- what went (as it did), and takes back the rows deleted meanwhile
        UPDATE @extschema@.tb_error_tombstone t SET error_id = p_target WHERE t.error_id = p_source;
        WITH d AS (
            DELETE FROM @extschema@.tb_error_count_pending p WHERE p.error_id = p_source RETURNING p.*
        )
        INSERT INTO @extschema@.tb_error_count_pending AS p
            (error_id, occurrence_count, not_stored, added, first_seen, last_seen, severity_rank)
        SELECT p_target, d.occurrence_count, d.not_stored, d.added, d.first_seen, d.last_seen, d.severity_rank FROM d
        ON CONFLICT (error_id) DO UPDATE
           SET occurrence_count = p.occurrence_count + excluded.occurrence_count,
               not_stored = p.not_stored + excluded.not_stored,
               added = p.added + excluded.added,
               first_seen = least(p.first_seen, excluded.first_seen),
               last_seen = greatest(p.last_seen, excluded.last_seen),
               severity_rank = greatest(p.severity_rank, excluded.severity_rank);
        RETURN;
    END IF;
    IF NOT v.has_group THEN
        INSERT INTO @extschema@.tb_error_log
            (error_fingerprint, fingerprint_version, error_type, error_message, stack_trace,
             title, culprit, severity, environment, release_version,
             occurrence_count, occurrences_not_stored, first_seen, last_seen)
        SELECT o.fingerprint, @extschema@.fraiseql_fingerprint_version(), o.error_type, o.message, o.stack_trace,
               m.meta->>'title', m.meta->>'culprit', o.severity, o.environment, o.release_version,
               v_n, v_light, r.fs, r.ls
          FROM (SELECT * FROM (
                    -- its first occurrence stored whole, else its first (by the index)
                    (SELECT * FROM @extschema@.tb_error_occurrence o WHERE o.error_id = p_source AND NOT o.sampled_out
                      ORDER BY o.occurred_at LIMIT 1)
                    UNION ALL
                    (SELECT * FROM @extschema@.tb_error_occurrence o WHERE o.error_id = p_source
                      ORDER BY o.occurred_at LIMIT 1)) f LIMIT 1) o
         CROSS JOIN LATERAL (SELECT @extschema@._fraiseql_group_meta(o.error_type, o.message, o.stack_trace) AS meta) m
         CROSS JOIN LATERAL @extschema@._fraiseql_group_seen(p_source) r;
    ELSE
        -- (made meanwhile by hand: it takes the count the target gives back)
        INSERT INTO @extschema@.tb_error_count_pending AS p (error_id, occurrence_count, not_stored, first_seen, last_seen)
        VALUES (p_source, v_n, v_light, 'infinity', '-infinity')
        ON CONFLICT (error_id) DO UPDATE
           SET occurrence_count = p.occurrence_count + excluded.occurrence_count,
               not_stored = p.not_stored + excluded.not_stored;
    END IF;
    -- the target gives that count back (through its pending count, which
    -- the fold adds to what it holds)
    INSERT INTO @extschema@.tb_error_count_pending AS p (error_id, occurrence_count, not_stored, first_seen, last_seen)
    VALUES (p_target, -v_n, -v_light, 'infinity', '-infinity')
    ON CONFLICT (error_id) DO UPDATE
       SET occurrence_count = p.occurrence_count + excluded.occurrence_count,
           not_stored = p.not_stored + excluded.not_stored;
    -- (a target row another transaction holds keeps its times: no fold waits)
    UPDATE @extschema@.tb_error_log g
       SET first_seen = coalesce(r.fs, g.first_seen), last_seen = coalesce(r.ls, g.last_seen)
      FROM @extschema@._fraiseql_group_seen(p_target) r
     WHERE g.error_id IN (SELECT e.error_id FROM @extschema@.tb_error_log e
                           WHERE e.error_id = p_target FOR NO KEY UPDATE SKIP LOCKED);
END
$$;

-- What is merged where.
CREATE VIEW v_error_merges AS
SELECT m.target_id, g.title AS target_title, m.fingerprint, m.source_id, m.merged_at, m.merged_by,
       (SELECT count(*) FROM tb_error_occurrence o WHERE o.error_id = m.source_id) AS occurrences_stored
  FROM tb_error_merge m
  LEFT JOIN tb_error_log g ON g.error_id = m.target_id;

-- ---------------------------------------------------------------------------
-- The seed's per-occurrence shape, monitoring.errors.
-- ---------------------------------------------------------------------------
CREATE VIEW monitoring.errors AS
SELECT o.occurrence_id          AS id,
       o.fingerprint,
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
       coalesce(m.target_id, o.error_id) AS error_id,
       o.severity,
       o.release_version
  FROM @extschema@.tb_error_occurrence o
  LEFT JOIN @extschema@.tb_error_merge m ON m.source_id = o.error_id
  -- a new fingerprint's group exists once the fold has run (milliseconds)
  LEFT JOIN @extschema@.tb_error_log g ON g.error_id = coalesce(m.target_id, o.error_id);

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
