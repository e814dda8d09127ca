"""The background worker on a real cluster (launcher_naptime 1 s,
maintenance_interval 2 s, flush_interval 100 ms): no cron needed."""
import os
import signal
import threading

import psycopg

from conftest import wait_for


def worker_pid(cluster, db):
    with cluster.connect() as c:
        r = c.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'fraiseql_obs worker' AND datname = %s", (db,)
        ).fetchone()
        return r[0] if r else None


def partitions(cluster, db):
    with cluster.connect(db) as c:
        return {r[0] for r in c.execute(
            "SELECT partition_name FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass")}


def test_launcher_and_worker_are_visible(cluster, db):
    assert wait_for(lambda: worker_pid(cluster, db), what="a worker for the database")
    with cluster.connect() as c:
        launcher = c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'fraiseql_obs launcher'").fetchone()[0]
        assert launcher == 1


def test_counts_are_folded_without_manual_call(cluster, db):
    with cluster.connect(db) as c:
        for _ in range(5):
            c.execute("SELECT fraiseql_capture_error('E', 'fold me')")
        assert wait_for(lambda: c.execute("SELECT occurrence_count FROM tb_error_log").fetchone()[0] == 5,
                        what="counts folded by the worker")


def test_partitions_appear_and_expire_without_manual_call(cluster, db):
    wait_for(lambda: worker_pid(cluster, db), what="worker")
    with cluster.connect(db) as c:
        furthest = max(p for p in partitions(cluster, db) if p[-1].isdigit())
        c.execute(f"DROP TABLE {furthest}")
        c.execute("SELECT create_error_occurrence_partition('2020-02-02')")
        # a capture dated beyond the premade partitions lands in the default partition
        # (a month beyond them: captures further out are refused, see test_security)
        c.execute("SELECT fraiseql_capture_error('E', 'future', occurred_at => now() + interval '3 months')")
        assert c.execute("SELECT count(*) FROM tb_error_occurrence_default").fetchone()[0] == 1
    wait_for(lambda: furthest in partitions(cluster, db), what=f"{furthest} recreated")
    wait_for(lambda: "tb_error_occurrence_2020_02" not in partitions(cluster, db), what="old partition dropped")
    with cluster.connect(db) as c:
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_occurrence_default").fetchone()[0] == 0,
                 what="default partition emptied")
        assert c.execute("SELECT count(*) FROM tb_error_occurrence WHERE message = 'future'").fetchone()[0] == 1
        runs = c.execute("SELECT count(*) FROM v_maintenance_runs WHERE triggered_by = 'worker'").fetchone()[0]
        assert runs >= 1


def test_reloaded_retention_setting_is_used(cluster, db):
    with cluster.connect(db) as c:
        name = c.execute(
            "SELECT create_error_occurrence_partition((now() AT TIME ZONE 'UTC' - interval '3 months')::date)").fetchone()[0]
    # kept under the default retention of 6 months
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_run_maintenance()")
    assert name in partitions(cluster, db)
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM SET fraiseql_obs.error_retention_months = 1")
        c.execute("SELECT pg_reload_conf()")
    try:
        wait_for(lambda: name not in partitions(cluster, db), what="partition dropped after reload")
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET fraiseql_obs.error_retention_months")
            c.execute("SELECT pg_reload_conf()")


def test_maintenance_does_not_queue_behind_a_long_transaction(cluster, db):
    # 3 months old: the worker (6 months' retention) keeps it; the manual runs
    # below use a retention of 1 month and want to drop it
    with cluster.connect(db) as c:
        name = c.execute(
            "SELECT create_error_occurrence_partition((now() AT TIME ZONE 'UTC' - interval '3 months')::date)").fetchone()[0]
    reader = cluster.connect(db, autocommit=False)
    try:
        # a long transaction holds a lock on the partition maintenance wants to drop
        reader.execute(f"SELECT count(*) FROM {name}")
        with cluster.connect(db) as m:
            m.execute("SET fraiseql_obs.error_retention_months = 1")
            result = m.execute("SELECT fraiseql_run_maintenance()").fetchone()[0]
            assert any("tb_error_occurrence" in s for s in result["skipped"]), result
            # and application readers and writers are not blocked meanwhile
            with cluster.connect(db) as app:
                app.execute("SET lock_timeout = '2s'")
                app.execute("SELECT count(*) FROM tb_error_occurrence")
                app.execute("SELECT fraiseql_capture_error('E', 'still capturing')")
            assert name in partitions(cluster, db)
            reader.rollback()
            result = m.execute("SELECT fraiseql_run_maintenance()").fetchone()[0]
            assert name in result["dropped"], result
    finally:
        reader.rollback()
        reader.close()


