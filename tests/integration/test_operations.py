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
        # two rounds: a fold that makes a group counts into it directly;
        # the second round goes through tb_error_count_pending
        for n in (50, 100):
            for i in range(50):
                c.execute("SELECT fraiseql_capture_error('E', 'm', environment => %s)", (f"env{i % 3}",))
            wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == n,
                     what="fold")

        def seen():
            rows = dict(c.execute(
                "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
                "WHERE relname IN ('tb_error_log', 'tb_error_count_pending', 'tb_rollup_error_minute', 'tb_rollup_state')"
            ).fetchall())
            if all(rows.get(t, 0) > 0 for t in ("tb_error_log", "tb_error_count_pending",
                                                "tb_rollup_error_minute", "tb_rollup_state")):
                return rows
            last.append(rows)  # said on a failure: which table is not seen
            return None
        last = []
        try:
            rows = wait_for(seen, timeout=30, what="the worker's writes in pg_stat_user_tables")
        except AssertionError as e:
            raise AssertionError(f"{e}; last seen: {last[-1:]}") from None
        # the group rows were made, then updated, only by the worker's folds
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
            # autovacuum's ANALYZE of the catalogs CREATE EXTENSION filled
            # takes transaction ids of its own: done now, not while measuring
            c.execute("VACUUM ANALYZE")
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
            # rules are evaluated by the fold, which the procedure runs first
            assert c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0
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


def test_many_databases_share_a_few_workers():
    """20 databases, max_worker_processes = 8 (PostgreSQL's default): every
    database gets maintenance and its notifications promptly, and idle
    databases hold no worker."""
    import json
    import os
    import pathlib
    import shutil
    import statistics
    import subprocess

    from conftest import ROOT, Cluster, free_port
    from receivers import HttpReceiver

    path = pathlib.Path(f"/tmp/fraiseql_obs_many_{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    port = free_port()
    subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "start", str(path), str(port),
                    "max_worker_processes = 8", "fraiseql_obs.worker_idle_timeout = 3",
                    "fraiseql_obs.flush_interval = 100", "fraiseql_obs.launcher_naptime = 1",
                    "fraiseql_obs.notification_allowed_hosts = '127.0.0.1'"], check=True, capture_output=True)
    http = HttpReceiver().start()
    conns = {}
    try:
        cl = Cluster(path, port)
        names = [cl.new_database() for _ in range(20)]
        for n in names:
            conns[n] = cl.connect(n)
            conns[n].execute("INSERT INTO tb_error_notification_config (channel_type, channel_config) VALUES ('webhook', %s)",
                             (json.dumps({"url": f"{http.url}/{n}"}),))

        def workers():
            with cl.connect() as c:
                return c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'fraiseql_obs worker'").fetchone()[0]

        # every database is maintained (partitions made, a run recorded)
        wait_for(lambda: all(c.execute("SELECT count(*) FROM tb_maintenance_run WHERE triggered_by = 'worker'").fetchone()[0]
                             for c in conns.values()), timeout=60, what="maintenance in every database")
        latencies = []
        for rnd in range(5):
            sent = {}
            for n, c in conns.items():
                c.execute("SELECT fraiseql_capture_error(%s, %s)", (f"E{rnd}", f"{n} round {rnd}"))
                sent[f"{n} round {rnd}"] = time.monotonic()
                assert workers() <= 4  # fraiseql_obs.max_workers
            wait_for(lambda: all(any(k in r["body"] for r in http.requests) for k in sent), timeout=60,
                     what=f"round {rnd} delivered in all 20 databases")
            for k, t0 in sent.items():
                at = min(r["at"] for r in http.requests if k in r["body"])
                latencies.append(at - t0)
        p50 = statistics.median(latencies)
        print(f"notification latency with 20 databases: p50 {p50:.3f} s, max {max(latencies):.3f} s")
        assert p50 < 1.0, f"notification p50 {p50:.3f} s with 20 active databases"
        # idle: no worker left
        wait_for(lambda: workers() == 0, timeout=30, what="idle databases release their workers")
        # and a capture brings one back
        c = conns[names[7]]
        c.execute("SELECT fraiseql_capture_error('Late', 'after the quiet')")
        wait_for(lambda: any("after the quiet" in r["body"] for r in http.requests), timeout=10, what="delivery after idling")
    finally:
        for c in conns.values():
            c.close()
        http.stop()
        subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "stop", str(path)], check=False, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def test_a_hung_destination_delays_nothing_else(cluster, db):
    """20 deliveries to an endpoint that accepts and never answers; a message
    for a healthy endpoint, and the counts, go on as if it were not there."""
    import json

    from receivers import HttpReceiver

    hung, healthy = HttpReceiver(delay=30).start(), HttpReceiver().start()
    try:
        with cluster.connect(db) as c:
            for url, etype in [(hung.url, "Hung"), (healthy.url, "Healthy")]:
                c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, error_type) "
                          "VALUES ('webhook', %s, %s)", (json.dumps({"url": url}), etype))
            for i in range(20):
                c.execute("SELECT fraiseql_capture_error('Hung', %s)", (f"to the hung endpoint {i}",))
            wait_for(lambda: hung.requests, what="the hung endpoint reached")
            started = time.monotonic()
            c.execute("SELECT fraiseql_capture_error('Healthy', 'to the healthy endpoint')")
            wait_for(lambda: healthy.requests, timeout=10, what="the healthy delivery")
            took = time.monotonic() - started
            # within one delivery deadline (connect 0.5 + timeout 1.5 + 0.5 s) of the hung ones at worst
            assert took < 3.0, f"the healthy endpoint waited {took:.2f} s behind the hung one"
            # counts fold meanwhile
            wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 21,
                     timeout=5, what="folds while deliveries hang")
            # the hung ones are failed attempts, retried later; at most 2 at once went to it
            wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_notification_log WHERE error_message LIKE '%deadline%' "
                                       "OR error_message LIKE '%timed out%' OR error_message LIKE '%timeout%'").fetchone()[0] >= 1,
                     timeout=10, what="a hung delivery recorded as a failed attempt")
            firsts = sorted(r["at"] for r in hung.requests)
            assert len([t for t in firsts if t - firsts[0] < 1.0]) <= 2, "more than 2 at once to one destination"
    finally:
        hung.stop()
        healthy.stop()


