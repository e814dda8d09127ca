"""Builds the Grafana dashboards (grafana/*.json) from the panel specs below.

Run: python3 grafana/build.py   (the JSON files are committed; CI checks they
are up to date and that every panel's SQL runs on the extension's tables).

Every panel uses the PostgreSQL datasource by uid (see
provisioning/datasources/fraiseql_obs.yaml), Grafana's SQL macros so the time
picker works, and the $environment variable filled from the data.
"""
import json
import pathlib
import re

HERE = pathlib.Path(__file__).parent
DS = {"type": "grafana-postgresql-datasource", "uid": "fraiseql-obs"}

ENV_VAR = {
    "name": "environment",
    "label": "Environment",
    "type": "query",
    "datasource": DS,
    # the distinct environments, without scanning the big tables
    "query": "SELECT environment FROM v_environments ORDER BY 1",
    "definition": "SELECT environment FROM v_environments ORDER BY 1",
    "refresh": 2,
    "multi": True,
    "includeAll": True,
    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
}


def target(sql, fmt="time_series"):
    return {"refId": "A", "datasource": DS, "format": fmt, "rawQuery": True, "editorMode": "code", "rawSql": sql.strip()}


def panel(title, kind, sql, w=12, h=8, fmt=None, unit=None, description=None):
    fmt = fmt or ("time_series" if kind == "timeseries" else "table")
    p = {"title": title, "type": kind, "datasource": DS, "targets": [target(sql, fmt)],
         "gridPos": {"w": w, "h": h}, "fieldConfig": {"defaults": {}, "overrides": []}, "options": {}}
    if unit:
        p["fieldConfig"]["defaults"]["unit"] = unit
    if description:
        p["description"] = description
    if kind == "piechart":
        p["options"] = {"reduceOptions": {"values": True, "calcs": ["lastNotNull"], "fields": ""}, "pieType": "donut"}
    return p


DETAIL_UID = "fraiseql-error-detail"


def issue_link(p):
    """The title links to the issue drill-down (error_id column hidden)."""
    p["fieldConfig"]["overrides"] = [
        {"matcher": {"id": "byName", "options": "title"},
         "properties": [{"id": "links", "value": [{
             "title": "Issue details",
             "url": f"/d/{DETAIL_UID}/issue?var-error_id=${{__data.fields.error_id}}&${{__url_time_range}}"}]}]},
        {"matcher": {"id": "byName", "options": "error_id"},
         "properties": [{"id": "custom.hidden", "value": True}]},
    ]
    return p


ERRORS = [
    panel("Error rate", "timeseries", """
SELECT "time", errors
  FROM fraiseql_panel_error_rate($__timeFrom(), $__timeTo(), $__interval_ms, ARRAY[$environment])""", w=24, unit="short"),
    issue_link(panel("Top 10 errors", "table", """
SELECT g.title, g.culprit, t.occurrences, t.users_affected, t.last_seen, g.status, g.error_fingerprint AS fingerprint,
       t.error_id
  FROM fraiseql_panel_top_errors($__timeFrom(), $__timeTo(), ARRAY[$environment], 10) t
  JOIN tb_error_log g ON g.error_id = t.error_id
 ORDER BY t.occurrences DESC""", w=16, h=9, description="click a title for the issue's details")),
    panel("Errors by environment", "piechart", """
SELECT environment AS metric, errors
  FROM fraiseql_panel_errors_by_environment($__timeFrom(), $__timeTo())""", w=8, h=9),
    panel("Recent errors", "table", """
SELECT o.occurred_at AS "time", o.error_type, left(o.message, 200) AS message, o.environment,
       o.severity, g.status, o.trace_id, g.error_fingerprint AS fingerprint
  FROM tb_error_occurrence o
  JOIN tb_error_log g ON g.error_id = o.error_id
 WHERE $__timeFilter(o.occurred_at) AND o.environment IN ($environment)
 ORDER BY o.occurred_at DESC LIMIT 100""", w=24, h=10),
    panel("Resolution status", "piechart", """
SELECT status AS metric, count(*) AS groups
  FROM tb_error_log
 WHERE last_seen >= $__timeFrom() AND environment IN ($environment)
 GROUP BY status ORDER BY status""", w=8),
    panel("Regressions", "table", """
SELECT regressed_at AS "time", title, culprit, regression_count, status, assigned_to
  FROM tb_error_log
 WHERE is_regression AND regressed_at BETWEEN $__timeFrom() AND $__timeTo() AND environment IN ($environment)
 ORDER BY regressed_at DESC LIMIT 50""", w=16),
]

