"""Grafana dashboards: structure, and every panel's SQL run (macros expanded
as Grafana's PostgreSQL datasource expands them) on a populated database."""
import datetime
import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
sys.path.insert(0, str(GRAFANA))
import build  # noqa: E402

FILES = ["error_monitoring.json", "error_detail.json", "trace_performance.json", "system_metrics.json"]


def load(name):
    return json.loads((GRAFANA / name).read_text())


expand = build.expand


@pytest.mark.parametrize("name", FILES)
def test_dashboard_json_is_well_formed(name):
    d = load(name)
    assert (GRAFANA / name).read_text() == build.render(build.DASHBOARDS[name]), "run grafana/build.py"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        assert p["datasource"]["uid"] == "fraiseql-obs"
        assert all(t["datasource"]["uid"] == "fraiseql-obs" for t in p["targets"])
    provisioning = (GRAFANA / "provisioning/datasources/fraiseql_obs.yaml").read_text()
    assert "uid: fraiseql-obs" in provisioning
    assert [v["name"] for v in d["templating"]["list"]] == (["error_id"] if name == "error_detail.json" else ["environment"])


def populate(conn):
    conn.execute("SELECT fraiseql_set_trace_context('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', false)")
    for env in ("production", "staging"):
        for i in range(5):
            conn.execute("SELECT fraiseql_capture_error('E' || %s, 'boom', context => %s::jsonb, environment => %s,"
                         " release_version => %s)",
                         (i % 3, json.dumps({"user_id": f"u{i}", "tags": {"customer": f"c{i % 2}"}}), env, f"v1.{i % 2}.0"))
    gid = conn.execute("SELECT error_id FROM v_error_groups WHERE error_type = 'E0'").fetchone()[0]
    conn.execute("SELECT fraiseql_resolve_error(%s)", (gid,))
    conn.execute("SELECT fraiseql_capture_error('E0', 'boom', occurred_at => clock_timestamp() + interval '1 second', environment => 'production')")
    conn.execute("RESET fraiseql_obs.trace_id; RESET fraiseql_obs.span_id")
    conn.execute("""SELECT fraiseql_record_span('4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7', 'POST /orders',
                    now() - interval '2 minutes', now() - interval '2 minutes' + interval '300 ms', status_code => 2, span_kind => 'server')""")
    conn.execute("""SELECT fraiseql_record_span('4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b8', 'db.query',
                    now() - interval '2 minutes', now() - interval '2 minutes' + interval '12 ms', parent_span_id => '00f067aa0ba902b7',
                    attributes => '{"db.system": "postgresql"}', span_kind => 'client')""")
    for name, kind, value, labels in [
        ("db.pool.connections.active", "gauge", 7, {}), ("db.pool.connections.idle", "gauge", 3, {}),
        ("cache.hits", "counter", 90, {}), ("cache.misses", "counter", 10, {}),
        ("graphql.requests.total", "counter", 5, {"operation": "getUser"}),
        ("process.memory.rss_bytes", "gauge", 123456789, {}), ("db.query.duration_ms", "histogram", 12.5, {}),
    ]:
        fn = {"gauge": "fraiseql_metric_set_gauge(%s, %s, %s)", "counter": "fraiseql_metric_increment(%s, %s, %s)",
              "histogram": "fraiseql_metric_record_histogram(%s, %s, %s)"}[kind]
        args = (name, json.dumps(labels), value) if kind == "counter" else (name, value, json.dumps(labels))
        conn.execute(f"SELECT {fn}", args)
    conn.execute("""INSERT INTO tb_error_notification_log (config_id, error_id, channel_type, status)
                    VALUES (gen_random_uuid(), %s, 'slack', 'sent'), (gen_random_uuid(), %s, 'email', 'failed')""", (gid, gid))
    conn.execute("SELECT fraiseql_run_maintenance()")
    conn.execute("SELECT fraiseql_flush_counts()")
    # E1 merged into E2: the issue dashboard is opened with E1's (old) id
    e1, e2 = (conn.execute("SELECT error_id FROM v_error_groups WHERE error_type = %s", (t,)).fetchone()[0] for t in ("E1", "E2"))
    conn.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (e2, e1))
    return e1


