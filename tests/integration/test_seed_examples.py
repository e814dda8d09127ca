"""Every SQL example of the seed's Error Tracking, Notification Delivery
Tracking, Error Analysis, Production-Scale Error Storage, Data Retention
(errors) and Alert Fatigue Prevention sections runs unmodified."""
import pathlib
import re
import uuid

import psycopg

from conftest import wait_for

EXAMPLES = pathlib.Path(__file__).with_name("seed_examples.sql")

# The seed's "Check Partition Coverage" query is not valid SQL in any
# PostgreSQL version: it calls generate_series() in the select list and then
# refers to a column named generate_series, which only exists when the
# function is in FROM. The test checks that the verbatim query fails with
# exactly that error, and runs the minimal correction below instead.
BROKEN_IN_SEED = {
    "Partition health: coverage (seed lines 986-997)": (
        'column "generate_series" does not exist',
        """SELECT generate_series::DATE as required_month,
       EXISTS (SELECT 1 FROM pg_class
               WHERE relname = 'tb_error_occurrence_' || to_char(generate_series, 'YYYY_MM')) as partition_exists
FROM generate_series(date_trunc('month', CURRENT_DATE),
                     date_trunc('month', CURRENT_DATE + INTERVAL '3 months'),
                     INTERVAL '1 month')""",
    ),
}


def examples():
    text = EXAMPLES.read_text()
    parts = re.split(r"^-- @example (.+)$", text, flags=re.M)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts), 2)]


def statements(sql: str):
    """Splits an example into statements (the examples have no ';' in strings)."""
    cur = []
    for line in sql.splitlines():
        cur.append(line)
        if line.split("--")[0].rstrip().endswith(";"):
            yield "\n".join(cur)
            cur = []
    rest = "\n".join(cur).strip()
    if rest and not all(l.strip().startswith("--") or not l.strip() for l in cur):
        yield rest


def populate(conn):
    for i in range(12):
        conn.execute(
            "SELECT fraiseql_capture_error('ValueError', 'bad value', NULL, %s::jsonb)",
            (f'{{"user_id": "u{i % 4}", "order_id": "{i}"}}',),
        )
    conn.execute("SELECT fraiseql_capture_error('PaymentError', 'Payment gateway timeout', fingerprint => 'payment_processing_error')")
    conn.execute("SELECT fraiseql_capture_error('Old', 'ancient', occurred_at => now() - interval '120 days')")
    conn.execute("SELECT fraiseql_flush_counts()")
    # The installation the seed's rules assume: a default Slack webhook and
    # default e-mail recipients (its "environment-specific" rules name no
    # destination), and the Twilio channel of its custom-channel example.
    conn.execute("""SELECT fraiseql_set_channel_defaults('slack', '{"webhook_url": "https://hooks.slack.com/services/T0/B0/x"}')""")
    conn.execute("""SELECT fraiseql_set_channel_defaults('email', '{"to": ["oncall@myapp.com"], "smtp_host": "smtp.myapp.com"}')""")
    conn.execute("""CREATE FUNCTION twilio_sms(error jsonb, config jsonb, OUT success boolean, OUT error_message text)
                    LANGUAGE sql AS $$ SELECT false, 'not configured in tests' $$""")
    conn.execute("SELECT fraiseql_register_channel('twilio_sms', 'twilio_sms(jsonb, jsonb)')")
    gid = conn.execute("SELECT error_id FROM v_error_groups WHERE error_type = 'ValueError'").fetchone()[0]
    # delivery log rows, as the worker writes them
    conn.execute(
        """INSERT INTO tb_error_notification_log (config_id, error_id, channel_type, recipient, status, error_message)
           VALUES (gen_random_uuid(), %s, 'email', 'team@myapp.com', 'sent', NULL),
                  (gen_random_uuid(), %s, 'slack', '#alerts', 'failed', 'HTTP 500')""",
        (gid, gid),
    )
    return gid


def restart_worker(cluster, db):
    with cluster.connect() as c:
        q = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'fraiseql_obs worker' AND datname = %s"
        old = wait_for(lambda: c.execute(q, (db,)).fetchone(), what="the worker")[0]
        c.execute("SELECT pg_terminate_backend(%s)", (old,))
        wait_for(lambda: (r := c.execute(q, (db,)).fetchone()) and r[0] != old, timeout=30, what="a new worker")