def test_maintenance_never_queues_writers(cluster, db):
    """A report over recent data holds the table; maintenance makes a
    partition (attached beside the report: SHARE UPDATE EXCLUSIVE on the
    parent) and tries to drop an old one (skipped after its short lock
    timeout, retried next run); no capture waits 200 ms."""
    import threading

    with cluster.connect() as c:
        c.execute("ALTER SYSTEM SET fraiseql_obs.ddl_lock_timeout = 100")
        # only this test's run (the worker runs once at the change, then not for an hour)
        c.execute("ALTER SYSTEM SET fraiseql_obs.maintenance_interval = 3600")
        c.execute("SELECT pg_reload_conf()")
    time.sleep(1)
    try:
        with cluster.connect(db) as c:
            c.execute("SELECT fraiseql_capture_error('E', 'first')")
            ahead = c.execute("SELECT max(partition_name) FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass "
                              "AND NOT is_default").fetchone()[0]
            c.execute(f"DROP TABLE {ahead}")
            c.execute("SELECT create_error_occurrence_partition((now() - interval '2 years')::date)")
        report = cluster.connect(db, autocommit=False)
        # holds ACCESS SHARE on the table (and its recent partitions) until the end
        # (a dashboard's bounded range: constants, so the plan touches only that partition)
        g = time.gmtime()
        month, following = f"{g.tm_year}-{g.tm_mon:02}-01", (f"{g.tm_year + 1}-01-01" if g.tm_mon == 12
                                                              else f"{g.tm_year}-{g.tm_mon + 1:02}-01")
        report.execute(f"SELECT count(*) FROM tb_error_occurrence WHERE occurred_at >= '{month} 00:00+00' "
                       f"AND occurred_at < '{following} 00:00+00'")
        latencies, stop = [], threading.Event()

        def writer():
            with cluster.connect(db) as w:
                while not stop.is_set():
                    t0 = time.monotonic()
                    w.execute("SELECT fraiseql_capture_error('W', 'writer')")
                    latencies.append(time.monotonic() - t0)

        t = threading.Thread(target=writer)
        t.start()
        try:
            time.sleep(0.3)
            with cluster.connect(db) as c:
                r = c.execute("SELECT fraiseql_run_maintenance()").fetchone()[0]
            time.sleep(0.3)
        finally:
            stop.set()
            t.join()
            report.rollback()
            report.close()
        assert ahead in r["created"], (r["skipped"], r)
        assert any("drop" in s and "lock not available" in s for s in r["skipped"]), r
        assert len(latencies) > 10 and max(latencies) < 0.2, f"a capture waited {max(latencies):.3f} s"
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET fraiseql_obs.ddl_lock_timeout")
            c.execute("ALTER SYSTEM RESET fraiseql_obs.maintenance_interval")
            c.execute("SELECT pg_reload_conf()")


