//! In-database tests (`cargo pgrx test`): each runs in a transaction that is
//! rolled back. Worker behaviour is tested against a real cluster in tests/.
use pgrx::prelude::*;

fn one<T: pgrx::IntoDatum + pgrx::FromDatum>(sql: &str) -> T {
    Spi::get_one::<T>(sql)
        .expect("query failed")
        .expect("NULL result")
}

fn run(sql: &str) {
    Spi::run(sql).expect("statement failed");
}

/// Runs `sql` in a subtransaction and returns its error message (or panics if
/// it succeeded), so a test can check the error and go on.
fn error_of(sql: &str) -> String {
    let escaped = sql.replace('\'', "''");
    let r: Option<String> =
        Spi::get_one(&format!("SELECT pg_temp._t_error_of('{escaped}')")).expect("helper failed");
    r.unwrap_or_else(|| panic!("expected an error from: {sql}"))
}

fn setup_helpers() {
    run(r#"
        CREATE OR REPLACE FUNCTION pg_temp._t_error_of(q text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
            EXECUTE q;
            RETURN NULL;
        EXCEPTION WHEN OTHERS THEN
            RETURN SQLERRM;
        END $$;
    "#);
}

#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn partitions_exist_after_create_extension() {
        let n: i64 = one(
            "SELECT count(*) FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass AND NOT is_default",
        );
        assert!(n >= 4, "current month + 3 ahead, got {n}");
        let cur: bool = one(
            "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'tb_error_occurrence_' || to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM'))",
        );
        assert!(cur);
        let log: i64 = one(
            "SELECT count(*) FROM v_partitions WHERE parent_table = 'tb_error_notification_log'::regclass AND NOT is_default",
        );
        assert!(log >= 4);
    }

    /// The C entry points read their arguments by the names the SQL
    /// declaration gives (sql/capture.sql), not by position: declared in
    /// another order they still read the right values, and a name the
    /// library does not know is an error, not a value read from elsewhere.
    #[pg_test]
    fn capture_entry_points_read_arguments_by_name() {
        setup_helpers();
        run("CREATE FUNCTION public._t_reordered_capture(message text, severity text, exception_type text, occurred_at timestamptz DEFAULT now()) RETURNS uuid
             LANGUAGE c AS '$libdir/fraiseql_obs', 'fraiseql_capture_error_c'");
        let id: pgrx::Uuid =
            one("SELECT public._t_reordered_capture('order 7 failed', 'warning', 'OrderError')");
        let want: pgrx::Uuid = one(
            "SELECT fraiseql_error_id(fraiseql_fingerprint('OrderError', 'order 7 failed', NULL))",
        );
        assert_eq!(id, want);
        let (t, sev): (Option<String>, Option<String>) = Spi::get_two(
            "SELECT error_type, severity FROM tb_error_occurrence WHERE message = 'order 7 failed'",
        )
        .unwrap();
        assert_eq!(
            (t.as_deref(), sev.as_deref()),
            (Some("OrderError"), Some("warning"))
        );
        run(
            "CREATE FUNCTION public._t_unknown_capture(kind text, message text) RETURNS uuid
             LANGUAGE c AS '$libdir/fraiseql_obs', 'fraiseql_capture_error_c'",
        );
        let e = error_of("SELECT public._t_unknown_capture('x', 'y')");
        assert!(e.contains("parameter \"kind\" is unknown"), "{e}");
    }

    /// Without shared_preload_libraries there is no shared queue: an
    /// autonomous capture is stored in the caller's transaction (with a
    /// WARNING), not dropped.
    #[pg_test]
    fn autonomous_capture_without_preload_is_stored_in_the_transaction() {
        let id: pgrx::Uuid =
            one("SELECT fraiseql_capture_error('NoPreload', 'stored here', autonomous => true)");
        let n: i64 = one(&format!(
            "SELECT count(*) FROM tb_error_occurrence WHERE error_type = 'NoPreload' AND error_id = '{id}'"
        ));
        assert_eq!(n, 1);
        let cap: i64 = one("SELECT capacity_bytes FROM fraiseql_autonomous_stats()");
        assert_eq!(cap, 0, "no queue without the preload");
    }

    /// Without shared_preload_libraries the hook is not installed, but the
    /// settings exist and check their lists (so ALTER DATABASE ... SET
    /// works before the server is restarted with the preload).
    #[pg_test]
    fn sql_error_settings_exist_and_check_their_lists() {
        setup_helpers();
        Spi::run("SET fraiseql_obs.capture_sql_errors = on").unwrap();
        Spi::run("SET fraiseql_obs.capture_sql_errors_exclude = '22012, 23'").unwrap();
        let e = error_of("SET fraiseql_obs.capture_sql_errors_include = 'not_a_condition'");
        assert!(e.contains("capture_sql_errors_include"), "{e}");
        let level: String = one("SELECT fraiseql_setting('fraiseql_obs.capture_sql_errors_min_level')");
        assert_eq!(level, "error");
    }

    /// Scrubbing happens in the capture call: the stored row never holds
    /// the secret; a clean context is stored as given.
    #[pg_test]
    fn captures_are_scrubbed_before_they_are_stored() {
        let ctx = r#"{"user_id": "u-1", "Password": "hunter2", "h": {"X-Auth-Token": "t0k"}, "n": "card 4111-1111-1111-1111"}"#;
        Spi::run(&format!(
            "SELECT fraiseql_capture_error('ScrubError', 'pan 4111111111111111', 'at pay(4111 1111 1111 1111)', '{ctx}')"
        ))
        .unwrap();
        let row: String = one(
            "SELECT concat_ws('|', message, stack_trace, context::text) FROM tb_error_occurrence WHERE error_type = 'ScrubError'",
        );
        assert_eq!(
            row,
            r#"pan [Filtered]|at pay([Filtered])|{"h": {"X-Auth-Token": "[Filtered]"}, "n": "card [Filtered]", "user_id": "u-1", "Password": "[Filtered]"}"#
        );
        Spi::run("SELECT fraiseql_capture_error('CleanError', 'order 4111111111111112', NULL, '{\"tok\": 1, \"path\": \"/x\"}')").unwrap();
        let clean: String = one("SELECT concat_ws('|', message, context::text) FROM tb_error_occurrence WHERE error_type = 'CleanError'");
        assert_eq!(clean, r#"order 4111111111111112|{"tok": 1, "path": "/x"}"#);
    }

    /// Affected users: distinct context.user_id (or user.id), exact (here
    /// before the fold: tests/integration/test_capture.py after it).
    #[pg_test]
    fn users_affected_counts_distinct_users() {
        for ctx in [r#"{"user_id": "u1"}"#, r#"{"user_id": "u2"}"#, r#"{"user_id": "u1"}"#,
                    r#"{"user": {"id": "u3"}}"#, r#"{}"#] {
            Spi::run(&format!("SELECT fraiseql_capture_error('UsersError', 'm', NULL, '{ctx}')")).unwrap();
        }
        let q = "SELECT users_affected FROM v_error_groups WHERE error_type = 'UsersError'";
        assert_eq!(one::<i64>(q), 3);
        assert_eq!(one::<i64>("SELECT occurrence_count FROM v_error_groups WHERE error_type = 'UsersError'"), 5);
    }

    #[pg_test]
    fn capture_groups_and_counts() {
        let a: pgrx::Uuid = one("SELECT fraiseql_capture_error('NotFound', 'User 1234 not found')");
        let b: pgrx::Uuid =
            one("SELECT fraiseql_capture_error('NotFound', 'User 98765 not found')");
        let c: pgrx::Uuid = one("SELECT fraiseql_capture_error('KeyError', 'User 1234 not found')");
        assert_eq!(a, b);
        assert_ne!(a, c);
        let live: i64 = one(&format!(
            "SELECT occurrence_count FROM v_error_groups WHERE error_id = '{a}'"
        ));
        assert_eq!(live, 2);
        // A fold counts only finished transactions (this test runs in one
        // that is still open); whatever it does, the live count stays exact.
        run("SELECT fraiseql_flush_counts()");
        let live: i64 = one(&format!(
            "SELECT occurrence_count FROM v_error_groups WHERE error_id = '{a}'"
        ));
        assert_eq!(live, 2);
        let occ: i64 = one("SELECT count(*) FROM tb_error_occurrence");
        assert_eq!(occ, 3);
        let env: String = one(&format!(
            "SELECT environment FROM v_error_groups WHERE error_id = '{a}'"
        ));
        assert_eq!(env, "production");
    }

    #[pg_test]
    fn messages_group_by_content() {
        let a: pgrx::Uuid = one("SELECT fraiseql_capture_message('cache rebuilt in 120ms')");
        let b: pgrx::Uuid = one("SELECT fraiseql_capture_message('cache rebuilt in 80ms')");
        let c: pgrx::Uuid = one("SELECT fraiseql_capture_message('disk almost full')");
        assert_eq!(a, b);
        assert_ne!(a, c);
        let sev: String = one(&format!(
            "SELECT severity FROM v_error_groups WHERE error_id = '{c}'"
        ));
        assert_eq!(sev, "info");
    }

    #[pg_test]
    fn custom_fingerprints() {
        let a: pgrx::Uuid = one(
            "SELECT fraiseql_capture_error('E', 'one', fingerprint => 'payment_processing_error')",
        );
        let b: pgrx::Uuid = one("SELECT fraiseql_capture_error('Other', 'two', fingerprint => 'payment_processing_error')");
        assert_eq!(a, b);
        let fp: String = one(&format!(
            "SELECT error_fingerprint FROM v_error_groups WHERE error_id = '{a}'"
        ));
        assert_eq!(fp, "payment_processing_error");
        let c: pgrx::Uuid = one(
            r#"SELECT fraiseql_capture_error('E', 'x', context => '{"fingerprint": ["{{ default }}", "tenant-a"]}')"#,
        );
        let d: pgrx::Uuid = one(
            r#"SELECT fraiseql_capture_error('E', 'x', context => '{"fingerprint": ["{{ default }}", "tenant-b"]}')"#,
        );
        let e: pgrx::Uuid = one("SELECT fraiseql_capture_error('E', 'x')");
        assert_ne!(c, d);
        assert_ne!(c, e);
    }

    #[pg_test]
    fn triage_of_a_group_not_committed_yet_is_refused_clearly() {
        // The group of a new fingerprint is made by the fold, from committed
        // captures; in the capturing transaction it exists only in
        // v_error_groups. (Resolution, regression and the rest of the
        // workflow: tests/integration/test_capture_model.py.)
        let id: pgrx::Uuid = one("SELECT fraiseql_capture_error('E', 'boom')");
        let live: String = one(&format!(
            "SELECT status FROM v_error_groups WHERE error_id = '{id}'"
        ));
        assert_eq!(live, "unresolved");
        setup_helpers();
        let e = error_of(&format!(
            "SELECT fraiseql_resolve_error('{id}', 'alice', 'fixed')"
        ));
        assert!(e.contains("this transaction"), "{e}");
        let e = error_of(
            "SELECT fraiseql_resolve_error('00000000-0000-0000-0000-000000000001', 'alice')",
        );
        assert!(e.contains("no error group"), "{e}");
    }

    #[pg_test]
    fn bad_input_is_refused_clearly() {
        setup_helpers();
        let cases = [
            ("SELECT fraiseql_capture_error(NULL, 'm')", "exception_type"),
            ("SELECT fraiseql_capture_error('', 'm')", "exception_type"),
            ("SELECT fraiseql_capture_error('E', NULL)", "message"),
            ("SELECT fraiseql_capture_error('E', '  ')", "message"),
            ("SELECT fraiseql_capture_error('E', 'm', context => '[1,2]')", "context"),
            ("SELECT fraiseql_capture_error('E', 'm', severity => 'fatal')", "severity"),
            ("SELECT fraiseql_capture_error('E', 'm', trace_id => 'abc')", "trace_id"),
            ("SELECT fraiseql_capture_error('E', 'm', trace_id => '00000000000000000000000000000000')", "trace_id"),
            ("SELECT fraiseql_capture_error('E', 'm', span_id => 'zzzzzzzzzzzzzzzz')", "span_id"),
            ("SELECT fraiseql_set_trace_context('00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01')", "traceparent"),
            ("SELECT fraiseql_set_trace_context('hello')", "traceparent"),
            ("SELECT fraiseql_resolve_error('00000000-0000-0000-0000-000000000001')", "no error group"),
        ];
        for (sql, needle) in cases {
            let e = error_of(sql);
            assert!(e.contains(needle), "{sql}: expected '{needle}' in: {e}");
        }
        let n: i64 = one("SELECT count(*) FROM tb_error_occurrence");
        assert_eq!(n, 0, "nothing half-written");
        let g: i64 = one("SELECT count(*) FROM tb_error_log");
        assert_eq!(g, 0);
    }

    #[pg_test]
    fn trace_context_is_carried() {
        run("SELECT fraiseql_set_trace_context('00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01')");
        run("SELECT fraiseql_capture_error('E', 'in a trace')");
        let t: String = one("SELECT trace_id FROM tb_error_occurrence");
        let s: String = one("SELECT span_id FROM tb_error_occurrence");
        assert_eq!(t, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s, "00f067aa0ba902b7");
        // an explicit argument wins
        run("SELECT fraiseql_capture_error('E2', 'x', trace_id => 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA')");
        let t2: String = one("SELECT trace_id FROM tb_error_occurrence WHERE error_type = 'E2'");
        assert_eq!(t2, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
    }

    #[pg_test]
    fn oversized_input_is_truncated_with_marker() {
        run("SET fraiseql_obs.max_stack_trace_bytes = 4096");
        run("SET fraiseql_obs.max_context_bytes = 1024");
        run(
            "SELECT fraiseql_capture_error('E', repeat('m', 100000), repeat('frame\n', 1000000), \
             jsonb_build_object('small', 1, 'big', repeat('x', 1000000)))",
        );
        let st: i32 = one("SELECT octet_length(stack_trace) FROM tb_error_occurrence");
        assert!(st <= 4096, "{st}");
        let marker: bool =
            one("SELECT stack_trace LIKE '%bytes truncated%' FROM tb_error_occurrence");
        assert!(marker);
        let msg: i32 = one("SELECT octet_length(message) FROM tb_error_occurrence");
        assert!(msg <= 8192);
        let ctx: bool = one("SELECT context ? '_fraiseql_truncated' AND context->>'small' = '1' FROM tb_error_occurrence");
        assert!(ctx);
    }

    #[pg_test]
    fn capture_into_month_without_partition_is_kept_and_moved() {
        // a month whose partition is missing: the row lands in the default partition
        let name: String = one(
            "SELECT to_char((now() + interval '3 months') AT TIME ZONE 'UTC', '\"tb_error_occurrence_\"YYYY_MM')",
        );
        run(&format!("DROP TABLE {name}"));
        run("SELECT fraiseql_capture_error('E', 'later', occurred_at => now() + interval '3 months')");
        let d: i64 = one("SELECT count(*) FROM tb_error_occurrence_default");
        assert_eq!(d, 1);
        let moved: i64 = one("SELECT fraiseql_move_default_rows('tb_error_occurrence')");
        assert_eq!(moved, 1);
        let d: i64 = one("SELECT count(*) FROM tb_error_occurrence_default");
        assert_eq!(d, 0);
        let p: i64 = one(&format!("SELECT count(*) FROM {name}"));
        assert_eq!(p, 1);
        // a row past retention written straight into the default partition
        // goes with retention instead of creating a partition for 2020
        run("INSERT INTO tb_error_occurrence_default (error_id, occurred_at, error_type, message, severity, environment) \
             SELECT error_id, '2020-03-15', 'E', 'old', 'error', 'p' FROM tb_error_log LIMIT 1");
        let moved: i64 = one("SELECT fraiseql_move_default_rows('tb_error_occurrence')");
        assert_eq!(moved, 0);
        let d: i64 = one("SELECT count(*) FROM tb_error_occurrence_default");
        assert_eq!(d, 0);
    }

    #[pg_test]
    fn partitions_use_utc_whatever_the_time_zone() {
        run("SET TimeZone = 'Pacific/Kiritimati'"); // UTC+14
        let name: String = one("SELECT create_error_occurrence_partition('2031-01-01'::date)");
        assert_eq!(name, "tb_error_occurrence_2031_01");
        run("SET TimeZone = 'UTC'");
        let lo: String = one("SELECT lower_bound::text FROM v_partitions WHERE partition_name = 'tb_error_occurrence_2031_01'");
        assert_eq!(lo, "2031-01-01 00:00:00+00");
        // idempotent
        let again: String = one("SELECT create_error_occurrence_partition('2031-01-20'::date)");
        assert_eq!(again, "tb_error_occurrence_2031_01");
    }

    #[pg_test]
    fn retention_drops_old_partitions_in_any_schema() {
        run("SELECT create_error_occurrence_partition('2020-01-10')");
        run("SELECT fraiseql_capture_error('E', 'x')");
        run("INSERT INTO tb_error_occurrence (error_id, fingerprint, occurred_at, error_type, message, severity, environment) \
             SELECT error_id, fingerprint, '2020-01-10', 'E', 'x', 'error', 'p' FROM tb_error_occurrence LIMIT 1");
        let dropped: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT partition_name FROM drop_old_error_occurrence_partitions(6)",
                None,
                &[],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        });
        assert!(
            dropped.contains(&"tb_error_occurrence_2020_01".to_string()),
            "{dropped:?}"
        );
        let cur: bool = one(
            "SELECT EXISTS (SELECT 1 FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass AND now() >= lower_bound AND now() < upper_bound)",
        );
        assert!(cur, "the partition holding now() is never dropped");
        // 0 keeps everything
        let none: i64 = one("SELECT count(*) FROM drop_old_notification_log_partitions(0)");
        assert_eq!(none, 0);
    }

    #[pg_test]
    fn maintenance_run_is_recorded() {
        // an old group whose only occurrence is in a partition past retention
        // (written directly: capture refuses times past retention)
        run("SELECT create_error_occurrence_partition('2019-05-05')");
        run("WITH g AS (INSERT INTO tb_error_log (error_fingerprint, error_type, error_message, environment, \
                        occurrence_count, first_seen, last_seen) \
                 VALUES ('old-fp', 'E', 'x', 'p', 1, '2019-05-05', '2019-05-05') RETURNING error_id, error_fingerprint) \
             INSERT INTO tb_error_occurrence (error_id, fingerprint, occurred_at, error_type, message, severity, environment) \
             SELECT error_id, error_fingerprint, '2019-05-05', 'E', 'x', 'error', 'p' FROM g");
        let r: pgrx::JsonB = one("SELECT fraiseql_run_maintenance()");
        let v = r.0;
        assert_eq!(v["error"], serde_json::Value::Null, "{v}");
        assert!(
            v["dropped"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d == "tb_error_occurrence_2019_05"),
            "{v}"
        );
        assert_eq!(v["groups_removed"], 1, "{v}");
        let runs: i64 = one("SELECT count(*) FROM v_maintenance_runs WHERE last_error IS NULL");
        assert!(runs >= 1);
    }

    #[pg_test]
    fn seed_delete_on_monitoring_errors() {
        run("SELECT fraiseql_capture_error('E', 'recent')");
        run("SELECT fraiseql_capture_error('E', 'ancient')");
        run("INSERT INTO tb_error_occurrence (error_id, fingerprint, occurred_at, error_type, message, severity, environment) \
             SELECT error_id, fingerprint, now() - interval '200 days', 'E', 'ancient', 'error', 'p' \
               FROM tb_error_occurrence WHERE message = 'ancient'");
        run("DELETE FROM monitoring.errors WHERE occurred_at < NOW() - INTERVAL '90 days'");
        // the two recent captures stay, the ancient row is gone
        let n: i64 = one("SELECT count(*) FROM monitoring.errors");
        assert_eq!(n, 2);
        let old: i64 = one(
            "SELECT count(*) FROM monitoring.errors WHERE occurred_at < now() - interval '90 days'",
        );
        assert_eq!(old, 0);
    }

    #[pg_test]
    fn parse_stack_trace_reports_frames() {
        let v: pgrx::JsonB = one(
            "SELECT fraiseql_parse_stack_trace(E'Traceback (most recent call last):\\n  File \"/app/api/views.py\", line 3, in create_order\\nValueError: x')",
        );
        assert_eq!(v.0["language"], "python");
        assert_eq!(v.0["frames"][0]["function"], "create_order");
        assert_eq!(v.0["culprit"], "views in create_order");
    }

    // ---- traces, metrics, business events ----

    const SDK_EXPORT: &str = include_str!("../tests/otel/sdk_export.json");

    #[pg_test]
    fn official_sdk_payload_ingests() {
        let escaped = SDK_EXPORT.replace('\'', "''");
        let r: pgrx::JsonB = one(&format!(
            "SELECT fraiseql_ingest_otlp_traces('{escaped}'::jsonb)"
        ));
        assert_eq!(r.0["stored"], 3, "{}", r.0);
        assert_eq!(r.0["rejected"], 0);
        let (svc, env): (String, String) = (
            one("SELECT DISTINCT service_name FROM monitoring.traces"),
            one("SELECT DISTINCT environment FROM monitoring.traces"),
        );
        assert_eq!((svc.as_str(), env.as_str()), ("orders-api", "staging"));
        let root: String =
            one("SELECT span_kind FROM monitoring.traces WHERE operation_name = 'POST /orders'");
        assert_eq!(root, "server");
        let db: pgrx::JsonB =
            one("SELECT attributes FROM monitoring.traces WHERE operation_name = 'db.query'");
        assert_eq!(db.0["db.system"], "postgresql");
        assert_eq!(db.0["db.rows_returned"], 3);
        assert_eq!(db.0["tags"], serde_json::json!(["a", "b"]));
        let err: (i32, String) = (
            one("SELECT status_code FROM monitoring.traces WHERE operation_name = 'charge card'"),
            one(
                "SELECT status_message FROM monitoring.traces WHERE operation_name = 'charge card'",
            ),
        );
        assert_eq!(err, (2, "gateway timeout".to_string()));
        let children: i64 = one(
            "SELECT count(*) FROM monitoring.traces c JOIN monitoring.traces p ON c.parent_span_id = p.span_id AND c.trace_id = p.trace_id",
        );
        assert_eq!(children, 2);
        let links: i64 = one("SELECT jsonb_array_length(links) FROM monitoring.traces WHERE operation_name = 'charge card'");
        assert_eq!(links, 1);
        // a retry of the same export stores nothing twice
        let again: pgrx::JsonB = one(&format!(
            "SELECT fraiseql_ingest_otlp_traces('{escaped}'::jsonb)"
        ));
        assert_eq!(again.0["stored"], 0);
        assert_eq!(again.0["duplicates"], 3);
    }

    #[pg_test]
    fn malformed_spans_are_rejected_one_by_one() {
        setup_helpers();
        // a recent span (times past retention are rejected as well)
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let sql = r#"SELECT fraiseql_ingest_otlp_traces('{"resourceSpans":[{"scopeSpans":[{"spans":[
            {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"ok","startTimeUnixNano":"START","endTimeUnixNano":"END"},
            {"traceId":"nothex","spanId":"eee19b7ec3c1b175","name":"bad id","startTimeUnixNano":"1","endTimeUnixNano":"2"},
            {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b176","name":"backwards","startTimeUnixNano":"9","endTimeUnixNano":"2"},
            {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b177","name":"kind","kind":9,"startTimeUnixNano":"1","endTimeUnixNano":"2"}
        ]}]}]}')"#
            .replace("START", &now_ns.to_string())
            .replace("END", &(now_ns + 1_000_000).to_string());
        let r: pgrx::JsonB = one(&sql);
        assert_eq!(r.0["stored"], 1, "{}", r.0);
        assert_eq!(r.0["partialSuccess"]["rejectedSpans"], 3);
        let msg = r.0["partialSuccess"]["errorMessage"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("traceId") && msg.contains("before") && msg.contains("kind"),
            "{msg}"
        );
        for (sql, needle) in [
            ("SELECT fraiseql_ingest_otlp_traces('[1,2]')", "payload"),
            ("SELECT fraiseql_ingest_otlp_traces('{\"resourceSpans\": 5}')", "resourceSpans"),
            ("SELECT fraiseql_record_span('abc', '00f067aa0ba902b7', 'x', now(), now())", "trace_id"),
            ("SELECT fraiseql_record_span('4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7', 'x', now(), now() - interval '1 s')", "end_time"),
            ("SELECT fraiseql_record_span('4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7', 'x', now(), now(), span_kind => 'sideways')", "span_kind"),
            ("SELECT fraiseql_metric_increment('m', '{}', 'NaN')", "finite"),
            ("SELECT fraiseql_metric_increment('m', '{}', -1)", "negative"),
            ("SELECT fraiseql_metric_set_gauge('m', 1, '{\"a\": {\"b\": 1}}')", "flat"),
            ("SELECT fraiseql_metric_set_gauge('m', 1, '[1]')", "labels"),
        ] {
            let e = error_of(sql);
            assert!(e.contains(needle), "{sql}: expected '{needle}' in: {e}");
        }
        let n: i64 = one("SELECT count(*) FROM monitoring.traces");
        assert_eq!(n, 1, "nothing half-written");
        let m: i64 = one("SELECT count(*) FROM monitoring.metrics");
        assert_eq!(m, 0);
    }

    #[pg_test]
    fn record_span_from_sql() {
        let stored: bool = one(
            "SELECT fraiseql_record_span('4BF92F3577B34DA6A3CE929D0E0E4736', '00F067AA0BA902B7', 'checkout', \
             '2026-11-24 10:00:00+00', '2026-11-24 10:00:00.2505+00', attributes => '{\"user_id\": \"u-1\"}', span_kind => 'server')",
        );
        assert!(stored);
        let (d, t): (f64, String) = (
            one("SELECT duration_ms FROM monitoring.traces"),
            one("SELECT trace_id FROM monitoring.traces"),
        );
        assert!((d - 250.5).abs() < 1e-9, "{d}");
        assert_eq!(t, "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[pg_test]
    fn metrics_and_prometheus() {
        run("SELECT fraiseql_metric_increment('graphql.requests.total', '{\"operation\": \"getUser\", \"status\": \"success\"}')");
        run("SELECT fraiseql_metric_increment('graphql.requests.total', '{\"operation\": \"getUser\", \"status\": \"success\"}', 2)");
        run("SELECT fraiseql_metric_set_gauge('db.pool.connections.active', 7, '{\"pool\": \"primary\"}')");
        run("SELECT fraiseql_metric_set_gauge('db.pool.connections.active', 5, '{\"pool\": \"primary\"}')");
        run("SELECT fraiseql_metric_define('graphql.request.duration_ms', 'GraphQL request duration', '{10, 100, 1000}')");
        for v in [5, 50, 500, 5000] {
            run(&format!("SELECT fraiseql_metric_record_histogram('graphql.request.duration_ms', {v}, '{{\"operation\": \"getOrders\"}}')"));
        }
        let text: String = one("SELECT fraiseql_metrics_prometheus()");
        assert!(
            text.contains("# TYPE graphql_requests_total counter"),
            "{text}"
        );
        assert!(text.contains("graphql_requests_total{environment=\"production\",operation=\"getUser\",status=\"success\"} 3"), "{text}");
        assert!(
            text.contains(
                "db_pool_connections_active{environment=\"production\",pool=\"primary\"} 5"
            ),
            "{text}"
        );
        assert!(
            text.contains("# HELP graphql_request_duration_ms GraphQL request duration"),
            "{text}"
        );
        assert!(text.contains("le=\"100\"} 2"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 4"), "{text}");
        assert!(text.contains("graphql_request_duration_ms_sum{environment=\"production\",operation=\"getOrders\"} 5555"), "{text}");
        let raw: i64 = one("SELECT count(*) FROM monitoring.metrics");
        assert_eq!(raw, 8);
        // counters survive the loss of their raw rows (retention)
        run("DELETE FROM monitoring.metrics");
        let text: String = one("SELECT fraiseql_metrics_prometheus()");
        assert!(text.contains("status=\"success\"} 3"), "{text}");
        setup_helpers();
        let e = error_of("SELECT fraiseql_metric_set_gauge('graphql.requests.total', 1, '{\"operation\": \"getUser\", \"status\": \"success\"}')");
        assert!(e.contains("is a counter"), "{e}");
    }

    #[pg_test]
    fn changes_are_tracked_with_the_trace() {
        run("CREATE TABLE orders (id int PRIMARY KEY, status text)");
        run("SELECT fraiseql_track_changes('orders', 'order')");
        run("SELECT fraiseql_set_trace_context('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')");
        run("INSERT INTO orders VALUES (42, 'new')");
        run("UPDATE orders SET status = 'paid' WHERE id = 42");
        run("UPDATE orders SET status = 'paid' WHERE id = 42"); // no change: not recorded
        run("DELETE FROM orders WHERE id = 42");
        let types: String =
            one("SELECT string_agg(change_type, ',' ORDER BY change_id) FROM tb_entity_change_log");
        assert_eq!(types, "insert,update,delete");
        let (id, before, after, trace): (String, String, String, String) = (
            one("SELECT DISTINCT entity_id FROM tb_entity_change_log"),
            one("SELECT before_data->>'status' FROM tb_entity_change_log WHERE change_type = 'update'"),
            one("SELECT after_data->>'status' FROM tb_entity_change_log WHERE change_type = 'update'"),
            one("SELECT DISTINCT trace_id FROM tb_entity_change_log"),
        );
        assert_eq!(
            (id.as_str(), before.as_str(), after.as_str()),
            ("42", "new", "paid")
        );
        assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        let name: String = one("SELECT DISTINCT entity_name FROM tb_entity_change_log");
        assert_eq!(name, "order");
    }

    #[pg_test]
    fn daily_partitions_for_traces_and_metrics() {
        let t: i64 = one("SELECT count(*) FROM v_partitions WHERE parent_table = 'monitoring.traces'::regclass AND NOT is_default");
        let m: i64 = one("SELECT count(*) FROM v_partitions WHERE parent_table = 'monitoring.metrics'::regclass AND NOT is_default");
        assert!(t >= 8 && m >= 8, "{t} {m}");
        // written directly: fraiseql_record_span refuses times past retention
        run("INSERT INTO monitoring.traces (trace_id, span_id, operation_name, start_time, end_time, duration_ms, environment) \
             VALUES ('4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7', 'old', now() - interval '40 days', \
                     now() - interval '40 days', 0, 'p')");
        let r: pgrx::JsonB = one("SELECT fraiseql_run_maintenance()");
        assert_eq!(r.0["error"], serde_json::Value::Null, "{}", r.0);
        let left: i64 = one("SELECT count(*) FROM monitoring.traces");
        assert_eq!(left, 0, "30 days of retention: {}", r.0);
    }

    /// Names that differ only in characters Prometheus does not allow make
    /// one series, not two (promtool refuses a scrape with duplicates).
    #[pg_test]
    fn prometheus_names_that_sanitize_alike_are_one_series() {
        run("SELECT fraiseql_metric_increment('http.requests', '{\"code\": \"200\"}', 2)");
        run("SELECT fraiseql_metric_increment('http_requests', '{\"code\": \"200\"}', 3)");
        run("SELECT fraiseql_metric_increment('http_requests', '{\"code\": \"500\"}', 1)");
        run("SELECT fraiseql_metric_set_gauge('queue.depth', 4)");
        run("SELECT fraiseql_metric_set_gauge('queue_depth', 9)");
        let text: String = one("SELECT fraiseql_metrics_prometheus()");
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        let mut keys: Vec<&str> = samples.iter().map(|l| l.rsplit_once(' ').unwrap().0).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "duplicate series in:\n{text}");
        assert!(text.contains("http_requests_total{code=\"200\",environment=\"production\"} 5"), "{text}");
        assert_eq!(text.matches("# TYPE queue_depth gauge").count(), 1, "{text}");
    }
}
