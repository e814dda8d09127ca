"""Traces, metrics and business events: the seed's Correlation, Performance
Analysis and Correlation Analysis examples, and its trace/metric retention
DELETEs, run unmodified on one scenario; the Prometheus export parses."""
import json
import pathlib

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from test_seed_examples import statements

HERE = pathlib.Path(__file__).parent
EXAMPLES = HERE / "seed_telemetry_examples.sql"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def examples():
    import re
    parts = re.split(r"^-- @example (.+)$", EXAMPLES.read_text(), flags=re.M)
    return {parts[i].split(" (seed")[0].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def scenario(conn):
    """12 requests to POST /orders, each a trace with three spans; three of
    them fail. Request 0 (trace TRACE) is the one we follow: inside it an
    error is captured and an order row is changed, and db queries are
    counted while it runs."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
    conn.execute("INSERT INTO orders VALUES (42, 'new')")
    conn.execute("SELECT fraiseql_track_changes('orders', 'order')")
    for i in range(12):
        trace = TRACE if i == 0 else f"{i:032x}"
        root, db, pay = f"{i + 1:016x}", f"{i + 100:016x}", f"{i + 200:016x}"
        failed = i < 3
        with conn.transaction():
            conn.execute("SELECT fraiseql_set_trace_context(%s)", (f"00-{trace}-{root}-01",))
            conn.execute("SELECT fraiseql_record_span(%s, %s, 'POST /orders', now() - interval '1 second', now() + interval '1 second',"
                         " attributes => %s, status_code => %s, span_kind => 'server', service_name => 'orders-api')",
                         (trace, root, json.dumps({"user_id": f"u-{i}"}), 2 if failed else 1))
            conn.execute("SELECT fraiseql_record_span(%s, %s, 'db.query', now() - interval '900 ms', now() - interval '860 ms', %s,"
                         " attributes => %s, span_kind => 'client')",
                         (trace, db, root, json.dumps({"db.system": "postgresql", "db.statement": "SELECT * FROM v_order WHERE id = $1"})))
            conn.execute("SELECT fraiseql_record_span(%s, %s, 'charge card', now() - interval '800 ms', now() + interval '400 ms', %s,"
                         " status_code => %s, span_kind => 'client')", (trace, pay, root, 2 if failed else 1))
            if failed:
                conn.execute("SELECT fraiseql_capture_error('PaymentError', 'Payment gateway timeout', context => %s,"
                             " fingerprint => 'payment_processing_error')", (json.dumps({"order_id": "42", "user_id": f"u-{i}"}),))
            if i == 0:
                conn.execute("SELECT fraiseql_capture_error('OrderError', 'could not confirm order', context => '{\"order_id\": \"42\", \"user_id\": \"u-0\"}',"
                             " fingerprint => 'order_processing_error')")
                conn.execute("UPDATE orders SET status = 'failed' WHERE id = 42")
                for _ in range(3):
                    conn.execute("SELECT fraiseql_metric_increment('db.queries.count')")
    # old data for the retention statements
    # (written directly: fraiseql_record_span refuses times past retention)
    conn.execute("INSERT INTO monitoring.traces (trace_id, span_id, operation_name, start_time, end_time, duration_ms, environment)"
                 " VALUES ('00000000000000000000000000000abc', '0000000000000abc', 'old', now() - interval '45 days',"
                 " now() - interval '45 days', 0, 'production')")
    conn.execute("INSERT INTO monitoring.metrics (metric_name, metric_type, metric_value, \"timestamp\", environment)"
                 " VALUES ('old.metric', 'gauge', 1, now() - interval '10 days', 'production')")


def test_seed_telemetry_examples_answer_right(cluster, db):
    with cluster.connect(db) as conn, cluster.connect(db, autocommit=False) as held:
        # the worker's maintenance (every 2 s here) would move the old rows
        # out of the default partition and drop them with their partition
        # before the retention examples run: its lock is held meanwhile (a
        # worker's run finding it taken skips its turn)
        held.execute("SELECT FROM tb_maintenance_lock FOR UPDATE")
        scenario(conn)
        res = {}
        for name, sql in examples().items():
            for stmt in statements(sql):
                stmt = stmt.replace("'your-trace-id-here'", f"'{TRACE}'")
                try:
                    cur = conn.execute(stmt)
                except psycopg.Error as e:
                    raise AssertionError(f"seed example '{name}' failed: {e}\n{stmt}") from e
                res[name] = cur.fetchall() if cur.description else cur.rowcount

        # errors joined to their trace: 2 errors in TRACE x 3 spans, payment errors in 2 more traces
        rows = res["Correlation: error + trace"]
        assert {r[3] for r in rows} == {"POST /orders", "db.query", "charge card"}
        assert len(rows) == 3 * 3  # fingerprint payment_processing_error: 3 errors x 3 spans
        rows = res["Correlation: error + business event"]
        assert len(rows) == 1 and rows[0][2] == "42" and rows[0][3] == "order" and rows[0][5] == "update"
        assert rows[0][6]["status"] == "new" and rows[0][7]["status"] == "failed"
        rows = res["Correlation: trace + metrics"]
        # spans over 1 s: every root (2 s) and every "charge card" (1.2 s)
        assert len(rows) == 24 and {r[1] for r in rows} == {"POST /orders", "charge card"}
        followed_root = [r for r in rows if r[0] == TRACE and r[1] == "POST /orders"][0]
        assert followed_root[3] == 3 and followed_root[4] == "u-0"  # 3 db queries counted while it ran
        rows = res["Correlation: full"]
        followed = [r for r in rows if r[0] == "order_processing_error"]
        assert {(r[6], r[7]) for r in followed} == {("order", "update")}
        rows = res["Performance: slowest operations"]
        assert {r[0] for r in rows} == {"POST /orders", "db.query", "charge card"}
        slow = {r[0]: r for r in rows}
        assert slow["POST /orders"][1] == 12 and abs(slow["POST /orders"][5] - 2000) < 1
        rows = res["Performance: database queries"]
        assert rows[0][0] == "SELECT * FROM v_order WHERE id = $1" and rows[0][1] == 12
        rows = {r[0]: r for r in res["Correlation analysis: error rate"]}
        assert rows["POST /orders"][1] == 12 and rows["POST /orders"][2] == 4
        rows = res["Correlation analysis: timeline"]
        assert {r[1] for r in rows} == {"POST /orders", "db.query", "charge card"}
        assert {r[4] for r in rows} == {"PaymentError", "OrderError"}
        assert res["Data retention: traces"] == 1
        assert res["Data retention: metrics"] == 1


def test_prometheus_export_parses(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_metric_increment('graphql.requests.total', '{\"operation\": \"getUser\", \"status\": \"success\"}')")
        c.execute("SELECT fraiseql_metric_increment('graphql.requests.total', '{\"operation\": \"get\\\"User\\\\n\", \"status\": \"error\"}', 4)")
        c.execute("SELECT fraiseql_metric_set_gauge('db.pool.connections.active', 7, '{\"pool\": \"primary\"}')")
        c.execute("SELECT fraiseql_metric_define('graphql.request.duration_ms', 'Request duration, ms', '{10, 100, 1000}')")
        for v in (5, 50, 500, 5000):
            c.execute("SELECT fraiseql_metric_record_histogram('graphql.request.duration_ms', %s, '{\"operation\": \"getOrders\"}')", (v,))
        # counters never go backwards when raw rows age out
        c.execute("DELETE FROM monitoring.metrics")
        text = c.execute("SELECT fraiseql_metrics_prometheus()").fetchone()[0]
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    req = fams.get("graphql_requests") or fams["graphql_requests_total"]
    assert req.type == "counter"
    values = {s.labels["operation"]: s.value for s in req.samples if s.name == "graphql_requests_total"}
    assert values == {"getUser": 1, 'get"User\\n': 4}
    assert fams["db_pool_connections_active"].samples[0].value == 7
    hist = fams["graphql_request_duration_ms"]
    assert hist.type == "histogram" and hist.documentation == "Request duration, ms"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets == {"10": 1, "100": 2, "1000": 3, "+Inf": 4}
    total = [s.value for s in hist.samples if s.name.endswith("_sum")]
    assert total == [5555]
