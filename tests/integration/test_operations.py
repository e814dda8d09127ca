"""Operations (#12): the extension as a good citizen of a production
cluster, measured on a real one."""
import time

import psycopg

from conftest import wait_for
from test_worker import worker_pid


def xmax(c):
    return int(c.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()[0])


def test_the_worker_reports_its_table_statistics(cluster, db):
    """Autovacuum and autoanalyze see the tables only the worker writes."""
    with cluster.connect(db) as c:
        for i in range(50):
            c.execute("SELECT fraiseql_capture_error('E', 'm', environment => %s)", (f"env{i % 3}",))
        wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 50, what="fold")

        def seen():
            rows = dict(c.execute(
                "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
                "WHERE relname IN ('tb_error_log', 'tb_error_count_pending', 'tb_rollup_error_minute', 'tb_rollup_state')"
            ).fetchall())
            return all(rows.get(t, 0) > 0 for t in ("tb_error_log", "tb_error_count_pending",
                                                    "tb_rollup_error_minute", "tb_rollup_state")) and rows
        rows = wait_for(seen, timeout=10, what="the worker's writes in pg_stat_user_tables")
        # the group rows were inserted by captures, then updated only by the worker's folds
        upd = c.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'tb_error_log'").fetchone()[0]
        assert upd >= 1, rows


def test_an_idle_worker_takes_no_transaction_ids(cluster, db):
    """Nothing captured, delivered or due: the fold, the rollups and the
    delivery loop (every 100 ms here) assign no transaction id."""
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM SET fraiseql_obs.maintenance_interval = 3600")
        c.execute("SELECT pg_reload_conf()")
    try:
        with cluster.connect(db) as c:
            # some history: rules, groups, an open rate-limit window, a digest rule
            c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, rate_limit_minutes) "
                      "VALUES ('pg_notify', '{}', 60)")
            c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, notify_on_occurrence) "
                      "VALUES ('pg_notify', '{}', '{1,10}')")
            c.execute("SELECT fraiseql_capture_error('E', 'm')")
            wait_for(lambda: c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0
                     and c.execute("SELECT occurrence_count FROM tb_error_log").fetchone()[0] == 1, what="quiet")
            time.sleep(2)  # the maintenance run the new interval starts at once
            before = xmax(c)
            time.sleep(20)
            used = xmax(c) - before
        assert used <= 2, f"{used} transaction ids in 20 s of idle"
        assert worker_pid(cluster, db)
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET fraiseql_obs.maintenance_interval")
            c.execute("SELECT pg_reload_conf()")


def test_without_the_preload_a_procedure_delivers():
    """No shared_preload_libraries: no worker. `CALL fraiseql_deliver_notifications()`
    (from pg_cron or a script) delivers what captures queued."""
    import json
    import os
    import pathlib
    import shutil
    import subprocess

    from conftest import ROOT, Cluster, free_port
    from receivers import HttpReceiver

    path = pathlib.Path(f"/tmp/fraiseql_obs_nopreload_{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    port = free_port()
    subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "start", str(path), str(port),
                    "shared_preload_libraries = ''",
                    "fraiseql_obs.notification_allowed_hosts = '127.0.0.1'"], check=True, capture_output=True)
    http = HttpReceiver().start()
    try:
        cl = Cluster(path, port)
        name = cl.new_database()
        with cl.connect(name) as c:
            assert c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'fraiseql_obs%'").fetchone()[0] == 0
            c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config) VALUES ('webhook', %s)",
                      (json.dumps({"url": http.url + "/hook"}),))
            c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config) VALUES ('pg_notify', '{}')")
            c.execute("SELECT fraiseql_capture_error('E', 'no worker here')")
            assert c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 2
            with cl.connect(name) as listener:
                listener.execute("LISTEN fraiseql_obs_errors")
                c.execute("CALL fraiseql_deliver_notifications()")
                notes = list(listener.notifies(timeout=5, stop_after=1))
            assert notes and json.loads(notes[0].payload)["error_type"] == "E"
            assert len(http.requests) == 1
            assert c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0
            assert sorted(r[0] for r in c.execute("SELECT status FROM tb_error_notification_log")) == ["sent", "sent"]
            # nothing due: a no-op
            c.execute("CALL fraiseql_deliver_notifications()")
            assert len(http.requests) == 1
    finally:
        http.stop()
        subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "stop", str(path)], check=False, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
