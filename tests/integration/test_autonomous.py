"""Autonomous captures (issue 15, part 1): `autonomous => true` stores the
occurrence through the shared queue the worker drains, so it survives the
caller's rollback -- the PL/pgSQL pattern that captures in an EXCEPTION block
and re-raises. The test cluster's queue is small (256 kB, conftest) so that
its limits can be shown."""
import threading

import psycopg
import pytest

from conftest import wait_for

DEMO = """
CREATE FUNCTION create_order_demo(qty int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF qty <= 0 THEN RAISE EXCEPTION 'quantity must be positive, got %', qty USING ERRCODE = 'check_violation'; END IF;
EXCEPTION WHEN OTHERS THEN
  PERFORM fraiseql_capture_error(SQLSTATE, SQLERRM, NULL, autonomous => true);
  RAISE;
END $$;
"""


def count_of(c, error_type, message):
    row = c.execute("SELECT occurrence_count FROM v_error_groups"
                    " WHERE error_id = fraiseql_error_id(fraiseql_fingerprint(%s, %s, NULL))",
                    (error_type, message)).fetchone()
    return row[0] if row else 0


def stats(c):
    names = ("capacity_bytes", "used_bytes", "waiting", "queued", "stored", "dropped", "failed")
    return dict(zip(names, c.execute("SELECT * FROM fraiseql_autonomous_stats()").fetchone()))


def test_the_issue_demo_leaves_a_group(cluster, db):
    with cluster.connect(db) as c:
        c.execute(DEMO)
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("SELECT create_order_demo(-1)")
        wait_for(lambda: count_of(c, "23514", "quantity must be positive, got -1") == 1,
                 timeout=10, interval=0.05, what="the autonomous capture stored")
        # stored once, by the worker, and counted by the fold like any capture
        wait_for(lambda: c.execute("SELECT status, occurrence_count FROM tb_error_log"
                                   " WHERE error_type = '23514'").fetchone() == ("unresolved", 1),
                 timeout=10, interval=0.05, what="the group folded")


def test_survives_rollback_where_a_transactional_capture_does_not(cluster, db):
    with cluster.connect(db, autocommit=False) as c:
        c.execute("SELECT fraiseql_capture_error('AutoError', 'kept', autonomous => true)")
        c.execute("SELECT fraiseql_capture_error('TxError', 'gone')")
        c.execute("SELECT fraiseql_capture_message('kept message', autonomous => true)")
        c.rollback()
    with cluster.connect(db) as c:
        wait_for(lambda: count_of(c, "AutoError", "kept") == 1, timeout=10, interval=0.05, what="stored")
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_occurrence WHERE message = 'kept message'"
                                   " AND error_type = 'Message'").fetchone()[0] == 1, timeout=10, what="message stored")
        assert c.execute("SELECT count(*) FROM tb_error_occurrence WHERE error_type = 'TxError'").fetchone()[0] == 0
        # what the caller gave is what is stored
        row = c.execute("SELECT severity, environment, context FROM tb_error_occurrence"
                        " WHERE error_type = 'AutoError'").fetchone()
        assert row == ("error", "production", {})


def test_every_field_reaches_the_row(cluster, db):
    with cluster.connect(db, autocommit=False) as c:
        gid = c.execute("""SELECT fraiseql_capture_error('FieldError', 'all fields', 'Traceback: line 1',
                             '{"user_id": "u-9", "n": [1, 2]}', 'staging', 'warning', 'v1.2.3',
                             '0af7651916cd43dd8448eb211c80319c', 'b7ad6b7169203331', 'custom-fp',
                             '2026-12-01 10:00:00+00', autonomous => true)""").fetchone()[0]
        c.rollback()
    with cluster.connect(db) as c:
        q = ("SELECT error_id, fingerprint, occurred_at = '2026-12-01 10:00:00+00', stack_trace, context, environment,"
             " severity, release_version, trace_id, span_id FROM tb_error_occurrence WHERE error_type = 'FieldError'")
        row = wait_for(lambda: c.execute(q).fetchone(), timeout=10, interval=0.05, what="stored")
        assert row[0] == gid
        assert row[2:] == (True, "Traceback: line 1", {"user_id": "u-9", "n": [1, 2]}, "staging", "warning",
                           "v1.2.3", "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")


def test_bad_input_is_refused_at_the_call(cluster, db):
    """Validation happens in the caller, as for any capture: nothing half-made is queued."""
    with cluster.connect(db) as c:
        before = stats(c)["queued"]
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            c.execute("SELECT fraiseql_capture_error('E', 'm', context => '[1]', autonomous => true)")
        assert stats(c)["queued"] == before


def test_a_capture_too_large_for_the_queue_is_dropped_visibly(cluster, db):
    with cluster.connect(db) as c:
        before = stats(c)
        notices = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        big = "x" * (200 * 1024)  # over half of the 256 kB queue
        c.execute("SELECT fraiseql_capture_error('BigError', 'too big', %s, autonomous => true)", (big,))
        after = stats(c)
        assert after["dropped"] == before["dropped"] + 1
        assert any("queue is full" in n for n in notices), notices
        # and the queue still works for others
        c.execute("SELECT fraiseql_capture_error('SmallError', 'fits', autonomous => true)")
        wait_for(lambda: count_of(c, "SmallError", "fits") == 1, timeout=10, interval=0.05, what="stored")
        assert count_of(c, "BigError", "too big") == 0


