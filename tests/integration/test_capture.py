"""Capture over real connections: concurrency, privileges, no lock convoy."""
import threading

import psycopg
import pytest


def test_concurrent_first_captures_make_one_group(cluster, db):
    sessions, per_session = 16, 25
    barrier = threading.Barrier(sessions)
    errors = []

    def worker():
        try:
            with cluster.connect(db) as c:
                barrier.wait()
                for _ in range(per_session):
                    c.execute("SELECT fraiseql_capture_error('RaceError', 'same new fingerprint')")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with cluster.connect(db) as c:
        # live counts: folded + not yet folded (the worker folds concurrently)
        groups = c.execute("SELECT count(*), sum(occurrence_count) FROM v_error_groups WHERE error_type = 'RaceError'").fetchone()
        assert groups == (1, sessions * per_session)
        assert c.execute("SELECT count(*) FROM tb_error_occurrence WHERE error_type = 'RaceError'").fetchone()[0] == sessions * per_session


def test_hot_group_does_not_serialize_capture(cluster, db):
    """A session holding an open transaction that captured a hot fingerprint
    must not make other sessions capturing it wait (no lock convoy)."""
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_capture_error('HotError', 'hot')")  # the group exists
    holder = cluster.connect(db, autocommit=False)
    try:
        holder.execute("SELECT fraiseql_capture_error('HotError', 'hot')")
        holder.execute("SELECT fraiseql_capture_error('HotError', 'hot', severity => 'error')")
        # transaction left open, holding whatever locks a capture takes
        with cluster.connect(db) as other:
            other.execute("SET lock_timeout = '500ms'")
            for _ in range(20):
                other.execute("SELECT fraiseql_capture_error('HotError', 'hot')")
    finally:
        holder.rollback()
        holder.close()
    with cluster.connect(db) as c:
        # the rolled-back captures are not counted
        assert c.execute("SELECT occurrence_count FROM v_error_groups WHERE error_type = 'HotError'").fetchone()[0] == 21


def test_capture_needs_only_execute_privilege(cluster, db):
    with cluster.connect(db) as c:
        c.execute("DROP ROLE IF EXISTS app_writer")
        c.execute("CREATE ROLE app_writer LOGIN")
    try:
        with cluster.connect(db, user="app_writer") as app:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT fraiseql_capture_error('E', 'm')")
        with cluster.connect(db) as c:
            c.execute(
                "GRANT EXECUTE ON FUNCTION fraiseql_capture_error(text, text, text, jsonb, text, text, text, text, text, text, timestamptz, boolean),"
                " fraiseql_capture_message(text, text, jsonb, text, text, text, text, text, timestamptz, boolean),"
                " fraiseql_set_trace_context(text, boolean) TO app_writer"
            )
        with cluster.connect(db, user="app_writer") as app:
            with app.transaction():
                app.execute("SELECT fraiseql_set_trace_context('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')")
                gid = app.execute("SELECT fraiseql_capture_error('E', 'from the app')").fetchone()[0]
                app.execute("SELECT fraiseql_capture_message('hello')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT * FROM tb_error_log")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT fraiseql_resolve_error(%s)", (gid,))
        with cluster.connect(db) as c:
            tid = c.execute("SELECT trace_id FROM tb_error_occurrence WHERE message = 'from the app'").fetchone()[0]
            assert tid == "4bf92f3577b34da6a3ce929d0e0e4736"
    finally:
        with cluster.connect(db) as c:
            c.execute("DROP OWNED BY app_writer")
            c.execute("DROP ROLE app_writer")


def test_bad_input_loses_nothing_stored(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_capture_error('E', 'kept')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="severity"):
            c.execute("SELECT fraiseql_capture_error('E', 'kept', severity => 'loud')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="context"):
            c.execute("SELECT fraiseql_capture_error('E', 'kept', context => '\"text\"')")
        assert c.execute("SELECT count(*) FROM tb_error_occurrence").fetchone()[0] == 1


def test_users_affected_of_a_folded_group(cluster, db):
    from conftest import wait_for
    with cluster.connect(db) as c:
        for u in ["u1", "u2", "u1", None, "u3"]:
            ctx = '{"user_id": "%s"}' % u if u else '{"user": {"id": "u4"}}'
            c.execute("SELECT fraiseql_capture_error('UsersError', 'm', NULL, %s)", (ctx,))
        wait_for(lambda: c.execute("SELECT occurrence_count FROM tb_error_log WHERE error_type = 'UsersError'").fetchone()[0] == 5,
                 timeout=10, what="folded")
        assert c.execute("SELECT users_affected FROM v_error_groups WHERE error_type = 'UsersError'").fetchone()[0] == 4
        # a query that does not select the column does not pay for it
        plan = "\n".join(r[0] for r in c.execute("EXPLAIN (VERBOSE) SELECT error_id, occurrence_count FROM v_error_groups"))
        assert "user_id" not in plan, plan
