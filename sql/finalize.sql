-- fraiseql_obs: last step of CREATE EXTENSION.

-- The functions, operators and types the extension's stored expressions
-- (views, defaults, constraints, index expressions, triggers, function
-- signatures) were bound to, that are neither PostgreSQL's own nor the
-- extension's. A view binds a name when it is created, in the install's
-- search_path (the target schema): a role that could create objects there
-- beforehand could offer a better match than pg_catalog's for an operator
-- or function a view uses (`public.+(bigint, numeric)`, an exact-type
-- overload of a polymorphic function), which would then run as whoever
-- reads the view -- the worker, a superuser. None must be found.
CREATE FUNCTION _fraiseql_foreign_dependencies() RETURNS SETOF text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH ext AS (
        SELECT e.oid FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'fraiseql_obs'
    ), ours AS (
        SELECT d.classid, d.objid FROM pg_catalog.pg_depend d, ext
         WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
           AND d.refobjid OPERATOR(pg_catalog.=) ext.oid AND d.deptype OPERATOR(pg_catalog.=) 'e'
    ), our_relations AS (
        SELECT o.objid AS relid FROM ours o WHERE o.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
    ), uses AS (
        -- what the extension's objects, and the parts of its relations, refer to
        SELECT d.refclassid, d.refobjid
          FROM pg_catalog.pg_depend d
         WHERE d.deptype OPERATOR(pg_catalog.=) 'n'
           AND d.refclassid IN ('pg_catalog.pg_proc'::pg_catalog.regclass, 'pg_catalog.pg_operator'::pg_catalog.regclass,
                                'pg_catalog.pg_type'::pg_catalog.regclass)
           AND ((d.classid, d.objid) IN (SELECT o.classid, o.objid FROM ours o)
                OR (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                    AND (SELECT r.ev_class FROM pg_catalog.pg_rewrite r WHERE r.oid OPERATOR(pg_catalog.=) d.objid)
                        IN (SELECT relid FROM our_relations))
                OR (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_attrdef'::pg_catalog.regclass
                    AND (SELECT a.adrelid FROM pg_catalog.pg_attrdef a WHERE a.oid OPERATOR(pg_catalog.=) d.objid)
                        IN (SELECT relid FROM our_relations))
                OR (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_constraint'::pg_catalog.regclass
                    AND (SELECT c.conrelid FROM pg_catalog.pg_constraint c WHERE c.oid OPERATOR(pg_catalog.=) d.objid)
                        IN (SELECT relid FROM our_relations))
                OR (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_trigger'::pg_catalog.regclass
                    AND (SELECT t.tgrelid FROM pg_catalog.pg_trigger t WHERE t.oid OPERATOR(pg_catalog.=) d.objid)
                        IN (SELECT relid FROM our_relations))
                OR (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                    AND (SELECT i.indrelid FROM pg_catalog.pg_index i WHERE i.indexrelid OPERATOR(pg_catalog.=) d.objid)
                        IN (SELECT relid FROM our_relations)))
    )
    SELECT DISTINCT pg_catalog.pg_describe_object(u.refclassid, u.refobjid, 0)
      FROM uses u
     WHERE (u.refclassid, u.refobjid) NOT IN (SELECT o.classid, o.objid FROM ours o)
       AND CASE
           WHEN u.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass THEN
               (SELECT p.pronamespace FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) u.refobjid)
           WHEN u.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_operator'::pg_catalog.regclass THEN
               (SELECT p.oprnamespace FROM pg_catalog.pg_operator p WHERE p.oid OPERATOR(pg_catalog.=) u.refobjid)
           ELSE
               -- a type: PostgreSQL's, or the row type (or its array) of one of our relations
               (SELECT CASE WHEN (CASE WHEN t.typrelid OPERATOR(pg_catalog.<>) 0::pg_catalog.oid
                                       THEN t.typrelid ELSE e.typrelid END) IN (SELECT relid FROM our_relations)
                            THEN 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid
                            WHEN e.oid IN (SELECT o.objid FROM ours o) THEN 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid
                            ELSE coalesce(e.typnamespace, t.typnamespace) END
                  FROM pg_catalog.pg_type t
                  LEFT JOIN pg_catalog.pg_type e ON e.oid OPERATOR(pg_catalog.=) t.typelem
                       AND t.typcategory OPERATOR(pg_catalog.=) 'A'
                 WHERE t.oid OPERATOR(pg_catalog.=) u.refobjid)
           END OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid
     ORDER BY 1