def test_terminated_worker_comes_back(cluster, db):
    pid = wait_for(lambda: worker_pid(cluster, db), what="worker")
    with cluster.connect() as c:
        c.execute("SELECT pg_terminate_backend(%s)", (pid,))
    new = wait_for(lambda: (p := worker_pid(cluster, db)) and p != pid and p, what="worker restarted")
    assert new != pid


def test_killed_worker_comes_back(cluster, db):
    pid = wait_for(lambda: worker_pid(cluster, db), what="worker")
    os.kill(pid, signal.SIGKILL)  # the postmaster restarts every process
    new = wait_for(lambda: (p := worker_pid(cluster, db)) and p != pid and p, timeout=60, what="worker back after kill -9")
    assert new != pid


def test_drop_database_is_not_blocked(cluster):
    name = cluster.new_database()
    wait_for(lambda: worker_pid(cluster, name), what="worker connected")
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE {name}")
        assert c.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()[0] == 0


def test_database_without_extension_is_left_alone_until_created(cluster):
    name = cluster.new_database(extension=False)
    try:
        log_before = cluster.log().count("fraiseql_obs")
        # several launcher naps pass: no worker stays, nothing is logged
        with cluster.connect() as c:
            c.execute("SELECT pg_sleep(3)")
        assert worker_pid(cluster, name) is None
        with cluster.connect(name) as c:
            c.execute("CREATE EXTENSION fraiseql_obs")
        wait_for(lambda: worker_pid(cluster, name), timeout=10, what="worker after CREATE EXTENSION")
        assert cluster.log().count("fraiseql_obs") - log_before <= 2
    finally:
        with cluster.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {name}")


def test_extension_in_its_own_schema(cluster):
    name = cluster.new_database(extension=False)
    try:
        with cluster.connect() as c:
            # the worker's maintenance (every 2 s here) would otherwise drop the
            # old partition below before the test's own drop does
            c.execute(f"ALTER DATABASE {name} SET fraiseql_obs.error_retention_months = 0")
        with cluster.connect(name) as c:
            c.execute("CREATE SCHEMA obs")
            c.execute("CREATE EXTENSION fraiseql_obs SCHEMA obs")
            # the seed's functions work there, found through the schema, not `public`
            c.execute("SET search_path = obs")
            c.execute("SELECT create_error_occurrence_partition('2020-06-01')")
            assert c.execute("SELECT to_regclass('obs.tb_error_occurrence_2020_06') IS NOT NULL").fetchone()[0]
            dropped = c.execute("SELECT partition_name FROM drop_old_error_occurrence_partitions(6)").fetchall()
            assert ("tb_error_occurrence_2020_06",) in dropped
            c.execute("RESET search_path")
            c.execute("SELECT obs.fraiseql_capture_error('E', 'in obs')")
            assert c.execute("SELECT count(*) FROM monitoring.errors").fetchone()[0] == 1
        # and the worker serves it
        wait_for(lambda: worker_pid(cluster, name), what="worker")
        with cluster.connect(name) as c:
            wait_for(lambda: c.execute("SELECT occurrence_count FROM obs.tb_error_log").fetchone()[0] == 1
                     and c.execute("SELECT count(*) FROM obs.v_maintenance_runs WHERE triggered_by = 'worker'").fetchone()[0] > 0,
                     what="worker ran in schema obs")
    finally:
        with cluster.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {name}")