def test_storm_of_failing_statements_is_counted_or_visibly_dropped(cluster, db):
    with cluster.connect(db) as c:
        c.execute("""CREATE FUNCTION failing(i int) RETURNS void LANGUAGE plpgsql AS $$
                     BEGIN
                       PERFORM 1 / (i - i);
                     EXCEPTION WHEN OTHERS THEN
                       PERFORM fraiseql_capture_error(SQLSTATE, SQLERRM, NULL, autonomous => true);
                       RAISE;
                     END $$""")
        before = stats(c)

    def storm():
        with cluster.connect(db) as s:
            for i in range(500):
                with pytest.raises(psycopg.errors.DivisionByZero):
                    s.execute("SELECT failing(%s)", (i,))
    threads = [threading.Thread(target=storm) for _ in range(4)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not any(t.is_alive() for t in threads)
    with cluster.connect(db) as c:
        def settled():
            s = stats(c)
            done = s["waiting"] == 0 and count_of(c, "22012", "division by zero") == s["stored"] - before["stored"]
            return done and s
        s = wait_for(settled, timeout=30, interval=0.1, what="the queue drained and counted")
        stored, dropped = s["stored"] - before["stored"], s["dropped"] - before["dropped"]
        assert stored + dropped == 2000, (stored, dropped)
        assert count_of(c, "22012", "division by zero") == stored
        assert stored > 0


def test_a_session_cannot_poison_the_queue_with_a_huge_environment(cluster, db):
    # any role may set fraiseql_obs.environment; a value too long for the
    # occurrence table's index must not fail the worker's batch, and with it
    # other sessions' captures
    with cluster.connect(db) as bad, cluster.connect(db) as good:
        bad.execute("SET fraiseql_obs.environment = '%s'" % ("x" * 5000))
        for i in range(5):
            bad.execute("SELECT fraiseql_capture_error('PoisonError', %s, autonomous => true)", (f"m{i}",))
            good.execute("SELECT fraiseql_capture_error('GoodError', %s, autonomous => true)", (f"m{i}",))
        wait_for(lambda: good.execute("SELECT count(*) FROM tb_error_occurrence WHERE error_type = 'GoodError'").fetchone()[0] == 5,
                 timeout=10, interval=0.05, what="the good captures stored")
        envs = bad.execute("SELECT DISTINCT length(environment) FROM tb_error_occurrence WHERE error_type = 'PoisonError'").fetchall()
        assert envs and all(n <= 64 for (n,) in envs), envs
        assert stats(good)["failed"] == 0


def test_a_row_that_cannot_be_stored_does_not_take_its_batch_with_it(cluster, db):
    with cluster.connect(db) as c:
        c.execute("""CREATE FUNCTION public.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN IF NEW.message = 'poison' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$""")
        c.execute("CREATE TRIGGER refuse_poison BEFORE INSERT ON tb_error_occurrence FOR EACH ROW EXECUTE FUNCTION public.refuse_poison()")
        before = stats(c)
        with c.transaction():
            # queued together, taken in one batch
            for m in ("a", "poison", "b", "c"):
                c.execute("SELECT fraiseql_capture_error('BatchError', %s, autonomous => true)", (m,))
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_occurrence WHERE error_type = 'BatchError'").fetchone()[0] == 3,
                 timeout=10, interval=0.05, what="the three good rows")
        s = wait_for(lambda: (lambda s: s["failed"] > before["failed"] and s)(stats(c)), timeout=20, what="the bad row given up")
        assert s["failed"] - before["failed"] == 1 and s["waiting"] == 0
        c.execute("DROP TRIGGER refuse_poison ON tb_error_occurrence")


def test_one_database_cannot_take_the_queue_from_another(cluster, db):
    """The queue is shared by the cluster's databases. The owner of another
    database (or its worker, slow or stuck) must not make this database's
    autonomous captures drop: a database's waiting entries hold at most half
    of the queue, and an entry stored frees its space even behind one that
    still waits."""
    other = cluster.new_database()
    try:
        with cluster.connect(other) as a, cluster.connect(db) as b:
            # the other database's worker is stuck storing its first entry
            a.execute("""CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS $$
                         BEGIN IF NEW.message = 'slow' THEN PERFORM pg_sleep(6); END IF; RETURN NEW; END $$""")
            a.execute("CREATE TRIGGER slow BEFORE INSERT ON tb_error_occurrence FOR EACH ROW EXECUTE FUNCTION public.slow()")
            a.execute("SELECT fraiseql_capture_error('StuckError', 'slow', autonomous => true)")
            wait_for(lambda: a.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                       " AND wait_event = 'PgSleep' AND backend_type LIKE 'fraiseql_obs%'").fetchone()[0] == 1,
                     timeout=10, interval=0.05, what="the other database's worker stuck")
            # meanwhile that database queues as much as it can (60 kB each)
            big = "x" * (60 * 1024)
            dropped_there = 0
            notices = []
            a.add_notice_handler(lambda d: notices.append(d.message_primary))
            for i in range(5):
                a.execute("SELECT fraiseql_capture_error('FloodError', %s, %s, autonomous => true)", (f"m{i}", big))
            dropped_there = sum("queue is full" in n for n in notices)
            assert dropped_there >= 3, notices  # at most half of the 256 kB queue
            # this database's captures, one after another, all stored
            for i in range(8):
                b.execute("SELECT fraiseql_capture_error('MineError', %s, %s, autonomous => true)", (f"m{i}", big))
                wait_for(lambda: b.execute("SELECT count(*) FROM tb_error_occurrence WHERE error_type = 'MineError'").fetchone()[0] == i + 1,
                         timeout=10, interval=0.05, what=f"capture {i} stored")
            # and the other database loses nothing it was given room for
            wait_for(lambda: a.execute("SELECT count(*) FROM tb_error_occurrence WHERE error_type IN ('StuckError', 'FloodError')").fetchone()[0]
                     == 1 + 5 - dropped_there, timeout=20, interval=0.1, what="the other database's captures stored")
    finally:
        with cluster.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")