$$;

DO $$
DECLARE
    v_found text;
BEGIN
    SELECT pg_catalog.string_agg(f, ', ') INTO v_found FROM @extschema@._fraiseql_foreign_dependencies() f;
    IF v_found IS NOT NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: not installed: its views would use objects another role created in schema %: %',
            '@extschema@', v_found
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Drop them, or install into a schema only trusted roles can create objects in (CREATE EXTENSION fraiseql_obs SCHEMA ...).';
    END IF;
END
$$;

-- The rows the extension itself needs: the counters' state, the built-in
-- channels, the managed tables. pg_dump carries them (they are marked below),
-- so a restore brings them and they are not made here then; after a restore
-- that did not bring them, _fraiseql_complete_install adds them.
CREATE FUNCTION _fraiseql_install_rows() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO @extschema@.tb_error_fold_state (above)
    SELECT pg_current_xact_id() WHERE NOT EXISTS (SELECT FROM @extschema@.tb_error_fold_state);
    INSERT INTO @extschema@.tb_rollup_state (error_above, span_above)
    SELECT pg_current_xact_id(), pg_current_xact_id() WHERE NOT EXISTS (SELECT FROM @extschema@.tb_rollup_state);
    INSERT INTO @extschema@.tb_notification_channel (channel_type)
    SELECT c FROM unnest(ARRAY['email', 'slack', 'webhook', 'pg_notify']) AS c
    ON CONFLICT (channel_type) DO NOTHING;
    INSERT INTO @extschema@.tb_partition_config (parent_table, granularity, retention_guc, prune_groups) VALUES
        ('@extschema@.tb_error_occurrence'::regclass, 'month', 'fraiseql_obs.error_retention_months', true),
        ('@extschema@.tb_error_notification_log'::regclass, 'month', 'fraiseql_obs.notification_log_retention_months', false),
        ('monitoring.traces'::regclass, 'day', 'fraiseql_obs.trace_retention_days', false),
        ('monitoring.metrics'::regclass, 'day', 'fraiseql_obs.metric_retention_days', false)
    ON CONFLICT (parent_table) DO NOTHING;
END
$$;

-- Whether a restore is in progress (see tb_restore_session). Once the
-- restoring session has gone, ends restore mode and completes the install.
CREATE FUNCTION _fraiseql_complete_install() RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM @extschema@.tb_restore_session) THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT FROM @extschema@.tb_restore_session r
                 JOIN pg_stat_activity a ON a.pid = r.pid AND a.backend_start = r.backend_start) THEN
        RETURN true;
    END IF;
    DELETE FROM @extschema@.tb_restore_session;
    PERFORM @extschema@._fraiseql_install_rows();
    RETURN false;
END
$$;

-- A counters' state restored from a dump of another cluster whose
-- transaction ids are ahead of this one's cannot be read in this cluster's
-- numbering: it starts at the restoring transaction instead (the rows the
-- source had not counted yet, at most a flush interval's worth, are then
-- taken as counted). From this cluster, or one behind it, the state is
-- exact as it is: rows of the source it had not counted are counted once,
-- and this database's own rows all come after it.
CREATE FUNCTION _fraiseql_restored_state() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_xmax xid8 := pg_snapshot_xmax(pg_current_snapshot());
    v_here xid8 := coalesce((SELECT r.xid FROM @extschema@.tb_restore_session r LIMIT 1), pg_current_xact_id());
