"""The capture fast path: the shared group cache and counting by transaction.

Captures of a known group only insert the occurrence row; what they know about
the group comes from a cache in shared memory, and counts are folded from the
occurrences by the transaction that wrote them. These tests check that neither
ever gives a wrong answer: changes made by other sessions are seen, groups from
rolled-back transactions are never used, and every committed occurrence is
counted exactly once.
"""
import psycopg

from conftest import wait_for


def orphans(c) -> int:
    """Occurrences whose group does not exist."""
    return c.execute(
        "SELECT count(*) FROM tb_error_occurrence o"
        " WHERE NOT EXISTS (SELECT 1 FROM tb_error_log g WHERE g.error_id = o.error_id)"
    ).fetchone()[0]


def test_resolution_by_another_session_is_seen(cluster, db):
    with cluster.connect(db) as a, cluster.connect(db) as b:
        gid = a.execute("SELECT fraiseql_capture_error('CacheError', 'resolved elsewhere')").fetchone()[0]
        a.execute("SELECT fraiseql_capture_error('CacheError', 'resolved elsewhere')")  # from the cache
        b.execute("SELECT fraiseql_resolve_error(%s, 'alice', 'fixed')", (gid,))
        a.execute("SELECT fraiseql_capture_error('CacheError', 'resolved elsewhere', occurred_at => clock_timestamp() + interval '1 second')")
        status, regression, count = a.execute(
            "SELECT status, is_regression, regression_count FROM tb_error_log WHERE error_id = %s", (gid,)
        ).fetchone()
        assert (status, regression, count) == ("unresolved", True, 1)


def test_severity_escalation_from_a_cached_group(cluster, db):
    with cluster.connect(db) as a:
        gid = a.execute("SELECT fraiseql_capture_error('SevError', 'x', severity => 'warning')").fetchone()[0]
        a.execute("SELECT fraiseql_capture_error('SevError', 'x', severity => 'warning')")
        a.execute("SELECT fraiseql_capture_error('SevError', 'x', severity => 'critical')")
        assert a.execute("SELECT severity FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0] == "critical"


def test_group_of_a_rolled_back_capture_is_never_used(cluster, db):
    with cluster.connect(db, autocommit=False) as a, cluster.connect(db) as b:
        a.execute("SELECT fraiseql_capture_error('GhostError', 'created then rolled back')")
        a.execute("SELECT fraiseql_capture_error('GhostError', 'created then rolled back')")
        a.rollback()
        # savepoint rolled back inside a transaction that commits
        a.execute("SAVEPOINT s")
        a.execute("SELECT fraiseql_capture_error('GhostError2', 'savepoint rolled back')")
        a.execute("ROLLBACK TO SAVEPOINT s")
        a.execute("SELECT fraiseql_capture_error('OtherError', 'kept')")
        a.commit()
        for conn in (a, b):
            conn.execute("SELECT fraiseql_capture_error('GhostError', 'created then rolled back')")
            conn.execute("SELECT fraiseql_capture_error('GhostError2', 'savepoint rolled back')")
            if conn is a:
                a.commit()
        assert orphans(b) == 0
        assert b.execute(
            "SELECT count(*) FROM v_error_groups WHERE error_type IN ('GhostError', 'GhostError2') AND occurrence_count = 2"
        ).fetchone()[0] == 2


def test_deleted_group_is_created_again(cluster, db):
    with cluster.connect(db) as a, cluster.connect(db) as b:
        first = a.execute("SELECT fraiseql_capture_error('GoneError', 'deleted')").fetchone()[0]
        a.execute("SELECT fraiseql_capture_error('GoneError', 'deleted')")
        b.execute("DELETE FROM tb_error_occurrence WHERE error_id = %s", (first,))
        b.execute("DELETE FROM tb_error_log WHERE error_id = %s", (first,))
        second = a.execute("SELECT fraiseql_capture_error('GoneError', 'deleted')").fetchone()[0]
        assert second != first
        assert orphans(a) == 0
        # also within the deleting transaction itself
        with b.transaction():
            b.execute("DELETE FROM tb_error_occurrence WHERE error_id = %s", (second,))
            b.execute("DELETE FROM tb_error_log WHERE error_id = %s", (second,))
            third = b.execute("SELECT fraiseql_capture_error('GoneError', 'deleted')").fetchone()[0]
        assert third not in (first, second)
        assert orphans(a) == 0


def test_rule_created_by_another_session_applies_at_once(cluster, db):
    with cluster.connect(db) as a, cluster.connect(db) as b:
        a.execute("SELECT fraiseql_capture_error('RuleError', 'before the rule')")
        a.execute("SELECT fraiseql_capture_error('RuleError', 'before the rule')")
        b.execute(
            "INSERT INTO tb_error_notification_config (error_type, channel_type, channel_config, notify_on_new, enabled)"
            " VALUES ('RuleError', 'webhook', '{\"url\": \"http://127.0.0.1:9/hook\"}', false, true)"
        )
        # same fingerprint: the group is cached, only the rule is new
        a.execute("SELECT fraiseql_capture_error('RuleError', 'before the rule')")
        # queued by that capture (the worker may already have tried to deliver it)
        queued = a.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0]
        logged = a.execute("SELECT count(*) FROM tb_error_notification_log").fetchone()[0]
        assert queued + logged >= 1


