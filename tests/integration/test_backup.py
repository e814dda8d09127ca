"""Backups (#12): pg_dump of a database with the extension, restored into a
fresh database in custom and plain format, loses nothing and says nothing:
rules, custom channels, channel defaults, occurrences in regular and
default partitions, spans, metrics, the change log, the counts."""
import subprocess

import pytest

from conftest import BIN, wait_for
from test_worker import worker_pid

# What must come back, table by table (ordered, so the two sides compare).
SNAPSHOT = {
    "rules": "SELECT config_id, channel_type, channel_config, enabled, rate_limit_minutes, notify_on_occurrence "
             "FROM tb_error_notification_config ORDER BY config_id",
    "channels": "SELECT channel_type, handler::text, default_config FROM tb_notification_channel ORDER BY 1",
    "partition_config": "SELECT parent_table::text, granularity, retention_guc FROM tb_partition_config ORDER BY 1",
    "groups": "SELECT error_id, error_fingerprint, status, severity, occurrence_count, occurrences_not_stored "
              "FROM v_error_groups ORDER BY error_id",
    "occurrences": "SELECT occurrence_id, error_id, occurred_at, message, context, tableoid::regclass::text "
                   "FROM tb_error_occurrence ORDER BY occurrence_id",
    "notification_log": "SELECT notification_id, status, delivery_id, channel_type, sent_at FROM tb_error_notification_log ORDER BY 1",
    "spans": "SELECT trace_id, span_id, operation_name, attributes FROM monitoring.traces ORDER BY 1, 2",
    "metrics": "SELECT id, metric_name, metric_value, labels FROM monitoring.metrics ORDER BY id",
    "series": "SELECT metric_name, labels, environment FROM tb_metric_series ORDER BY 1, 2, 3",
    "prometheus": "SELECT fraiseql_metrics_prometheus()",
    "change_log": "SELECT change_id, entity_name, entity_id, change_type, after_data FROM tb_entity_change_log ORDER BY 1",
    "maintenance_runs": "SELECT count(*) > 0 FROM tb_maintenance_run",
    "error_rate_panel": "SELECT * FROM fraiseql_panel_error_rate(now() - interval '1 day', now() + interval '1 day', 3600000)",
}


def snapshot(c):
    return {k: c.execute(q).fetchall() for k, q in SNAPSHOT.items()}


def partitions(c):
    return {r[0] for r in c.execute("SELECT partition_name FROM v_partitions")}


def populate(c):
    c.execute("""CREATE FUNCTION public.team_channel(error jsonb, config jsonb, OUT success boolean, OUT error_message text)
                 LANGUAGE plpgsql AS $$ BEGIN success := true; END $$""")
    c.execute("SELECT fraiseql_register_channel('team', 'public.team_channel(jsonb, jsonb)'::regprocedure, '{\"room\": \"ops\"}')")
    c.execute("SELECT fraiseql_set_channel_defaults('webhook', '{\"headers\": {\"X-Team\": \"obs\"}}')")
    for sql in [
        "INSERT INTO tb_error_notification_config (channel_type, channel_config) VALUES ('team', '{}')",
        "INSERT INTO tb_error_notification_config (channel_type, channel_config, notify_on_occurrence) "
        "VALUES ('pg_notify', '{}', '{1,10}')",
        "INSERT INTO tb_error_notification_config (channel_type, channel_config, rate_limit_minutes, enabled) "
        "VALUES ('webhook', '{\"url\": \"http://127.0.0.1:9/hook\"}', 30, false)",
    ]:
        c.execute(sql)
    for i in range(30):
        c.execute("SELECT fraiseql_capture_error(%s, %s, context => %s)", (f"E{i % 3}", f"m{i % 3}", '{"user_id": 7}'))
    # rows outside the partitions, waiting in the default partition
    c.execute("INSERT INTO tb_error_occurrence_default (error_id, fingerprint, occurred_at, error_type, message, severity, environment) "
              "SELECT DISTINCT ON (error_id) error_id, fingerprint, now() + interval '5 years', 'E0', 'far', 'error', 'production' "
              "FROM tb_error_occurrence ORDER BY error_id LIMIT 2")
    c.execute("SELECT fraiseql_record_span('0af7651916cd43dd8448eb211c80319c', 'b7ad6b7169203331', 'GET /', now(), now())")
    c.execute("""SELECT fraiseql_ingest_otlp_traces(jsonb_build_object('resourceSpans', jsonb_build_array(jsonb_build_object(
                 'scopeSpans', jsonb_build_array(jsonb_build_object('spans', jsonb_build_array(jsonb_build_object(
                   'traceId', '5b8efff798038103d269b633813fc60c', 'spanId', 'eee19b7ec3c1b174', 'name', 'db',
                   'startTimeUnixNano', (extract(epoch FROM now()) * 1e9)::bigint::text,
                   'endTimeUnixNano', (extract(epoch FROM now()) * 1e9)::bigint::text))))))))""")
    c.execute("SELECT fraiseql_metric_increment('graphql.requests.total', '{\"operation\": \"getUser\"}')")
    c.execute("SELECT fraiseql_metric_set_gauge('db.pool.connections.active', 4)")
    c.execute("CREATE TABLE public.orders (id integer PRIMARY KEY, total numeric)")
    c.execute("SELECT fraiseql_track_changes('public.orders')")
    c.execute("INSERT INTO public.orders VALUES (1, 10), (2, 20)")
    c.execute("UPDATE public.orders SET total = 11 WHERE id = 1")