BEGIN
    IF TG_TABLE_NAME = 'tb_error_fold_state' THEN
        IF NEW.above > v_xmax THEN
            NEW.above := v_here;
            NEW.in_progress := '{}';
        END IF;
    ELSE
        IF NEW.error_above > v_xmax THEN
            NEW.error_above := v_here;
            NEW.error_in_progress := '{}';
        END IF;
        IF NEW.span_above > v_xmax THEN
            NEW.span_above := v_here;
            NEW.span_in_progress := '{}';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER tb_error_fold_state_restored BEFORE INSERT ON tb_error_fold_state
    FOR EACH ROW EXECUTE FUNCTION _fraiseql_restored_state();
CREATE TRIGGER tb_rollup_state_restored BEFORE INSERT ON tb_rollup_state
    FOR EACH ROW EXECUTE FUNCTION _fraiseql_restored_state();

-- The default partitions are the extension's own (pg_dump carries their
-- rows, not their definition): their indexes are made here, restoring or not.
SELECT @extschema@._fraiseql_index_partition(@extschema@._fraiseql_default_partition(p.parent_table), p.parent_table)
  FROM (SELECT DISTINCT i.parent_table FROM tb_partition_index i) p;

-- Partitions for this month and the next ones exist right away (not when
-- restoring: the dump brings them). They are then released from the
-- extension: otherwise DROP TABLE by retention would be refused ("extension
-- requires it"), and they would be missing from pg_dump.
DO $$
DECLARE
    r record;
BEGIN
    IF EXISTS (SELECT FROM @extschema@.tb_restore_session) THEN
        RETURN;
    END IF;
    PERFORM @extschema@._fraiseql_install_rows();
    PERFORM @extschema@.fraiseql_ensure_partitions(c.parent_table,
                CASE c.granularity
                    WHEN 'month' THEN @extschema@.fraiseql_setting('fraiseql_obs.premake_months')::integer
                    ELSE @extschema@.fraiseql_setting('fraiseql_obs.premake_days')::integer END)
       FROM @extschema@.tb_partition_config c;
    FOR r IN SELECT v.partition FROM @extschema@.v_partitions v WHERE NOT v.is_default LOOP
        EXECUTE format('ALTER EXTENSION fraiseql_obs DROP TABLE %s', r.partition);
    END LOOP;
END
$$;

-- The data tables are dumped by pg_dump with the database: everything but
-- tb_maintenance_lock and tb_restore_session. Partitions are not members of
-- the extension (see above) and are dumped like any table; the default
-- partitions are, so their rows are marked here.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_fold_state', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_rollup_state', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_notification_channel', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_notification_queue', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_notification_state', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_notification_digest', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_maintenance_run', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_maintenance_step', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_occurrence_default', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_notification_log_default', '');
SELECT pg_catalog.pg_extension_config_dump('monitoring.traces_default', '');
SELECT pg_catalog.pg_extension_config_dump('monitoring.metrics_default', '');
SELECT pg_catalog.pg_extension_config_dump('monitoring.metrics_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_entity_change_log_change_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_maintenance_run_run_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_metric_series_series_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_log', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_count_pending', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_release', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_merge', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_user', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_notification_crossing', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_unmerge_request', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_ownership_rule', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_ownership_rule_rule_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_tombstone', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_rollup_tombstone', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_recount_request', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_notification_config', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_partition_config', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_metric_definition', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_metric_series', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_metric_stripe', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_entity_change_log', '');
-- the dashboards' rollups summarize the dumped rows: a restored database keeps them
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_rollup_error_minute', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_rollup_error_5min', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_rollup_error_hour', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_rollup_error_day', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_rollup_span_minute', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_rollup_span_5min', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_rollup_operation_hour', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_trace_error', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_project', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_project_project_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_project_key', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_ingest_event', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_otlp_cumulative', '');

