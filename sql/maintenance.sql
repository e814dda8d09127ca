-- fraiseql_obs: the maintenance tick. The background worker only schedules
-- fraiseql_run_maintenance(); anyone can run it by hand (like pg_partman's
-- run_maintenance()).

-- Remove error groups that have nothing left, per the documented rule:
--   * no occurrence row remains for the group, and its last_seen is older
--     than the start of the oldest retained month;
--   * it is not assigned to anyone;
--   * an unresolved group is kept for one more retention period after that,
--     so an open problem is not forgotten the day its last occurrence ages out.
CREATE FUNCTION _fraiseql_prune_groups(retention_months integer) RETURNS bigint
LANGUAGE plpgsql
SET TimeZone = 'UTC'
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cutoff timestamptz;
    n      bigint;
BEGIN
    IF retention_months <= 0 THEN
        RETURN 0;
    END IF;
    cutoff := date_trunc('month', now()) - retention_months * interval '1 month';
    -- (no fold here: a group with occurrences not yet folded still has
    -- occurrences, and the fold must not run inside this long transaction)
    DELETE FROM @extschema@.tb_error_log g
     WHERE g.last_seen < cutoff
       AND g.assigned_to IS NULL
       AND NOT (g.status = 'unresolved' AND g.last_seen >= cutoff - retention_months * interval '1 month')
       AND NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_occurrence o
                        WHERE o.error_id = ANY (@extschema@.fraiseql_error_group_ids(g.error_id)))
       AND NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_count_pending p WHERE p.error_id = g.error_id);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- What the windows of rules and archives no longer need: users not seen
-- for longer than the longest window (30 days), unless an archive counts
-- users since it began; crossings older than the longest window; rate-limit and
-- digest state of groups merged away or deleted. Run by the fold (hourly,
-- under its lock): no other transaction deletes rows the fold upserts, so
-- the fold never waits for one. At most 10,000 users a time.
CREATE FUNCTION _fraiseql_prune_user_windows() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM @extschema@.tb_notification_crossing c WHERE c.over_until < now() - interval '31 days';
    DELETE FROM @extschema@.tb_error_user u
     USING (SELECT x.error_id, x.user_key FROM @extschema@.tb_error_user x
             WHERE x.last_seen < now() - interval '31 days'
               AND NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_log g
                                WHERE g.error_id = coalesce((SELECT m.target_id FROM @extschema@.tb_error_merge m
                                                              WHERE m.source_id = x.error_id), x.error_id)
                                  AND g.archive_until_users IS NOT NULL AND g.archive_users_window IS NULL
                                  AND x.last_seen > g.archived_at)
             LIMIT 10000) d
     WHERE u.error_id = d.error_id AND u.user_key = d.user_key;
    DELETE FROM @extschema@.tb_notification_state s
     WHERE NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_log g WHERE g.error_id = s.error_id);
    DELETE FROM @extschema@.tb_notification_digest d
     WHERE NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_log g WHERE g.error_id = d.error_id);
$$;