def test_failing_tick_is_recorded_logged_once_and_retried(cluster, db):
    with cluster.connect(db) as c:
        # tables squatting on the name of the next partition to create and
        # on every name it could take instead
        nxt = c.execute("SELECT 'tb_error_occurrence_' || to_char((now() AT TIME ZONE 'UTC') + interval '4 months', 'YYYY_MM')").fetchone()[0]
        squatters = [nxt] + [f"{nxt}_{i}" for i in range(1, 101)]
        with c.transaction():
            for t in squatters:
                c.execute(f"CREATE TABLE {t} (x int)")
        c.execute("ALTER SYSTEM SET fraiseql_obs.premake_months = 4")
        c.execute("SELECT pg_reload_conf()")
    try:
        with cluster.connect(db) as c:
            wait_for(lambda: c.execute(
                "SELECT count(*) FROM v_maintenance_runs WHERE triggered_by = 'worker' AND last_error LIKE %s",
                (f"%{nxt}%",)).fetchone()[0] >= 2, what="two failing runs recorded")
        warnings = [l for l in cluster.log().splitlines() if "WARNING" in l and nxt in l]
        assert len(warnings) <= 1, warnings  # a persisting error is not logged at every tick
        with cluster.connect(db) as c:
            c.execute(f"DROP TABLE {', '.join(squatters)}")
        wait_for(lambda: nxt in partitions(cluster, db), what="retried and created once the name is free")
        assert worker_pid(cluster, db)
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET fraiseql_obs.premake_months")
            c.execute("SELECT pg_reload_conf()")


def test_drop_extension_lets_the_worker_go_quietly(cluster):
    name = cluster.new_database()
    try:
        wait_for(lambda: worker_pid(cluster, name), what="worker")
        with cluster.connect(name) as c:
            c.execute("DROP EXTENSION fraiseql_obs")
        wait_for(lambda: worker_pid(cluster, name) is None, what="worker gone after DROP EXTENSION")
        with cluster.connect() as c:
            c.execute("SELECT pg_sleep(2)")
        assert worker_pid(cluster, name) is None
    finally:
        with cluster.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {name}")


def test_standby_waits_for_promotion(cluster, db):
    """A streaming replica runs no worker (it could not write); once promoted,
    the launcher starts and serves the database."""
    import pathlib
    import shutil
    import subprocess

    from conftest import BIN, free_port

    standby = pathlib.Path(f"{cluster.path}_standby")
    shutil.rmtree(standby, ignore_errors=True)
    port = free_port()

    def as_postgres(*cmd):
        if os.geteuid() == 0:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        return subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "RUST_BACKTRACE": "0"})

    as_postgres(f"{BIN}/pg_basebackup", "-h", str(cluster.path), "-p", str(cluster.port), "-U", "postgres",
                "-D", str(standby), "-R", "-X", "stream", "-c", "fast")
    with open(standby / "postgresql.conf", "a") as f:
        f.write(f"\nport = {port}\nunix_socket_directories = '{standby}'\n")
    as_postgres(f"{BIN}/pg_ctl", "-D", str(standby), "-l", str(standby / "server.log"), "-w", "start")
    try:
        dsn = f"host={standby} port={port} dbname=postgres user=postgres"

        def workers():
            with psycopg.connect(dsn, autocommit=True) as c:
                return c.execute("SELECT count(*) FILTER (WHERE backend_type = 'fraiseql_obs launcher'),"
                                 " count(*) FILTER (WHERE backend_type = 'fraiseql_obs worker' AND datname = %s),"
                                 " pg_is_in_recovery() FROM pg_stat_activity", (db,)).fetchone()

        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("SELECT pg_sleep(2)")  # several launcher naps
        assert workers() == (0, 0, True)
        as_postgres(f"{BIN}/pg_ctl", "-D", str(standby), "-w", "promote")
        wait_for(lambda: workers() == (1, 1, False), what="launcher and worker after promotion")
    finally:
        subprocess.run(("runuser", "-u", "postgres", "--") * (os.geteuid() == 0) +
                       (f"{BIN}/pg_ctl", "-D", str(standby), "-m", "immediate", "-w", "stop"), check=False, capture_output=True)
        shutil.rmtree(standby, ignore_errors=True)


def test_database_with_a_worker_can_be_a_template(cluster):
    name = cluster.new_database()
    copy = name + "_copy"
    try:
        wait_for(lambda: worker_pid(cluster, name), what="worker connected to the template")
        with cluster.connect() as c:
            c.execute(f"CREATE DATABASE {copy} TEMPLATE {name}")
        wait_for(lambda: worker_pid(cluster, copy), what="the copy is served too")
    finally:
        with cluster.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {copy}")
            c.execute(f"DROP DATABASE IF EXISTS {name}")
