//! In-database tests (`cargo pgrx test`): each runs in a transaction that is
//! rolled back. Worker behaviour is tested against a real cluster in tests/.
use pgrx::prelude::*;

fn one<T: pgrx::IntoDatum + pgrx::FromDatum>(sql: &str) -> T {
    Spi::get_one::<T>(sql).expect("query failed").expect("NULL result")
}

fn run(sql: &str) {
    Spi::run(sql).expect("statement failed");
}

/// Runs `sql` in a subtransaction and returns its error message (or panics if
/// it succeeded), so a test can check the error and go on.
fn error_of(sql: &str) -> String {
    let escaped = sql.replace('\'', "''");
    let r: Option<String> = Spi::get_one(&format!(
        "SELECT pg_temp._t_error_of('{escaped}')"
    ))
    .expect("helper failed");
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

    #[pg_test]
    fn capture_groups_and_counts() {
        let a: pgrx::Uuid = one("SELECT fraiseql_capture_error('NotFound', 'User 1234 not found')");
        let b: pgrx::Uuid = one("SELECT fraiseql_capture_error('NotFound', 'User 98765 not found')");
        let c: pgrx::Uuid = one("SELECT fraiseql_capture_error('KeyError', 'User 1234 not found')");
        assert_eq!(a, b);
        assert_ne!(a, c);
        let live: i64 = one(&format!("SELECT occurrence_count FROM v_error_groups WHERE error_id = '{a}'"));
        assert_eq!(live, 2);
        run("SELECT fraiseql_flush_counts()");
        let folded: i64 = one(&format!("SELECT occurrence_count FROM tb_error_log WHERE error_id = '{a}'"));
        assert_eq!(folded, 2);
        let occ: i64 = one("SELECT count(*) FROM tb_error_occurrence");
        assert_eq!(occ, 3);
        let env: String = one(&format!("SELECT environment FROM tb_error_log WHERE error_id = '{a}'"));
        assert_eq!(env, "production");
    }

    #[pg_test]
    fn messages_group_by_content() {
        let a: pgrx::Uuid = one("SELECT fraiseql_capture_message('cache rebuilt in 120ms')");
        let b: pgrx::Uuid = one("SELECT fraiseql_capture_message('cache rebuilt in 80ms')");
        let c: pgrx::Uuid = one("SELECT fraiseql_capture_message('disk almost full')");
        assert_eq!(a, b);
        assert_ne!(a, c);
        let sev: String = one(&format!("SELECT severity FROM tb_error_log WHERE error_id = '{c}'"));
        assert_eq!(sev, "info");
    }

    #[pg_test]
    fn custom_fingerprints() {
        let a: pgrx::Uuid = one("SELECT fraiseql_capture_error('E', 'one', fingerprint => 'payment_processing_error')");
        let b: pgrx::Uuid = one("SELECT fraiseql_capture_error('Other', 'two', fingerprint => 'payment_processing_error')");
        assert_eq!(a, b);
        let fp: String = one(&format!("SELECT error_fingerprint FROM tb_error_log WHERE error_id = '{a}'"));
        assert_eq!(fp, "payment_processing_error");
        let c: pgrx::Uuid = one(r#"SELECT fraiseql_capture_error('E', 'x', context => '{"fingerprint": ["{{ default }}", "tenant-a"]}')"#);
        let d: pgrx::Uuid = one(r#"SELECT fraiseql_capture_error('E', 'x', context => '{"fingerprint": ["{{ default }}", "tenant-b"]}')"#);
        let e: pgrx::Uuid = one("SELECT fraiseql_capture_error('E', 'x')");
        assert_ne!(c, d);
        assert_ne!(c, e);
    }

    #[pg_test]
    fn regression_reopens_resolved_group() {
        let id: pgrx::Uuid = one("SELECT fraiseql_capture_error('E', 'boom')");
        run(&format!("SELECT fraiseql_resolve_error('{id}', 'alice', 'fixed in v2')"));
        let st: String = one(&format!("SELECT status FROM tb_error_log WHERE error_id = '{id}'"));
        assert_eq!(st, "resolved");
        // an occurrence dated before the resolution does not reopen it
        run("SELECT fraiseql_capture_error('E', 'boom', occurred_at => now() - interval '1 hour')");
        let st: String = one(&format!("SELECT status FROM tb_error_log WHERE error_id = '{id}'"));
        assert_eq!(st, "resolved");
        run("SELECT fraiseql_capture_error('E', 'boom', occurred_at => clock_timestamp() + interval '1 second')");
        let (st, reg, cnt): (String, bool, i32) = (
            one(&format!("SELECT status FROM tb_error_log WHERE error_id = '{id}'")),
            one(&format!("SELECT is_regression FROM tb_error_log WHERE error_id = '{id}'")),
            one(&format!("SELECT regression_count FROM tb_error_log WHERE error_id = '{id}'")),
        );
        assert_eq!((st.as_str(), reg, cnt), ("unresolved", true, 1));
        // ignored groups stay ignored but keep counting
        run(&format!("SELECT fraiseql_ignore_error('{id}')"));
        run("SELECT fraiseql_capture_error('E', 'boom')");
        let st: String = one(&format!("SELECT status FROM tb_error_log WHERE error_id = '{id}'"));
        assert_eq!(st, "ignored");
        let n: i64 = one(&format!("SELECT occurrence_count FROM v_error_groups WHERE error_id = '{id}'"));
        assert_eq!(n, 4);
        run(&format!("SELECT fraiseql_assign_error('{id}', 'bob')"));
        run(&format!("SELECT fraiseql_unresolve_error('{id}')"));
        let (st, who): (String, String) = (
            one(&format!("SELECT status FROM tb_error_log WHERE error_id = '{id}'")),
            one(&format!("SELECT assigned_to FROM tb_error_log WHERE error_id = '{id}'")),
        );
        assert_eq!((st.as_str(), who.as_str()), ("unresolved", "bob"));
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
        run("SELECT fraiseql_capture_error('E', repeat('m', 100000), repeat('frame\n', 1000000), \
             jsonb_build_object('small', 1, 'big', repeat('x', 1000000)))");
        let st: i32 = one("SELECT octet_length(stack_trace) FROM tb_error_occurrence");
        assert!(st <= 4096, "{st}");
        let marker: bool = one("SELECT stack_trace LIKE '%bytes truncated%' FROM tb_error_occurrence");
        assert!(marker);
        let msg: i32 = one("SELECT octet_length(message) FROM tb_error_occurrence");
        assert!(msg <= 8192);
        let ctx: bool = one("SELECT context ? '_fraiseql_truncated' AND context->>'small' = '1' FROM tb_error_occurrence");
        assert!(ctx);
    }

    #[pg_test]
    fn capture_into_month_without_partition_is_kept_and_moved() {
        // far in the past: no partition exists, the row lands in the default partition
        run("SELECT fraiseql_capture_error('E', 'old', occurred_at => '2020-03-15 12:00:00+00')");
        let d: i64 = one("SELECT count(*) FROM tb_error_occurrence_default");
        assert_eq!(d, 1);
        let moved: i64 = one("SELECT fraiseql_move_default_rows('tb_error_occurrence')");
        assert_eq!(moved, 1);
        let d: i64 = one("SELECT count(*) FROM tb_error_occurrence_default");
        assert_eq!(d, 0);
        let p: i64 = one("SELECT count(*) FROM tb_error_occurrence_2020_03");
        assert_eq!(p, 1);
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
        run("SELECT fraiseql_capture_error('E', 'x', occurred_at => '2020-01-10')");
        let dropped: Vec<String> = Spi::connect(|c| {
            c.select("SELECT partition_name FROM drop_old_error_occurrence_partitions(6)", None, &[])
                .unwrap()
                .map(|r| r.get::<String>(1).unwrap().unwrap())
                .collect()
        });
        assert!(dropped.contains(&"tb_error_occurrence_2020_01".to_string()), "{dropped:?}");
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
        run("SELECT fraiseql_capture_error('E', 'x', occurred_at => '2019-05-05')");
        let r: pgrx::JsonB = one("SELECT fraiseql_run_maintenance()");
        let v = r.0;
        assert_eq!(v["moved_rows"], 1, "{v}");
        assert!(v["dropped"].as_array().unwrap().iter().any(|d| d == "tb_error_occurrence_2019_05"), "{v}");
        assert_eq!(v["groups_removed"], 1, "{v}");
        let runs: i64 = one("SELECT count(*) FROM v_maintenance_runs WHERE last_error IS NULL");
        assert!(runs >= 1);
    }

    #[pg_test]
    fn seed_delete_on_monitoring_errors() {
        run("SELECT fraiseql_capture_error('E', 'recent')");
        run("SELECT fraiseql_capture_error('E', 'ancient', occurred_at => now() - interval '200 days')");
        run("DELETE FROM monitoring.errors WHERE occurred_at < NOW() - INTERVAL '90 days'");
        let n: i64 = one("SELECT count(*) FROM monitoring.errors");
        assert_eq!(n, 1);
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
}

#[cfg(test)]
mod unit {
    // pure-Rust tests live next to their code (fingerprint, capture, ...)
}
