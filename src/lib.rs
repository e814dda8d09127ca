//! fraiseql_obs: error tracking, notifications, traces and metrics inside PostgreSQL.
//!
//! This file only wires modules together. The schema, the partition DDL and the
//! capture path live in `sql/*.sql` (they are naturally SQL); parsing,
//! fingerprinting, validation and the background worker live in Rust.
use pgrx::prelude::*;

mod autonomous;
mod capture;
mod capture_path;
mod change_log;
mod error;
mod extension;
mod fingerprint;
mod guc;
mod http_service;
mod metrics;
mod notify;
mod rollup;
mod rule_condition;
mod run_as;
mod scrub;
mod shmem;
mod spike;
mod sql;
mod sql_errors;
mod sqlstate_table;
mod time_window;
mod timeout;
mod trace_context;
mod traces;
mod worker;

#[cfg(any(test, feature = "pg_test"))]
mod tests;

pgrx::pg_module_magic!();

// The SQL files run after every Rust function exists, in this order.
// Tables first; then every Rust function; then the SQL that uses them, in
// dependency order; `finalize` runs last.
extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/partitions.sql",
    name = "partitions",
    requires = ["schema"]
);
extension_sql_file!(
    "../sql/capture.sql",
    name = "capture",
    requires = [
        "partitions",
        fingerprint::fraiseql_fingerprint_version,
        fingerprint::fraiseql_release_key,
        capture_path::_fraiseql_rules_changed
    ]
);
extension_sql_file!(
    "../sql/maintenance.sql",
    name = "maintenance",
    requires = ["capture", guc::fraiseql_setting]
);
extension_sql_file!(
    "../sql/notification_rules.sql",
    name = "notification_rules",
    requires = [
        "maintenance",
        notify::_fraiseql_wake_worker,
        rule_condition::_fraiseql_condition_problem,
        rule_condition::_fraiseql_rules_deadline
    ]
);
extension_sql_file!(
    "../sql/telemetry.sql",
    name = "telemetry",
    requires = [
        "notification_rules",
        traces::_fraiseql_ingest_otlp_traces,
        metrics::_fraiseql_check_metric
    ]
);
extension_sql_file!(
    "../sql/ingest.sql",
    name = "ingest",
    requires = ["telemetry"]
);
extension_sql_file!(
    "../sql/rollups.sql",
    name = "rollups",
    requires = [
        "ingest",
        rollup::_fraiseql_latency_bucket,
        rollup::_fraiseql_hist_from,
        rollup::_fraiseql_hist_merge,
        rollup::fraiseql_hist_quantile
    ]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::define();
    shmem::init();
    if shmem::available() {
        sql_errors::install();
    }
    worker::register();
    http_service::register();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