# One issue (the group $error_id leads to: a merged fingerprint's id leads
# to its target). Everything through the occurrences' (error_id, occurred_at)
# index; only what the dashboard role reads (README's grant).
GROUP_IDS = "fraiseql_error_group_ids('$error_id')"
ISSUE = [
    panel("Issue", "table", """
SELECT title, culprit, status, substatus, assigned_to, occurrence_count, users_affected,
       first_seen, last_seen, release_version, regressed_in_release, error_fingerprint AS fingerprint
  FROM v_error_groups
 WHERE error_id = ANY (fraiseql_error_group_ids('$error_id'))""",
          w=24, h=4),
    panel("Occurrences", "timeseries", f"""
SELECT $__timeGroupAlias(occurred_at, $__interval), count(*) AS occurrences
  FROM tb_error_occurrence
 WHERE error_id = ANY ({GROUP_IDS}) AND $__timeFilter(occurred_at)
 GROUP BY 1 ORDER BY 1""", w=16, h=8, unit="short"),
    panel("Releases", "piechart", f"""
SELECT coalesce(release_version, '(none)') AS metric, count(*) AS occurrences
  FROM tb_error_occurrence
 WHERE error_id = ANY ({GROUP_IDS}) AND $__timeFilter(occurred_at)
 GROUP BY 1 ORDER BY 2 DESC LIMIT 20""", w=8, h=8),
    panel("Latest occurrence", "table", f"""
SELECT occurred_at AS "time", message, environment, release_version, severity,
       _fraiseql_user_of(context) AS "user", trace_id, context::text AS context
  FROM tb_error_occurrence
 WHERE error_id = ANY ({GROUP_IDS})
 ORDER BY occurred_at DESC LIMIT 1""", w=24, h=4),
    panel("Stack trace (latest occurrence)", "table", f"""
SELECT coalesce(o.stack_trace, g.stack_trace, '(none)') AS stack_trace
  FROM (SELECT stack_trace FROM tb_error_occurrence
         WHERE error_id = ANY ({GROUP_IDS}) ORDER BY occurred_at DESC LIMIT 1) o
  FULL JOIN (SELECT stack_trace FROM tb_error_log
              WHERE error_id = ANY ({GROUP_IDS})) g ON true""", w=24, h=12),
    panel("Tags", "table", f"""
SELECT t.key AS tag, t.value, count(*) AS occurrences
  FROM tb_error_occurrence o,
       LATERAL (SELECT 'environment', o.environment UNION ALL SELECT 'severity', o.severity
                UNION ALL SELECT k, v FROM jsonb_each_text(CASE WHEN jsonb_typeof(o.context->'tags') = 'object'
                                                               THEN o.context->'tags' END) AS x(k, v)) t(key, value)
 WHERE o.error_id = ANY ({GROUP_IDS}) AND $__timeFilter(o.occurred_at)
 GROUP BY 1, 2 ORDER BY 1, 3 DESC LIMIT 100""", w=12, h=9),
    panel("Affected users", "table", f"""
SELECT _fraiseql_user_of(context) AS "user", count(*) AS occurrences, max(occurred_at) AS last_seen
  FROM tb_error_occurrence
 WHERE error_id = ANY ({GROUP_IDS}) AND $__timeFilter(occurred_at) AND _fraiseql_user_of(context) IS NOT NULL
 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 100""", w=12, h=9,
          description="context.user_id, or user.id of a Sentry event"),
]
ISSUE[4]["fieldConfig"]["defaults"]["custom"] = {"cellOptions": {"type": "auto", "wrapText": True}}

ERROR_VAR = {
    "name": "error_id",
    "label": "Issue",
    "type": "query",
    "datasource": DS,
    # the recent groups; a link may bring any other error_id
    "query": "SELECT title AS __text, error_id AS __value FROM tb_error_log ORDER BY last_seen DESC LIMIT 200",
    "definition": "SELECT title AS __text, error_id AS __value FROM tb_error_log ORDER BY last_seen DESC LIMIT 200",
    "refresh": 2,
    "multi": False,
    "includeAll": False,
    "allowCustomValue": True,
}