def restore(cluster, fmt, dump, name):
    with cluster.connect() as c:
        c.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    conn = ["-h", str(cluster.path), "-p", str(cluster.port), "-U", "postgres", "-d", name]
    if fmt == "custom":
        cmd = [f"{BIN}/pg_restore", "--exit-on-error", *conn, dump]
    else:
        cmd = [f"{BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *conn, "-f", dump]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr[-3000:]


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_dump_and_restore_lose_nothing(cluster, db, fmt, tmp_path):
    with cluster.connect(db) as c:
        populate(c)
        # quiet: everything folded, every notification (milestones come with the fold) delivered
        wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 32
                 and c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0
                 and c.execute("SELECT count(*) FROM tb_error_notification_log WHERE channel_type = 'pg_notify'").fetchone()[0] >= 2,
                 what="folds and deliveries")
        before = snapshot(c)
        source_partitions = partitions(c)
        team_sent = c.execute("SELECT count(*) FROM tb_error_notification_log WHERE channel_type = 'team'").fetchone()[0]
    assert len(before["rules"]) == 3 and len(before["occurrences"]) == 32 and len(before["spans"]) == 2
    assert sum(g[4] for g in before["groups"]) == 32
    dump = str(tmp_path / f"dump.{fmt}")
    r = subprocess.run([f"{BIN}/pg_dump", "-h", str(cluster.path), "-p", str(cluster.port), "-U", "postgres",
                        "-F", "c" if fmt == "custom" else "p", "-f", dump, db], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with cluster.connect(db) as c:
        assert snapshot(c) == before  # nothing moved while the dump was taken
    target = f"{db}_restored_{fmt}"
    try:
        restore(cluster, fmt, dump, target)
        wait_for(lambda: worker_pid(cluster, target), what="the restored database served")
        with cluster.connect(target) as c:
            wait_for(lambda: c.execute("SELECT count(*) FROM tb_restore_session").fetchone()[0] == 0,
                     what="restore mode ended")
            after = snapshot(c)
            for k in SNAPSHOT:
                assert after[k] == before[k], k
            assert source_partitions <= partitions(c)
            # counts stay exact once the restored database folds, and grow by its own captures only
            c.execute("SELECT fraiseql_flush_counts()")
            assert c.execute("SELECT sum(occurrence_count) FROM v_error_groups").fetchone()[0] == 32
            c.execute("SELECT fraiseql_capture_error('E0', 'm0')")
            wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 33,
                     what="the restored database's fold")
            # its rules deliver (the custom channel's handler came back with them)
            wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_notification_log WHERE channel_type = 'team' "
                                       "AND status = 'sent'").fetchone()[0] > team_sent,
                     what="delivery from the restored database")
            # and maintenance runs cleanly there
            r = c.execute("SELECT fraiseql_run_maintenance()").fetchone()[0]
            assert r["error"] is None and not r.get("busy"), r
    finally:
        with cluster.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {target} WITH (FORCE)")