def test_counts_are_exact_with_long_transactions(cluster, db):
    with cluster.connect(db, autocommit=False) as long, cluster.connect(db) as b:
        gid = b.execute("SELECT fraiseql_capture_error('LongError', 'counted once')").fetchone()[0]
        for _ in range(3):
            long.execute("SELECT fraiseql_capture_error('LongError', 'counted once')")
        for _ in range(2):
            b.execute("SELECT fraiseql_capture_error('LongError', 'counted once')")
        b.execute("SELECT fraiseql_flush_counts()")
        live = "SELECT occurrence_count FROM v_error_groups WHERE error_id = %s"
        assert b.execute(live, (gid,)).fetchone()[0] == 3
        long.commit()
        assert b.execute(live, (gid,)).fetchone()[0] == 6
        for _ in range(3):
            b.execute("SELECT fraiseql_flush_counts()")
            assert b.execute(live, (gid,)).fetchone()[0] == 6

        # folded into the group row once no older transaction is running
        # (the worker's own maintenance may hold the horizon for a moment)
        def folded():
            b.execute("SELECT fraiseql_flush_counts()")
            return b.execute("SELECT occurrence_count FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0] == 6
        wait_for(folded, what="counts folded into tb_error_log")
        assert b.execute(live, (gid,)).fetchone()[0] == 6


def test_rows_from_another_cluster_are_not_counted_twice(cluster, db):
    """Rows restored from a logical dump keep the other cluster's transaction
    ids; those ahead of this cluster's are set aside by the next fold."""
    with cluster.connect(db) as c:
        gid = c.execute("SELECT fraiseql_capture_error('RestoredError', 'from a dump')").fetchone()[0]
        c.execute("SELECT fraiseql_flush_counts()")
        c.execute(
            "INSERT INTO tb_error_occurrence (error_id, error_type, message, environment, capture_xid)"
            " VALUES (%s, 'RestoredError', 'from a dump', 'production', '4000000000')",
            (gid,),
        )

        def set_aside():
            c.execute("SELECT fraiseql_flush_counts()")  # (returns at once while the worker folds)
            return c.execute("SELECT count(*) FROM tb_error_occurrence WHERE capture_xid::text::bigint > 3000000000").fetchone()[0] == 0
        wait_for(set_aside, what="the restored row set aside")
        c.execute("SELECT fraiseql_flush_counts()")
        assert c.execute("SELECT occurrence_count FROM v_error_groups WHERE error_id = %s", (gid,)).fetchone()[0] == 1


def test_capture_ignores_a_hostile_search_path(cluster, db):
    """The capture functions are SECURITY DEFINER without SET search_path: no
    object or operator of the caller's schemas may be used by them."""
    with cluster.connect(db) as c:
        c.execute("CREATE SCHEMA evil")
        c.execute("CREATE TABLE evil.tb_error_occurrence (LIKE tb_error_occurrence)")
        c.execute("CREATE TABLE evil.tb_error_log (LIKE tb_error_log)")
        c.execute("SET search_path = evil, pg_catalog, public")
        gid = c.execute("SELECT public.fraiseql_capture_error('PathError', 'search_path')").fetchone()[0]
        c.execute("SELECT public.fraiseql_capture_error('PathError', 'search_path')")
        assert c.execute("SELECT count(*) FROM evil.tb_error_occurrence").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM public.tb_error_occurrence WHERE error_id = %s", (gid,)).fetchone()[0] == 2