def test_every_seed_example_runs_unmodified(cluster, db):
    with cluster.connect(db) as conn:
        gid = populate(conn)
        results = {}
        # the worker's maintenance (every 2 s here) would otherwise race the
        # examples: it drops the old partition the seed creates before the
        # seed's own drop statement runs. With retention 0 for this database
        # (keep forever) its ticks drop nothing; the examples pass their own
        # retention. The worker reads the setting when it connects.
        for guc in ("error_retention_months", "notification_log_retention_months"):
            conn.execute(f"ALTER DATABASE {db} SET fraiseql_obs.{guc} = 0")
        restart_worker(cluster, db)
        for name, sql in examples():
            for stmt in statements(sql):
                # '...' is the seed's placeholder for an error id
                stmt = stmt.replace("error_id = '...'", f"error_id = '{gid}'")
                # '...' is also its placeholder for a webhook URL
                stmt = stmt.replace('{"webhook_url": "..."}', '{"webhook_url": "https://hooks.slack.com/services/T1/B1/y"}')
                if name in BROKEN_IN_SEED:
                    expected, corrected = BROKEN_IN_SEED[name]
                    try:
                        conn.execute(stmt)
                        raise AssertionError(f"{name}: expected the seed's own error")
                    except psycopg.errors.UndefinedColumn as e:
                        assert expected in str(e)
                    stmt = corrected
                try:
                    cur = conn.execute(stmt)
                    rows = cur.fetchall() if cur.description else None
                except psycopg.Error as e:
                    raise AssertionError(f"seed example '{name}' failed: {e}\n{stmt}") from e
                results.setdefault(name, []).append(rows)

        # spot checks that they answer correctly
        assert results["Partitions: create (seed lines 782-784)"][0] == [("tb_error_occurrence_2025_12",)]
        assert results["Partitions: create again (seed lines 785-787)"][0] == [("tb_error_occurrence_2025_12",)]
        ensure = results["Partitions: ensure (seed lines 814-815)"][0]
        assert len(ensure) == 4 and all(not created for _, created in ensure)  # existed since CREATE EXTENSION
        dropped = results["Partitions: drop old (seed lines 851-852)"][0]
        assert ("tb_error_occurrence_2025_12", True) in dropped
        stats = results["Partitions: stats (seed lines 899-900)"][0]
        # real counts; the 120-day-old occurrence sits in the default partition
        assert sum(r[2] for r in stats if r[0] == "tb_error_occurrence") == 14
        coverage = results["Partition health: coverage (seed lines 986-997)"][0]
        assert all(exists for _, exists in coverage)
        assert results["Partition health: alert (seed lines 1005-1017)"][0] == []
        top = results["Error analysis: top errors (seed lines 662-676)"][0]
        assert top[0][1] == "ValueError" and top[0][3] == 12 and top[0][6] == 4
        volume = {r[0]: r for r in results["Delivery tracking: volume (seed lines 316-325)"][0]}
        assert volume["email"][2] == 1 and volume["slack"][3] == 1
        failed = results["Delivery tracking: failed (seed lines 304-315)"][0]
        assert [r[2] for r in failed] == ["HTTP 500"]
        fatigue = results["Alert fatigue: grouping (seed lines 1149-1159)"][0]
        assert len(fatigue) == 1 and fatigue[0][1] == 12
        # the retention DELETE removed the 120-day-old occurrence only
        assert conn.execute("SELECT count(*) FROM monitoring.errors").fetchone()[0] == 13
        rules = conn.execute("SELECT channel_type, count(*) FROM tb_error_notification_config GROUP BY 1 ORDER BY 1").fetchall()
        assert dict(rules) == {"email": 2, "slack": 5, "twilio_sms": 1, "webhook": 1}


def test_what_the_seed_ddl_describes_exists(cluster, db):
    """The seed's CREATE TABLE blocks are provided by the extension."""
    with cluster.connect(db) as conn:
        cols = {r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'monitoring.errors'::regclass AND attnum > 0")}
        assert {"id", "fingerprint", "exception_type", "message", "stack_trace", "context", "environment",
                "trace_id", "span_id", "occurred_at", "resolved_at", "ignored", "assignee"} <= cols
        for table, key in [("tb_error_occurrence", "occurred_at"), ("tb_error_notification_log", "sent_at")]:
            kd = conn.execute("SELECT pg_get_partkeydef(%s::regclass)", (table,)).fetchone()[0]
            assert kd == f"RANGE ({key})"