def test_a_transaction_left_open_elsewhere_delays_nothing(cluster, db):
    """(#13) An xid held open in another database, and a prepared-free idle
    transaction in this one: counts fold, a milestone notifies, rollups move
    within seconds; the open transaction's own rows wait for it."""
    other = cluster.new_database()
    blocker = cluster.connect(other, autocommit=False)
    mine = cluster.connect(db, autocommit=False)
    try:
        blocker.execute("CREATE TABLE t (x int)")
        blocker.execute("INSERT INTO t VALUES (1)")  # holds an xid: the cluster's xmin stays here
        with cluster.connect(db) as c:
            c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, notify_on_occurrence) "
                      "VALUES ('pg_notify', '{}', '{3}')")
            # a capture in a transaction of this database that stays open
            mine.execute("SELECT fraiseql_capture_error('Open', 'still open')")
            for _ in range(3):
                c.execute("SELECT fraiseql_capture_error('E', 'counted anyway')")
            started = time.monotonic()
            wait_for(lambda: c.execute("SELECT coalesce(sum(occurrence_count), 0) FROM tb_error_log "
                                       "WHERE error_type = 'E'").fetchone()[0] == 3, timeout=5, what="the fold")
            wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_notification_log WHERE status = 'sent'").fetchone()[0] == 1,
                     timeout=5, what="the milestone")
            wait_for(lambda: c.execute("SELECT coalesce(sum(occurrences), 0) FROM tb_rollup_error_minute").fetchone()[0] == 3,
                     timeout=5, what="the rollup")
            assert time.monotonic() - started < 4
            # the open transaction's own row: not visible, not counted, until it commits
            assert c.execute("SELECT count(*) FROM tb_error_log WHERE error_type = 'Open'").fetchone()[0] == 0
            mine.commit()
            wait_for(lambda: c.execute("SELECT coalesce(sum(occurrence_count), 0) FROM tb_error_log").fetchone()[0] == 4,
                     timeout=5, what="its row, once committed")
    finally:
        blocker.rollback()
        blocker.close()
        mine.close()
        with cluster.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {other}")


def test_maintenance_held_off_for_good_is_seen_and_named(cluster, db):
    """A dashboard reader that leaves a transaction open holds the table:
    dropping partitions past retention is skipped at every run. The DBA must
    see it: v_maintenance_steps says since when, and who holds the table;
    from the third failure the log has a WARNING naming the session; a
    worker's run that skipped a step is tried again within a minute, not an
    hour; once the session is gone the partition is dropped and the step is
    healthy again."""
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM SET fraiseql_obs.ddl_lock_timeout = 100")
        c.execute("ALTER SYSTEM SET fraiseql_obs.maintenance_interval = 3600")
        c.execute("SELECT pg_reload_conf()")
    time.sleep(1)
    try:
        with cluster.connect(db) as c:
            c.execute("DROP ROLE IF EXISTS held_reader")
            c.execute("CREATE ROLE held_reader LOGIN")
            c.execute("GRANT USAGE ON SCHEMA public TO held_reader")
            c.execute("GRANT SELECT ON tb_error_occurrence TO held_reader")
            old = c.execute("SELECT create_error_occurrence_partition((now() - interval '2 years')::date)").fetchone()[0]
        reader = cluster.connect(db, user="held_reader", autocommit=False)
        reader.execute("SELECT count(*) FROM tb_error_occurrence")  # every partition, until the end
        reader_pid = reader.execute("SELECT pg_backend_pid()").fetchone()[0]
        try:
            with cluster.connect(db) as c:
                warnings = []
                c.add_notice_handler(lambda d: warnings.append((d.severity_nonlocalized, d.message_primary, d.message_detail)))
                for _ in range(5):
                    r = c.execute("SELECT fraiseql_run_maintenance('worker')").fetchone()[0]
                    assert any("drop: lock not available" in s for s in r["skipped"]), r
                    if warnings:
                        break
                sev, msg, detail = warnings[0]
                assert sev == "WARNING" and "tb_error_occurrence (drop)" in msg and "in a row" in msg, warnings
                assert f"pid {reader_pid} (role held_reader" in (detail or ""), warnings
                step = c.execute("SELECT failing_since IS NOT NULL, failures, blocked_by, last_problem FROM v_maintenance_steps"
                                 " WHERE parent_table = 'tb_error_occurrence'::regclass AND step = 'drop'").fetchone()
                assert step[0] and step[1] >= 3 and reader_pid in step[2] and "lock not available" in step[3], step
                # the others are healthy
                assert c.execute("SELECT count(*) FROM v_maintenance_steps WHERE failing_since IS NULL AND step = 'create'").fetchone()[0] >= 1
                # a worker's run that skipped a step is due again within a minute
                due = c.execute("SELECT extract(epoch FROM _fraiseql_next_maintenance(interval '1 hour') - now())").fetchone()[0]
                assert due <= 60, due
                # and logged once an hour at most, not at every retry
                warnings.clear()
                c.execute("SELECT fraiseql_run_maintenance('worker')")
                assert warnings == [], warnings
        finally:
            reader.rollback()
            reader.close()
        with cluster.connect(db) as c:
            r = c.execute("SELECT fraiseql_run_maintenance('worker')").fetchone()[0]
            assert old in r["dropped"], r
            assert c.execute("SELECT count(*) FROM v_maintenance_steps WHERE failing_since IS NOT NULL").fetchone()[0] == 0
            assert c.execute("SELECT last_done_at IS NOT NULL FROM v_maintenance_steps"
                             " WHERE parent_table = 'tb_error_occurrence'::regclass AND step = 'drop'").fetchone()[0]
            due = c.execute("SELECT extract(epoch FROM _fraiseql_next_maintenance(interval '1 hour') - now())").fetchone()[0]
            assert due > 3000, due
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET fraiseql_obs.ddl_lock_timeout")
            c.execute("ALTER SYSTEM RESET fraiseql_obs.maintenance_interval")
            c.execute("SELECT pg_reload_conf()")
