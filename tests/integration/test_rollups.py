"""Dashboard rollups: every panel function returns what the same query over the
raw rows returns, whatever part of the data is rolled up, for ranges that do
not fall on bucket boundaries (percentiles: within the histogram's 9%)."""
import datetime
import random

import pytest

ENVS = ["production", "staging", "dev"]
RANGES = [  # (start offset from now, length, interval)
    (datetime.timedelta(hours=30, seconds=17), datetime.timedelta(hours=26, minutes=3, seconds=5), 600_000),
    (datetime.timedelta(hours=5, seconds=41), datetime.timedelta(hours=4, seconds=3), 60_000),
    (datetime.timedelta(minutes=50, seconds=9), datetime.timedelta(minutes=40), 30_000),  # under a minute: raw only
    (datetime.timedelta(days=4, seconds=1), datetime.timedelta(days=4, seconds=2), 3_600_000),
    (datetime.timedelta(hours=9, seconds=29), datetime.timedelta(hours=3, minutes=7), 120_000),
]


def roll_up(c):
    """One round by hand (again if the worker's round was running)."""
    from conftest import wait_for
    wait_for(lambda: "busy" not in c.execute("SELECT fraiseql_refresh_rollups()").fetchone()[0], what="a roll-up round")


def load_occurrences(c, n, seed, horizon_hours=100):
    rnd = random.Random(seed)
    ids = [tuple(r) for r in c.execute("SELECT error_id, error_fingerprint FROM v_error_groups ORDER BY error_fingerprint")]
    rows = []
    for i in range(n):
        # skewed: a few groups are far more frequent (a clear top 10)
        gid = ids[min(int(rnd.expovariate(0.25)), len(ids) - 1)]
        at = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=rnd.uniform(0, horizon_hours * 3600))
        trace = f"{rnd.randrange(1, 400):032x}" if rnd.random() < 0.3 else None
        rows.append((*gid, at, f"u{rnd.randrange(50)}", rnd.choice(ENVS), trace))
    with c.cursor() as cur:
        cur.executemany(
            "INSERT INTO tb_error_occurrence (error_id, fingerprint, occurred_at, error_type, message, context, environment, trace_id)"
            " VALUES (%s, %s, %s, 'RollupError', 'm', jsonb_build_object('user_id', %s::text), %s, %s)", rows)


def load_spans(c, n, seed, first_trace, horizon_hours=100):
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        trace = f"{first_trace + i // 3:032x}"
        root = i % 3 == 0
        at = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=rnd.uniform(0, horizon_hours * 3600))
        ms = rnd.lognormvariate(3, 1.2)
        rows.append((trace, f"{seed * 1_000_000 + i + 1:016x}", None if root else f"{seed * 1_000_000 + i:016x}",
                     rnd.choice(["POST /orders", "GET /users/{id}"]) if root else "db.query",
                     at, at + datetime.timedelta(milliseconds=ms), ms, rnd.choice([0, 1, 2]),
                     "{}" if root else '{"db.system": "postgresql"}', rnd.choice(ENVS)))
    with c.cursor() as cur:
        cur.executemany(
            "INSERT INTO monitoring.traces (trace_id, span_id, parent_span_id, operation_name, start_time, end_time,"
            " duration_ms, status_code, attributes, environment) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)",
            rows)