-- Records how a maintenance step of a table went (p_problem NULL: it ran).
-- A step that keeps failing is a DBA's business: retention stops, the
-- default partition grows. From the third failure in a row it is logged as
-- a WARNING (at most once an hour) naming the sessions that held the table,
-- e.g. a report left open in a transaction; v_maintenance_steps shows it.
CREATE FUNCTION _fraiseql_maintenance_step_result(p_parent regclass, p_step text, p_problem text, p_locked boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s          @extschema@.tb_maintenance_step;
    v_blockers integer[];
    v_who      text;
BEGIN
    IF p_problem IS NULL THEN
        DELETE FROM @extschema@.tb_maintenance_step t
         WHERE t.parent_table = p_parent AND t.step = p_step AND t.failures >= 3
        RETURNING * INTO s;
        IF FOUND THEN
            RAISE LOG 'fraiseql_obs: maintenance of % (%) ran again, after % failed attempts since %',
                p_parent, p_step, s.failures, s.failing_since;
        END IF;
        INSERT INTO @extschema@.tb_maintenance_step AS t (parent_table, step, last_done_at)
        VALUES (p_parent, p_step, now())
        ON CONFLICT (parent_table, step) DO UPDATE
           SET last_done_at = now(), failing_since = NULL, failures = 0, last_problem = NULL,
               blocked_by = NULL, warned_at = NULL;
        RETURN;
    END IF;
    IF p_locked THEN
        -- who holds the table or one of its partitions (granted locks only)
        SELECT array_agg(DISTINCT l.pid ORDER BY l.pid) INTO v_blockers
          FROM pg_locks l
         WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
           AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
           AND (l.relation = p_parent
                OR l.relation IN (SELECT i.inhrelid FROM pg_inherits i WHERE i.inhparent = p_parent));
    END IF;
    INSERT INTO @extschema@.tb_maintenance_step AS t
        (parent_table, step, failing_since, failures, last_problem, blocked_by)
    VALUES (p_parent, p_step, now(), 1, left(p_problem, 1000), v_blockers)
    ON CONFLICT (parent_table, step) DO UPDATE
       SET failing_since = coalesce(t.failing_since, now()), failures = t.failures + 1,
           last_problem = excluded.last_problem, blocked_by = excluded.blocked_by
    RETURNING * INTO s;
    IF s.failures >= 3 AND (s.warned_at IS NULL OR s.warned_at < now() - interval '1 hour') THEN
        SELECT string_agg(format('pid %s (role %s, %s, transaction open since %s)',
                                 a.pid, a.usename, coalesce(a.state, '?'), coalesce(a.xact_start::text, '?')),
                          '; ' ORDER BY a.pid)
          INTO v_who
          FROM pg_stat_activity a WHERE a.pid = ANY (v_blockers);
        UPDATE @extschema@.tb_maintenance_step t SET warned_at = now()
         WHERE t.parent_table = p_parent AND t.step = p_step;
        RAISE WARNING 'fraiseql_obs: maintenance of % (%) has failed % times in a row since %: %',
            p_parent, p_step, s.failures, s.failing_since, s.last_problem
            USING DETAIL = CASE WHEN v_who IS NOT NULL THEN 'Sessions holding the table: ' || v_who || '.' END,
                  HINT = CASE p_step
                         WHEN 'drop' THEN 'Partitions past retention are not dropped meanwhile. '
                         WHEN 'create' THEN 'New rows go to the default partition meanwhile. '
                         ELSE '' END
                         || 'A session left open in a transaction can be ended with pg_terminate_backend(); '
                         || 'idle_in_transaction_session_timeout prevents it. See v_maintenance_steps.';
    END IF;
END
$$;

-- One maintenance tick: for every managed table, move rows out of the default
-- partition, create partitions ahead, drop partitions past retention; then
-- prune empty groups. Each table is handled in its own subtransaction with a
-- short lock_timeout: a table whose locks cannot be had now is skipped and
-- retried next tick, so maintenance never queues behind (and so never blocks)
-- application queries. Returns what it did; the run is recorded in
-- tb_maintenance_run (see v_maintenance_runs).
CREATE FUNCTION fraiseql_run_maintenance(triggered_by text DEFAULT 'manual') RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET TimeZone = 'UTC'
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_run_id      bigint;
    v_started     timestamptz := clock_timestamp();
    v_created     text[] := '{}';
    v_dropped     text[] := '{}';
    v_skipped     text[] := '{}';
    v_moved       bigint := 0;
    v_pruned      bigint := 0;
    v_error       text;
    v_old_timeout text := current_setting('lock_timeout');
    v_premake     integer := @extschema@.fraiseql_setting('fraiseql_obs.premake_months')::integer;
    v_premake_days integer := @extschema@.fraiseql_setting('fraiseql_obs.premake_days')::integer;
    v_keep        integer;
    v_step        text;
    cfg           record;
    r             record;
    v_result      jsonb;
BEGIN
    -- While a dump is being restored, its own DDL makes the partitions: one
    -- made here would collide with it (see tb_restore_session).
    IF @extschema@._fraiseql_complete_install() THEN
        RETURN jsonb_build_object('busy', true, 'reason', 'a restore is in progress');
    END IF;
    -- Two runs never overlap. The worker skips its tick when a run is in
    -- progress; a manual run waits for it (runs are short).
    IF triggered_by = 'worker' THEN
        PERFORM FROM @extschema@.tb_maintenance_lock FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('busy', true, 'reason', 'another maintenance run is in progress');
        END IF;
    ELSE
        PERFORM FROM @extschema@.tb_maintenance_lock FOR UPDATE;
    END IF;

    PERFORM set_config('lock_timeout', @extschema@.fraiseql_setting('fraiseql_obs.ddl_lock_timeout'), true);

    -- Each step of each table in its own subtransaction: one that fails (a
    -- lock not had in time, a bad row) is recorded and retried next run, and
    -- never keeps the other steps or tables from running.
    FOR cfg IN SELECT * FROM @extschema@.tb_partition_config ORDER BY parent_table::text LOOP
        v_keep := @extschema@.fraiseql_setting(cfg.retention_guc)::integer;
        FOR v_step IN SELECT unnest(ARRAY['move', 'create', 'drop', 'prune']) LOOP
            CONTINUE WHEN v_step = 'prune' AND NOT cfg.prune_groups;
            BEGIN
                CASE v_step
                WHEN 'move' THEN
                    v_moved := v_moved + @extschema@.fraiseql_move_default_rows(cfg.parent_table);
                WHEN 'create' THEN
                    FOR r IN SELECT * FROM @extschema@.fraiseql_ensure_partitions(
                                cfg.parent_table,
                                CASE cfg.granularity WHEN 'month' THEN v_premake ELSE v_premake_days END) LOOP
                        IF r.created THEN
                            v_created := v_created || r.partition_name;
                        END IF;
                    END LOOP;
                WHEN 'drop' THEN
                    FOR r IN SELECT * FROM @extschema@.fraiseql_drop_old_partitions(cfg.parent_table, v_keep) LOOP
                        v_dropped := v_dropped || r.partition_name;
                    END LOOP;
                ELSE
                    v_pruned := v_pruned + @extschema@._fraiseql_prune_groups(v_keep);
                END CASE;
                PERFORM @extschema@._fraiseql_maintenance_step_result(cfg.parent_table, v_step, NULL, false);
            EXCEPTION
                WHEN lock_not_available THEN
                    v_skipped := v_skipped || (cfg.parent_table::text || ' ' || v_step || ': lock not available, retried next run');
                    PERFORM @extschema@._fraiseql_maintenance_step_result(cfg.parent_table, v_step, 'lock not available', true);
                WHEN OTHERS THEN
                    v_error := coalesce(v_error || E'\n', '') || cfg.parent_table::text || ' ' || v_step || ': ' || SQLERRM;
                    PERFORM @extschema@._fraiseql_maintenance_step_result(cfg.parent_table, v_step, SQLERRM, false);
            END;
        END LOOP;
    END LOOP;

    PERFORM set_config('lock_timeout', v_old_timeout, true);

    BEGIN
        PERFORM @extschema@._fraiseql_prune_rollups();
    EXCEPTION WHEN OTHERS THEN
        v_error := coalesce(v_error || E'\n', '') || 'rollups: ' || SQLERRM;
    END;
    BEGIN
        PERFORM @extschema@._fraiseql_prune_ingest_events();
    EXCEPTION WHEN OTHERS THEN
        v_error := coalesce(v_error || E'\n', '') || 'ingest event ids: ' || SQLERRM;
    END;

    INSERT INTO @extschema@.tb_maintenance_run AS m
        (started_at, finished_at, duration_ms, triggered_by, created, dropped, moved_rows,
         groups_removed, skipped, last_error)
    VALUES (v_started, clock_timestamp(),
            extract(epoch FROM clock_timestamp() - v_started) * 1000,
            coalesce(triggered_by, 'manual'), v_created, v_dropped, v_moved, v_pruned, v_skipped, v_error)
    RETURNING m.run_id INTO v_run_id;

    -- keep the run history bounded
    DELETE FROM @extschema@.tb_maintenance_run WHERE started_at < now() - interval '30 days';

    v_result := jsonb_build_object(
        'run_id', v_run_id,
        'created', to_jsonb(v_created),
        'dropped', to_jsonb(v_dropped),
        'moved_rows', v_moved,
        'groups_removed', v_pruned,
        'skipped', to_jsonb(v_skipped),
        'error', v_error,
        'duration_ms', round((extract(epoch FROM clock_timestamp() - v_started) * 1000)::numeric, 3));
    RETURN v_result;
END
$$;

-- Each maintenance step of each managed table, those failing first:
--   SELECT * FROM v_maintenance_steps WHERE failing_since IS NOT NULL;
CREATE VIEW v_maintenance_steps AS
SELECT parent_table, step, last_done_at, failing_since, failures, last_problem, blocked_by
  FROM tb_maintenance_step
 ORDER BY failing_since NULLS LAST, parent_table::text, step;

CREATE VIEW v_maintenance_runs AS
SELECT run_id, started_at, finished_at, duration_ms, triggered_by, created, dropped,
       moved_rows, groups_removed, skipped, last_error
  FROM tb_maintenance_run
 ORDER BY started_at DESC;