# Requests are the root spans (no parent).
TRACES = [
    panel("Request rate", "timeseries", """
SELECT "time", spans * 1000.0 / $__interval_ms AS "requests/s"
  FROM fraiseql_panel_spans($__timeFrom(), $__timeTo(), $__interval_ms, ARRAY[$environment], 'request')""", unit="reqps"),
    panel("Latency P50 / P95 / P99", "timeseries", """
SELECT "time", p50_ms AS p50, p95_ms AS p95, p99_ms AS p99
  FROM fraiseql_panel_spans($__timeFrom(), $__timeTo(), $__interval_ms, ARRAY[$environment], 'request')""",
          unit="ms", description="root spans; percentiles from log-scale histograms (within 9%)"),
    panel("Slowest operations", "table", """
SELECT operation_name, spans AS requests, round(p95_ms::numeric, 1) AS p95_ms, round(max_ms::numeric, 1) AS max_ms
  FROM fraiseql_panel_operations($__timeFrom(), $__timeTo(), ARRAY[$environment])
 ORDER BY p95_ms DESC NULLS LAST LIMIT 20""", w=16, h=9),
    panel("Trace status", "piechart", """
SELECT s.metric, sum(s.n)::bigint AS spans
  FROM fraiseql_panel_spans($__timeFrom(), $__timeTo(), 86400000, ARRAY[$environment], 'request') p,
       LATERAL (VALUES ('error', p.errors), ('ok', p.oks), ('unset', p.spans - p.errors - p.oks)) s(metric, n)
 GROUP BY 1 HAVING sum(s.n) > 0 ORDER BY 1""", w=8, h=9),
    panel("Database query duration", "timeseries", """
SELECT "time", avg_ms, p95_ms
  FROM fraiseql_panel_spans($__timeFrom(), $__timeTo(), $__interval_ms, ARRAY[$environment], 'db')""",
          unit="ms", description='spans with attributes {"db.system": "postgresql"}'),
    panel("Error rate by operation", "table", """
SELECT operation_name, requests, requests_with_errors AS with_errors,
       round(100.0 * requests_with_errors / requests, 2) AS error_rate_pct
  FROM fraiseql_panel_operations($__timeFrom(), $__timeTo(), ARRAY[$environment])
 WHERE requests > 0
 ORDER BY error_rate_pct DESC, requests DESC LIMIT 20""", w=12,
          description="root spans whose trace has an error occurrence"),
]

SYSTEM = [
    panel("Database pool connections", "timeseries", """
SELECT $__timeGroupAlias("timestamp", $__interval), replace(metric_name, 'db.pool.connections.', '') AS metric,
       avg(metric_value) AS connections
  FROM monitoring.metrics
 WHERE $__timeFilter("timestamp") AND metric_name IN ('db.pool.connections.active', 'db.pool.connections.idle')
   AND environment IN ($environment)
 GROUP BY 1, 2 ORDER BY 1""", description="gauges db.pool.connections.active and db.pool.connections.idle"),
    panel("Cache hit rate", "timeseries", """
SELECT $__timeGroupAlias("timestamp", $__interval),
       sum(metric_value) FILTER (WHERE metric_name = 'cache.hits')
         / nullif(sum(metric_value) FILTER (WHERE metric_name IN ('cache.hits', 'cache.misses')), 0) AS hit_rate
  FROM monitoring.metrics
 WHERE $__timeFilter("timestamp") AND metric_name IN ('cache.hits', 'cache.misses') AND environment IN ($environment)
 GROUP BY 1 ORDER BY 1""", unit="percentunit", description="counters cache.hits and cache.misses"),
    panel("GraphQL operation rate", "timeseries", """
SELECT $__timeGroupAlias("timestamp", $__interval), coalesce(labels->>'operation', '?') AS metric,
       sum(metric_value) * 1000.0 / $__interval_ms AS "ops/s"
  FROM monitoring.metrics
 WHERE $__timeFilter("timestamp") AND metric_name = 'graphql.requests.total' AND environment IN ($environment)
 GROUP BY 1, 2 ORDER BY 1""", unit="ops", description="counter graphql.requests.total, by its operation label"),
    panel("Memory usage", "timeseries", """
SELECT $__timeGroupAlias("timestamp", $__interval), avg(metric_value) AS rss
  FROM monitoring.metrics
 WHERE $__timeFilter("timestamp") AND metric_name = 'process.memory.rss_bytes' AND environment IN ($environment)
 GROUP BY 1 ORDER BY 1""", unit="bytes", description="gauge process.memory.rss_bytes"),
    panel("Query execution time", "timeseries", """
SELECT $__timeGroupAlias("timestamp", $__interval), avg(metric_value) AS avg_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY metric_value) AS p95_ms
  FROM monitoring.metrics
 WHERE $__timeFilter("timestamp") AND metric_name = 'db.query.duration_ms' AND environment IN ($environment)
 GROUP BY 1 ORDER BY 1""", unit="ms", description="histogram db.query.duration_ms"),
    panel("Notification deliveries", "timeseries", """
SELECT $__timeGroupAlias(sent_at, $__interval), status AS metric, count(*) AS deliveries
  FROM tb_error_notification_log
 WHERE $__timeFilter(sent_at)
 GROUP BY 1, 2 ORDER BY 1"""),
    panel("Last maintenance runs", "table", """
SELECT started_at AS "time", triggered_by, round(duration_ms::numeric, 1) AS duration_ms,
       cardinality(created) AS created, cardinality(dropped) AS dropped, moved_rows, last_error
  FROM v_maintenance_runs LIMIT 20""", w=12, h=9),
    panel("Partition sizes", "table", """
SELECT parent_table::text AS "table", partition_name AS "partition",
       pg_total_relation_size(partition) AS bytes, lower_bound, upper_bound
  FROM v_partitions
 ORDER BY parent_table::text, lower_bound DESC NULLS LAST""", w=12, h=9),
]