def variables(conn, d, error_id):
    """The dashboard's variables as Grafana would fill them: the
    environments, or the issue a link opened."""
    names = [v["name"] for v in d["templating"]["list"]]
    if names == ["error_id"]:
        ids = [r[1] for r in conn.execute(d["templating"]["list"][0]["query"])]
        assert error_id not in ids  # a merged group's id: only a link brings it
        return [], error_id
    envs = [r[0] for r in conn.execute(d["templating"]["list"][0]["query"])]
    assert envs == ["production", "staging"]
    return envs, None


@pytest.mark.parametrize("name", FILES)
def test_every_panel_query_runs_and_returns_what_the_panel_expects(cluster, db, name):
    d = load(name)
    with cluster.connect(db) as conn:
        error_id = populate(conn)
        envs, eid = variables(conn, d, error_id)
        end = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
        start = end - datetime.timedelta(hours=24)
        for p in d["panels"]:
            for t in p["targets"]:
                sql = expand(t["rawSql"], start, end, "1m", envs, eid)
                cur = conn.execute(sql)
                cols = [c.name for c in cur.description]
                rows = cur.fetchall()
                assert rows, f"{p['title']}: no rows on a populated database\n{sql}"
                if t["format"] == "time_series":
                    assert cols[0] == "time", f"{p['title']}: time must come first, got {cols}"
                    assert all(isinstance(r[0], (int, float)) or hasattr(r[0], "year") or r[0].__class__.__name__ == "Decimal" for r in rows)
                if p["type"] == "piechart":
                    assert cols[0] == "metric" and len(cols) == 2, cols
                if p["title"] == "Issue":
                    # E1 and E2, merged, as one issue: 2 + 1 occurrences per environment
                    assert rows[0][0].startswith("E2") and rows[0][5] == 6, rows
                if p["title"] == "Top 10 errors":
                    link = p["fieldConfig"]["overrides"][0]["properties"][0]["value"][0]["url"]
                    assert link.startswith("/d/fraiseql-error-detail/") and "var-error_id=${__data.fields.error_id}" in link
                    assert cols[-1] == "error_id"


README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_a_read_only_grafana_role_sees_every_panel(cluster, db):
    """Grafana connects with a role that may only read: SELECT on the tables
    is all it needs (the panel functions run with its rights)."""
    with cluster.connect(db) as c:
        error_id = populate(c)
        c.execute("DROP ROLE IF EXISTS grafana_reader")
        c.execute("CREATE ROLE grafana_reader LOGIN")
        # exactly the README's grant: no right on rules, channels, queue or log
        grant = re.search(r"(GRANT SELECT ON tb_error_log, tb_error_occurrence[^;]*?TO grafana_reader;)", README, re.S).group(1)
        c.execute(grant)
        for secret in ["tb_error_notification_config", "tb_notification_channel", "tb_notification_queue",
                       "tb_notification_state"]:
            assert not c.execute("SELECT has_table_privilege('grafana_reader', %s, 'SELECT')", (secret,)).fetchone()[0]
    end = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
    start = end - datetime.timedelta(hours=24)
    try:
        with cluster.connect(db, user="grafana_reader") as c:
            for name in FILES:
                d = load(name)
                envs, eid = variables(c, d, error_id)
                for p in d["panels"]:
                    assert c.execute(expand(p["targets"][0]["rawSql"], start, end, "1m", envs, eid)).fetchall(), p["title"]
    finally:
        with cluster.connect(db) as c:
            c.execute("DROP OWNED BY grafana_reader")
            c.execute("DROP ROLE grafana_reader")