-- Privileges: nothing is callable by PUBLIC. An application role needs only
--   GRANT EXECUTE ON FUNCTION fraiseql_capture_error(text, text, text, jsonb, text, text, text, text, text, text, timestamptz, boolean),
--                             fraiseql_capture_message(text, text, jsonb, text, text, text, text, text, timestamptz, boolean),
--                             fraiseql_set_trace_context(text, boolean)
--   TO app_role;
-- (see README, "Privileges").
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS sig
          FROM pg_proc p
          JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass
         WHERE d.refclassid = 'pg_extension'::regclass
           AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'fraiseql_obs')
           AND d.deptype = 'e'
    LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', f.sig);
    END LOOP;
END
$$;

-- Pure functions stay public: they read no data.
GRANT EXECUTE ON FUNCTION @extschema@.fraiseql_fingerprint(text, text, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.fraiseql_error_id(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.fraiseql_release_key(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.fraiseql_parse_stack_trace(text) TO PUBLIC;
-- views (v_error_groups) and panels call them with the reader's rights;
-- they read no data
GRANT EXECUTE ON FUNCTION @extschema@._fraiseql_user_of(jsonb),
                          @extschema@.fraiseql_error_group_ids(uuid),
                          @extschema@._fraiseql_severity_rank(text),
                          @extschema@._fraiseql_severity_name(integer),
                          @extschema@._fraiseql_group_meta(text, text, text)
   TO PUBLIC;
-- with the caller's rights: it needs INSERT and SELECT on tb_ownership_rule
GRANT EXECUTE ON FUNCTION @extschema@.fraiseql_add_ownership_rule(text, text),
                          @extschema@._fraiseql_glob_regex(text)  -- (pure; the rule table's generated column)
   TO PUBLIC;
-- v_notification_rules calls it with the reader's rights
GRANT EXECUTE ON FUNCTION @extschema@._fraiseql_redact(jsonb) TO PUBLIC;
GRANT USAGE ON SCHEMA monitoring TO PUBLIC;
-- The dashboards' panel functions run with the caller's rights (they show
-- what the caller may read), and so do the pure helpers they use.
GRANT EXECUTE ON FUNCTION @extschema@.fraiseql_panel_error_rate(timestamptz, timestamptz, bigint, text[]),
                          @extschema@.fraiseql_panel_errors_by_environment(timestamptz, timestamptz),
                          @extschema@.fraiseql_panel_top_errors(timestamptz, timestamptz, text[], integer),
                          @extschema@.fraiseql_panel_spans(timestamptz, timestamptz, bigint, text[], text),
                          @extschema@.fraiseql_panel_operations(timestamptz, timestamptz, text[]),
                          @extschema@._fraiseql_whole_units(timestamptz, timestamptz, interval, boolean),
                          @extschema@._fraiseql_time_group(timestamptz, bigint),
                          @extschema@._fraiseql_raw_occurrences(timestamptz, timestamptz, timestamptz, timestamptz, xid8, xid8[], text[]),
                          @extschema@._fraiseql_raw_spans(timestamptz, timestamptz, timestamptz, timestamptz, xid8, xid8[], text[]),
                          @extschema@._fraiseql_latency_bucket(double precision),
                          @extschema@._fraiseql_hist_from(integer[], bigint[]),
                          @extschema@._fraiseql_hist_merge(bigint[], bigint[]),
                          @extschema@.fraiseql_hist_quantile(bigint[], double precision),
                          @extschema@.fraiseql_hist_merge_agg(bigint[]),
                          @extschema@._fraiseql_partition_bounds(regclass)  -- v_partitions: reads the catalog
   TO PUBLIC;

-- Serve this database right away once CREATE EXTENSION commits.
SELECT @extschema@._fraiseql_wake_launcher();