def layout(panels):
    """Left to right, wrapping at 24 columns; ids 1..n."""
    x = y = row_h = 0
    for i, p in enumerate(panels, 1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        p["id"] = i
        x += w
        row_h = max(row_h, h)
    return panels


def dashboard(uid, title, panels, tags, variables=(ENV_VAR,)):
    return {
        "uid": uid, "title": title, "tags": ["fraiseql_obs", *tags], "timezone": "utc", "schemaVersion": 39,
        "version": 1, "editable": True, "refresh": "30s", "time": {"from": "now-24h", "to": "now"},
        "templating": {"list": list(variables)}, "annotations": {"list": []}, "panels": layout(panels),
    }


DASHBOARDS = {
    "error_monitoring.json": dashboard("fraiseql-errors", "fraiseql_obs: Error monitoring", ERRORS, ["errors"]),
    "trace_performance.json": dashboard("fraiseql-traces", "fraiseql_obs: Trace performance", TRACES, ["traces"]),
    "system_metrics.json": dashboard("fraiseql-system", "fraiseql_obs: System metrics", SYSTEM, ["metrics"]),
    "error_detail.json": dashboard(DETAIL_UID, "fraiseql_obs: Issue", ISSUE, ["errors"], variables=(ERROR_VAR,)),
}


def interval_seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text.strip().strip("'"))
    n, unit = int(m.group(1)), m.group(2)
    return {"ms": n / 1000, "s": n, "m": n * 60, "h": n * 3600, "d": n * 86400}[unit]


def expand(sql, start, end, interval, environments, error_id=None):
    """Expands Grafana's macros as its PostgreSQL datasource does (used by the
    tests and the benchmark to run the panels' SQL without Grafana)."""
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    sql = sql.replace("$__interval_ms", str(int(interval_seconds(interval) * 1000)))
    sql = sql.replace("$__interval", interval)
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)",
                 lambda m: f"{m.group(1).strip()} BETWEEN '{iso(start)}' AND '{iso(end)}'", sql)
    sql = sql.replace("$__timeFrom()", f"'{iso(start)}'").replace("$__timeTo()", f"'{iso(end)}'")

    def group(m, alias):
        col, iv = [x.strip() for x in m.group(1).split(",")[:2]]
        s = int(interval_seconds(iv))
        return f"floor(extract(epoch from {col})/{s})*{s}" + (' AS "time"' if alias else "")
    sql = re.sub(r"\$__timeGroupAlias\(([^)]+)\)", lambda m: group(m, True), sql)
    sql = re.sub(r"\$__timeGroup\(([^)]+)\)", lambda m: group(m, False), sql)
    sql = sql.replace("$environment", ",".join(f"'{e}'" for e in environments))
    if error_id is not None:
        sql = sql.replace("$error_id", str(error_id))
    assert "$" not in re.sub(r"'[^']*'", "", sql), f"unexpanded macro or variable in: {sql}"
    return sql


def render(d):
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    for name, d in DASHBOARDS.items():
        (HERE / name).write_text(render(d))
        print(f"wrote grafana/{name} ({len(d['panels'])} panels)")