@pytest.fixture
def data(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SET fraiseql_obs.trace_retention_days = 30")
        for d in range(0, 6):
            c.execute("SELECT fraiseql_create_partition('monitoring.traces', now() - %s * interval '1 day')", (d,))
        c.execute("SELECT fraiseql_capture_error('RollupError' || g, 'm') FROM generate_series(1, 40) g")
        # spans whose errors arrive in a later round (rolled up first, matched late)
        load_spans(c, 1500, seed=1, first_trace=1)
        roll_up(c)
        load_occurrences(c, 3000, seed=2)
        roll_up(c)
        load_spans(c, 900, seed=3, first_trace=200)
        roll_up(c)
        # and some rows not rolled up yet (the worker may roll some up meanwhile)
        load_occurrences(c, 500, seed=4)
        load_spans(c, 300, seed=5, first_trace=300)
    return db


def ranges():
    now = datetime.datetime.now(datetime.timezone.utc)
    for back, length, interval in RANGES:
        yield now - back, now - back + length, interval


def close(a, b, rel=0.095):
    return a is None and b is None or abs(a / b - 1) <= rel


def test_error_panels_equal_raw(cluster, data):
    with cluster.connect(data) as c:
        assert_error_panels_equal_raw(c)


def test_error_panels_equal_raw_after_deletes(cluster, data):
    """Rows deleted (the seed's retention statement through monitoring.errors,
    and DELETE on the table) are taken back from the rollups and the groups."""
    from conftest import wait_for
    with cluster.connect(data) as c:
        c.execute("DELETE FROM monitoring.errors WHERE environment = 'staging' AND occurred_at < now() - interval '20 hours'")
        c.execute("DELETE FROM tb_error_occurrence WHERE context->>'user_id' IN ('u1', 'u2', 'u3')")
        # exact at once in v_error_groups
        raw = dict(c.execute("SELECT error_id, count(*) FROM tb_error_occurrence GROUP BY 1").fetchall())
        live = dict(c.execute("SELECT error_id, occurrence_count FROM v_error_groups").fetchall())
        assert {k: v for k, v in live.items() if v} == raw
        roll_up(c)
        assert_error_panels_equal_raw(c)

        def folded():
            c.execute("SELECT fraiseql_flush_counts()")
            stored = dict(c.execute("SELECT error_id, occurrence_count FROM tb_error_log").fetchall())
            return {k: v for k, v in stored.items() if v} == raw
        wait_for(folded, what="tb_error_log equal to the remaining rows")


def assert_error_panels_equal_raw(c):
    if True:
        for start, end, interval in ranges():
            for envs in (ENVS, ["staging"]):
                got = c.execute("SELECT * FROM fraiseql_panel_error_rate(%s, %s, %s, %s)", (start, end, interval, envs)).fetchall()
                want = c.execute(
                    "SELECT _fraiseql_time_group(occurred_at, %s), count(*) FROM tb_error_occurrence"
                    " WHERE occurred_at BETWEEN %s AND %s AND environment = ANY (%s) GROUP BY 1 ORDER BY 1",
                    (interval, start, end, envs)).fetchall()
                assert got == want and want, (start, end, interval, envs)
            got = c.execute("SELECT * FROM fraiseql_panel_errors_by_environment(%s, %s) ORDER BY 1", (start, end)).fetchall()
            want = c.execute("SELECT environment, count(*) FROM tb_error_occurrence WHERE occurred_at BETWEEN %s AND %s"
                             " GROUP BY 1 ORDER BY 1", (start, end)).fetchall()
            assert got == want

            top = c.execute("SELECT * FROM fraiseql_panel_top_errors(%s, %s, %s, 10)", (start, end, ENVS)).fetchall()
            exact = {r[0]: r[1:] for r in c.execute(
                "SELECT error_id, count(*), count(DISTINCT context->>'user_id'), max(occurred_at) FROM tb_error_occurrence"
                " WHERE occurred_at BETWEEN %s AND %s GROUP BY 1", (start, end))}
            assert top and all(exact[r[0]] == r[1:] for r in top), "figures are exact for the range"
            assert [r[1] for r in top] == sorted((r[1] for r in top), reverse=True)
            leaders = sorted(exact.items(), key=lambda kv: -kv[1][0])[:3]
            assert {k for k, _ in leaders} <= {r[0] for r in top}


def test_span_panels_equal_raw(cluster, data):
    with cluster.connect(data) as c:
        for start, end, interval in ranges():
            for kind, cond in (("request", "parent_span_id IS NULL"), ("db", "attributes @> '{\"db.system\": \"postgresql\"}'")):
                got = c.execute("SELECT * FROM fraiseql_panel_spans(%s, %s, %s, %s, %s)", (start, end, interval, ENVS, kind)).fetchall()
                want = c.execute(
                    f"SELECT _fraiseql_time_group(start_time, %s), count(*), count(*) FILTER (WHERE status_code = 2),"
                    f" count(*) FILTER (WHERE status_code = 1), avg(duration_ms),"
                    f" percentile_disc(0.5) WITHIN GROUP (ORDER BY duration_ms),"
                    f" percentile_disc(0.95) WITHIN GROUP (ORDER BY duration_ms),"
                    f" percentile_disc(0.99) WITHIN GROUP (ORDER BY duration_ms)"
                    f" FROM monitoring.traces WHERE start_time BETWEEN %s AND %s AND {cond} GROUP BY 1 ORDER BY 1",
                    (interval, start, end)).fetchall()
                assert [r[:4] for r in got] == [r[:4] for r in want] and want, (start, end, interval, kind)
                for g, w in zip(got, want):
                    assert abs(g[4] - w[4]) < 1e-6 * max(1, w[4])
                    assert all(close(x, y) for x, y in zip(g[5:], w[5:])), (g, w)

            got = {r[0]: r[1:] for r in c.execute("SELECT * FROM fraiseql_panel_operations(%s, %s, %s)", (start, end, ENVS))}
            want = {r[0]: r[1:] for r in c.execute(
                "SELECT operation_name, count(*), percentile_disc(0.95) WITHIN GROUP (ORDER BY duration_ms), max(duration_ms),"
                " count(*) FILTER (WHERE parent_span_id IS NULL),"
                " count(*) FILTER (WHERE parent_span_id IS NULL AND EXISTS"
                "   (SELECT 1 FROM tb_error_occurrence o WHERE o.trace_id = t.trace_id))"
                " FROM monitoring.traces t WHERE start_time BETWEEN %s AND %s GROUP BY 1", (start, end))}
            assert got.keys() == want.keys() and want
            for op, (spans, p95, mx, requests, failed) in want.items():
                g = got[op]
                assert (g[0], g[3], g[4]) == (spans, requests, failed), op
                assert abs(g[2] - mx) < 1e-9 and close(g[1], p95), (op, g, want[op])


def test_rollups_are_kept_by_the_worker_and_pruned(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_capture_error('WorkerRollup', 'm')")
        from conftest import wait_for
        wait_for(lambda: c.execute("SELECT coalesce(sum(occurrences), 0) FROM tb_rollup_error_minute").fetchone()[0] == 1,
                 what="the worker rolls the capture up")
        c.execute("INSERT INTO tb_rollup_error_minute VALUES ('2001-01-01', 'production', 5)")
        c.execute("INSERT INTO tb_trace_error VALUES (repeat('a', 32), '2001-01-01')")
        c.execute("SELECT fraiseql_run_maintenance()")
        assert c.execute("SELECT count(*) FROM tb_rollup_error_minute WHERE bucket < '2002-01-01'").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM tb_trace_error").fetchone()[0] == 0


def test_panel_functions_check_their_arguments(cluster, db):
    import psycopg
    with cluster.connect(db) as c:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="kind"):
            c.execute("SELECT * FROM fraiseql_panel_spans(now() - interval '1 hour', now(), 60000, NULL, 'bogus')")
