-- fraiseql_obs: last step of CREATE EXTENSION.

INSERT INTO tb_partition_config (parent_table, granularity, retention_guc, prune_groups) VALUES
    ('@extschema@.tb_error_occurrence'::regclass, 'month', 'fraiseql_obs.error_retention_months', true),
    ('@extschema@.tb_error_notification_log'::regclass, 'month', 'fraiseql_obs.notification_log_retention_months', false),
    ('monitoring.traces'::regclass, 'day', 'fraiseql_obs.trace_retention_days', false),
    ('monitoring.metrics'::regclass, 'day', 'fraiseql_obs.metric_retention_days', false);

-- Partitions for this month and the next ones exist right away. They are then
-- released from the extension: otherwise DROP TABLE by retention would be
-- refused ("extension requires it"), and they would be missing from pg_dump.
DO $$
DECLARE
    r record;
BEGIN
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

-- The data tables are dumped by pg_dump with the database.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_log', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.tb_error_count_pending', '');
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

-- Privileges: nothing is callable by PUBLIC. An application role needs only
--   GRANT EXECUTE ON FUNCTION fraiseql_capture_error(text, text, text, jsonb, text, text, text, text, text, text, timestamptz),
--                             fraiseql_capture_message(text, text, jsonb, text, text, text, text, text, timestamptz),
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
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
    END LOOP;
END
$$;

-- Pure functions stay public: they read no data.
GRANT EXECUTE ON FUNCTION @extschema@.fraiseql_fingerprint(text, text, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.fraiseql_parse_stack_trace(text) TO PUBLIC;
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
