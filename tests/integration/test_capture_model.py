"""The capture model: the occurrence row is the outbox.

A capture inserts one occurrence row and nothing else; its error_id is derived
from the fingerprint (UUIDv5), so it never needs the group row. The fold (run
by the worker, woken when a capture commits) creates the groups of new
fingerprints, counts, takes back deleted rows, decides regressions,
severity, milestones and rules, on committed rows only. These tests check
that this gives the right answer under every isolation level, two-phase
commit, rollbacks, deletes, concurrent pruning, long transactions and many
sessions capturing one new fingerprint at once.
"""
import threading
import time

import psycopg
import pytest

from conftest import wait_for


def folded(c, gid, **expected):
    """Waits until the worker's fold has brought the group row to `expected`."""
    cols = ", ".join(expected)

    def check():
        row = c.execute(f"SELECT {cols} FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()
        return row is not None and dict(zip(expected, row)) == expected
    wait_for(check, timeout=10, interval=0.05, what=f"group {gid} folded to {expected}")


def group_of(c, fingerprint_type, message):
    return c.execute("SELECT fraiseql_error_id(fraiseql_fingerprint(%s, %s, NULL))",
                     (fingerprint_type, message)).fetchone()[0]


def test_error_id_is_derived_from_the_fingerprint(cluster, db):
    with cluster.connect(db) as c:
        gid = c.execute("SELECT fraiseql_capture_error('IdError', 'derived id')").fetchone()[0]
        assert gid == group_of(c, "IdError", "derived id")
        folded(c, gid, occurrence_count=1)
        fp = c.execute("SELECT error_fingerprint FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0]
        assert c.execute("SELECT fraiseql_error_id(%s)", (fp,)).fetchone()[0] == gid


def test_regression_is_decided_by_the_fold(cluster, db):
    with cluster.connect(db) as a, cluster.connect(db) as b:
        gid = a.execute("SELECT fraiseql_capture_error('RegrError', 'came back')").fetchone()[0]
        folded(a, gid, occurrence_count=1)
        b.execute("SELECT fraiseql_resolve_error(%s, 'alice', 'fixed')", (gid,))
        # dated before the resolution: not a regression
        a.execute("SELECT fraiseql_capture_error('RegrError', 'came back', occurred_at => now() - interval '1 minute')")
        folded(a, gid, occurrence_count=2, status="resolved", is_regression=False)
        a.execute("SELECT fraiseql_capture_error('RegrError', 'came back', occurred_at => clock_timestamp() + interval '1 second')")
        folded(a, gid, occurrence_count=3, status="unresolved", is_regression=True, regression_count=1)


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_regression_under_snapshot_isolation(cluster, db, isolation):
    """The capturing transaction's snapshot saw the group unresolved; the
    fold, not the snapshot, decides."""
    with cluster.connect(db, autocommit=False) as a, cluster.connect(db) as b:
        gid = b.execute("SELECT fraiseql_capture_error('IsoError', 'snapshot')").fetchone()[0]
        folded(b, gid, occurrence_count=1)
        a.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        assert a.execute("SELECT status FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0] == "unresolved"
        b.execute("SELECT fraiseql_resolve_error(%s, 'bob')", (gid,))
        a.execute("SELECT fraiseql_capture_error('IsoError', 'snapshot', occurred_at => clock_timestamp() + interval '1 second')")
        a.commit()
        folded(b, gid, occurrence_count=2, status="unresolved", is_regression=True, regression_count=1)


def test_prepared_transaction(cluster, db):
    """A prepared capture is counted when it commits, and delays nobody
    else's counts meanwhile."""
    with cluster.connect(db, autocommit=False) as a, cluster.connect(db) as b:
        gid = b.execute("SELECT fraiseql_capture_error('TwoPhaseError', 'prepared')").fetchone()[0]
        folded(b, gid, occurrence_count=1)
        b.execute("SELECT fraiseql_resolve_error(%s, 'carol')", (gid,))
        a.execute("SELECT fraiseql_capture_error('TwoPhaseError', 'prepared', occurred_at => clock_timestamp() + interval '1 second')")
        a.execute("PREPARE TRANSACTION 'fraiseql_obs_it_2pc'")
        try:
            other = b.execute("SELECT fraiseql_capture_error('TwoPhaseOther', 'meanwhile')").fetchone()[0]
            folded(b, other, occurrence_count=1)
            b.execute("SELECT fraiseql_capture_error('TwoPhaseOther', 'meanwhile')")
            folded(b, other, occurrence_count=2)
            assert b.execute("SELECT status, occurrence_count FROM tb_error_log WHERE error_id = %s",
                             (gid,)).fetchone() == ("resolved", 1)
        finally:
            b.execute("COMMIT PREPARED 'fraiseql_obs_it_2pc'")
        folded(b, gid, occurrence_count=2, status="unresolved", is_regression=True)


def test_severity_only_rises(cluster, db):
    with cluster.connect(db) as a:
        gid = a.execute("SELECT fraiseql_capture_error('SevError', 'x', severity => 'warning')").fetchone()[0]
        a.execute("SELECT fraiseql_capture_error('SevError', 'x', severity => 'critical')")
        a.execute("SELECT fraiseql_capture_error('SevError', 'x', severity => 'info')")
        folded(a, gid, occurrence_count=3, severity="critical")


def test_rolled_back_capture_makes_no_group_and_notifies_nobody(cluster, db):
    with cluster.connect(db, autocommit=False) as a, cluster.connect(db) as b:
        b.execute(
            "INSERT INTO tb_error_notification_config (channel_type, channel_config, notify_on_new, enabled)"
            " VALUES ('pg_notify', '{\"channel\": \"it_ghost\"}', true, true)"
        )
        ghost = group_of(b, "GhostError", "rolled back")
        ghost2 = group_of(b, "GhostError2", "savepoint rolled back")
        a.execute("SELECT fraiseql_capture_error('GhostError', 'rolled back')")
        a.rollback()
        a.execute("SAVEPOINT s")
        a.execute("SELECT fraiseql_capture_error('GhostError2', 'savepoint rolled back')")
        a.execute("ROLLBACK TO SAVEPOINT s")
        kept = a.execute("SELECT fraiseql_capture_error('OtherError', 'kept')").fetchone()[0]
        a.commit()
        folded(b, kept, occurrence_count=1)
        wait_for(lambda: b.execute("SELECT count(*) FROM tb_error_notification_log WHERE error_id = %s",
                                   (kept,)).fetchone()[0] >= 1, what="the kept capture notified")
        for gid in (ghost, ghost2):
            assert b.execute("SELECT count(*) FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0] == 0
            assert b.execute("SELECT count(*) FROM v_error_groups WHERE error_id = %s", (gid,)).fetchone()[0] == 0
            assert b.execute("SELECT (SELECT count(*) FROM tb_notification_queue WHERE error_id = %s)"
                             " + (SELECT count(*) FROM tb_error_notification_log WHERE error_id = %s)",
                             (gid, gid)).fetchone()[0] == 0


def test_deleted_group_is_made_again(cluster, db):
    with cluster.connect(db) as a, cluster.connect(db) as b:
        gid = a.execute("SELECT fraiseql_capture_error('GoneError', 'deleted')").fetchone()[0]
        a.execute("SELECT fraiseql_capture_error('GoneError', 'deleted')")
        folded(a, gid, occurrence_count=2)
        b.execute("DELETE FROM tb_error_occurrence WHERE error_id = %s", (gid,))
        b.execute("DELETE FROM tb_error_log WHERE error_id = %s", (gid,))
        assert a.execute("SELECT fraiseql_capture_error('GoneError', 'deleted')").fetchone()[0] == gid
        folded(a, gid, occurrence_count=1)
        # within the deleting transaction itself
        with b.transaction():
            b.execute("DELETE FROM tb_error_occurrence WHERE error_id = %s", (gid,))
            b.execute("DELETE FROM tb_error_log WHERE error_id = %s", (gid,))
            b.execute("SELECT fraiseql_capture_error('GoneError', 'deleted')")
        folded(a, gid, occurrence_count=1)


def test_rule_created_by_another_session_applies_at_once(cluster, db):
    with cluster.connect(db) as a, cluster.connect(db) as b:
        gid = a.execute("SELECT fraiseql_capture_error('RuleError', 'before the rule')").fetchone()[0]
        folded(a, gid, occurrence_count=1)
        b.execute(
            "INSERT INTO tb_error_notification_config (error_type, channel_type, channel_config, notify_on_new, enabled)"
            " VALUES ('RuleError', 'pg_notify', '{\"channel\": \"it_rule\"}', false, true)"
        )
        a.execute("SELECT fraiseql_capture_error('RuleError', 'after the rule')")
        a.execute("SELECT fraiseql_capture_error('RuleError', 'before the rule')")
        wait_for(lambda: a.execute("SELECT (SELECT count(*) FROM tb_notification_queue WHERE error_id = %s)"
                                   " + (SELECT count(*) FROM tb_error_notification_log WHERE error_id = %s)",
                                   (gid, gid)).fetchone()[0] >= 1, timeout=5, what="the new rule applied")


def test_counts_are_exact_with_long_transactions(cluster, db):
    with cluster.connect(db, autocommit=False) as long, cluster.connect(db) as b:
        gid = b.execute("SELECT fraiseql_capture_error('LongError', 'counted once')").fetchone()[0]
        for _ in range(3):
            long.execute("SELECT fraiseql_capture_error('LongError', 'counted once')")
        for _ in range(2):
            b.execute("SELECT fraiseql_capture_error('LongError', 'counted once')")
        live = "SELECT occurrence_count FROM v_error_groups WHERE error_id = %s"
        assert b.execute(live, (gid,)).fetchone()[0] == 3
        # the open transaction delays only its own rows
        folded(b, gid, occurrence_count=3)
        long.commit()
        assert b.execute(live, (gid,)).fetchone()[0] == 6
        folded(b, gid, occurrence_count=6)
        for _ in range(3):
            b.execute("SELECT fraiseql_flush_counts()")
            assert b.execute(live, (gid,)).fetchone()[0] == 6


def test_rows_from_another_cluster_are_not_counted_twice(cluster, db):
    """Rows restored from a logical dump keep the other cluster's transaction
    ids; those ahead of this cluster's are set aside by the next fold."""
    with cluster.connect(db) as c:
        gid = c.execute("SELECT fraiseql_capture_error('RestoredError', 'from a dump')").fetchone()[0]
        folded(c, gid, occurrence_count=1)
        fp = c.execute("SELECT error_fingerprint FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0]
        c.execute(
            "INSERT INTO tb_error_occurrence (error_id, fingerprint, error_type, message, environment, capture_xid)"
            " VALUES (%s, %s, 'RestoredError', 'from a dump', 'production', '4000000000')",
            (gid, fp),
        )

        def set_aside():
            c.execute("SELECT fraiseql_flush_counts()")  # (returns at once while the worker folds)
            return c.execute("SELECT count(*) FROM tb_error_occurrence WHERE capture_xid::text::bigint > 3000000000").fetchone()[0] == 0
        wait_for(set_aside, what="the restored row set aside")
        c.execute("SELECT fraiseql_flush_counts()")
        assert c.execute("SELECT occurrence_count FROM v_error_groups WHERE error_id = %s", (gid,)).fetchone()[0] == 1


def test_capture_ignores_a_hostile_search_path(cluster, db):
    """No object or operator of the caller's schemas may be used by capture."""
    with cluster.connect(db) as c:
        c.execute("CREATE SCHEMA evil")
        c.execute("CREATE TABLE evil.tb_error_occurrence (LIKE tb_error_occurrence)")
        c.execute("CREATE TABLE evil.tb_error_log (LIKE tb_error_log)")
        c.execute("SET search_path = evil, pg_catalog, public")
        gid = c.execute("SELECT public.fraiseql_capture_error('PathError', 'search_path')").fetchone()[0]
        c.execute("SELECT public.fraiseql_capture_error('PathError', 'search_path')")
        assert c.execute("SELECT count(*) FROM evil.tb_error_occurrence").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM public.tb_error_occurrence WHERE error_id = %s", (gid,)).fetchone()[0] == 2


def test_no_convoy_on_a_new_fingerprint(cluster, db):
    """16 sessions capture one new fingerprint; one of them keeps its
    transaction open. No other waits (a wait would hit statement_timeout)."""
    with cluster.connect(db) as c:
        c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, notify_on_new, enabled)"
                  " VALUES ('pg_notify', '{\"channel\": \"it_convoy\"}', true, true)")
    held = cluster.connect(db, autocommit=False)
    gid = held.execute("SELECT fraiseql_capture_error('ConvoyError', 'one new fingerprint')").fetchone()[0]
    errors = []

    def capture():
        try:
            with cluster.connect(db) as s:
                s.execute("SET statement_timeout = '2s'")
                for _ in range(5):
                    s.execute("SELECT fraiseql_capture_error('ConvoyError', 'one new fingerprint')")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=capture) for _ in range(15)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        with cluster.connect(db) as c:
            # the group is made from the committed rows while one is still open
            folded(c, gid, occurrence_count=75)
            assert c.execute("SELECT occurrence_count FROM v_error_groups WHERE error_id = %s", (gid,)).fetchone()[0] == 75
            time.sleep(max(0.0, 10 - (time.monotonic() - started)))
            held.commit()
            folded(c, gid, occurrence_count=76)
            # notified as new once
            wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_notification_log WHERE error_id = %s",
                                       (gid,)).fetchone()[0] >= 1, what="the new group notified")
            assert c.execute("SELECT (SELECT count(*) FROM tb_notification_queue WHERE error_id = %s)"
                             " + (SELECT count(*) FROM tb_error_notification_log WHERE error_id = %s)",
                             (gid, gid)).fetchone()[0] == 1
    finally:
        held.close()


@pytest.mark.parametrize("through", ["monitoring.errors", "tb_error_occurrence"])
def test_deletes_are_counted_at_once(cluster, db, through):
    with cluster.connect(db) as c:
        gid = None
        for i in range(5):
            gid = c.execute("SELECT fraiseql_capture_error('DelError', 'five', occurred_at => now() - %s * interval '1 minute')",
                            (i,)).fetchone()[0]
        folded(c, gid, occurrence_count=5)
        latest = c.execute("SELECT max(occurred_at) FROM tb_error_occurrence WHERE error_id = %s", (gid,)).fetchone()[0]
        c.execute(f"DELETE FROM {through} WHERE error_id = %s AND occurred_at < %s", (gid, latest))
        assert c.execute("SELECT occurrence_count FROM v_error_groups WHERE error_id = %s", (gid,)).fetchone()[0] == 1
        folded(c, gid, occurrence_count=1, first_seen=latest, last_seen=latest)
        # a delete that rolls back takes nothing back
        with pytest.raises(psycopg.errors.RaiseException):
            with c.transaction():
                c.execute(f"DELETE FROM {through} WHERE error_id = %s", (gid,))
                c.execute("DO $$ BEGIN RAISE EXCEPTION 'undo'; END $$")
        c.execute("SELECT fraiseql_capture_error('DelError', 'five')")
        folded(c, gid, occurrence_count=2)


def test_a_group_pruned_during_a_capture_loses_nothing(cluster, db):
    """Pruning deletes a group with no occurrence left; a capture of it that
    commits meanwhile is counted into the group made again."""
    with cluster.connect(db) as a, cluster.connect(db, autocommit=False) as pruner:
        gid = a.execute("SELECT fraiseql_capture_error('PruneError', 'pruned')").fetchone()[0]
        folded(a, gid, occurrence_count=1)
        a.execute("DELETE FROM tb_error_occurrence WHERE error_id = %s", (gid,))
        folded(a, gid, occurrence_count=0)
        pruner.execute("DELETE FROM tb_error_log WHERE error_id = %s", (gid,))  # holds the row
        a.execute("SELECT fraiseql_capture_error('PruneError', 'pruned')")
        wait_for(lambda: a.execute("SELECT count(*) FROM tb_error_count_pending WHERE error_id = %s",
                                   (gid,)).fetchone()[0] == 1, what="the count pending behind the prune")
        pruner.commit()
        folded(a, gid, occurrence_count=1)
        assert a.execute("SELECT occurrence_count FROM v_error_groups WHERE error_id = %s", (gid,)).fetchone()[0] == 1


def counts_exact(c):
    """The stored and the live group counts equal the rows (after a fold)."""
    c.execute("SELECT fraiseql_flush_counts()")
    raw = dict(c.execute("SELECT error_id, count(*) FROM tb_error_occurrence GROUP BY 1").fetchall())
    stored = dict(c.execute("SELECT error_id, occurrence_count FROM tb_error_log").fetchall())
    live = dict(c.execute("SELECT error_id, occurrence_count FROM v_error_groups").fetchall())
    nonzero = lambda d: {k: v for k, v in d.items() if v}  # noqa: E731
    return nonzero(stored) == raw and nonzero(live) == raw and raw


def rollups_exact(c):
    """The error rollups equal the rows (after a roll-up round)."""
    if "busy" in c.execute("SELECT fraiseql_refresh_rollups()").fetchone()[0]:
        return False
    raw = dict(c.execute("SELECT error_id, count(*) FROM tb_error_occurrence GROUP BY 1").fetchall())
    hours = dict(c.execute("SELECT error_id, sum(occurrences)::bigint FROM tb_rollup_error_hour"
                           " GROUP BY 1 HAVING sum(occurrences) > 0").fetchall())
    minutes = c.execute("SELECT coalesce(sum(occurrences), 0) FROM tb_rollup_error_minute").fetchone()[0]
    return hours == raw and minutes == sum(raw.values())


def test_a_partition_dropped_by_hand_is_recounted(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SET fraiseql_obs.error_retention_months = 12")
        part = c.execute("SELECT create_error_occurrence_partition((date_trunc('month', now()) - interval '4 months')::date)").fetchone()[0]
        for at, n in (("date_trunc('month', now()) - interval '4 months' + interval '1 day'", 4), ("now()", 3)):
            for _ in range(n):
                c.execute(f"SELECT fraiseql_capture_error('HandDrop', 'x', occurred_at => {at})")
        c.execute(f"SELECT fraiseql_capture_error('HandDropOld', 'y', occurred_at => date_trunc('month', now()) - interval '4 months' + interval '2 days')")
        wait_for(lambda: counts_exact(c), what="counts equal to the rows")
        wait_for(lambda: rollups_exact(c), what="rollups equal to the rows")
        c.execute(f"DROP TABLE {part}")
        assert c.execute("SELECT count(*) FROM tb_error_occurrence").fetchone()[0] == 3
        wait_for(lambda: counts_exact(c), what="counts equal to the remaining rows")
        wait_for(lambda: rollups_exact(c), what="rollups equal to the remaining rows")
        # what the extension cannot see, recounted on request
        other = c.execute("SELECT partition_name FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass"
                          " AND NOT is_default AND now() >= lower_bound AND now() < upper_bound").fetchone()[0]
        c.execute(f"DELETE FROM {other} WHERE ctid = (SELECT min(ctid) FROM {other})")
        assert not counts_exact(c)
        c.execute("SELECT fraiseql_recount()")
        wait_for(lambda: counts_exact(c), what="counts recounted on request")
        wait_for(lambda: rollups_exact(c), what="rollups rebuilt on request")
        # other tables' drops ask for nothing
        c.execute("CREATE TABLE unrelated (x int)")
        c.execute("DROP TABLE unrelated")
        assert c.execute("SELECT count(*) FROM tb_recount_request").fetchone()[0] == 0
        # a role that may create tables beside the extension's cannot make
        # every fold recount by dropping look-alikes of its own
        c.execute(f"CREATE ROLE lookalike_{db} LOGIN")
        c.execute(f"GRANT CREATE ON SCHEMA public TO lookalike_{db}")
        c.execute(f"GRANT SELECT ON tb_recount_request TO lookalike_{db}")
        try:
            # (in one transaction, so that the worker cannot take a request first)
            for user, expected in ((f"lookalike_{db}", 0), ("postgres", 2)):
                with cluster.connect(db, user=user, autocommit=False) as x:
                    x.execute("CREATE TABLE public.tb_error_occurrence_2099_01 (x int)")
                    x.execute("DROP TABLE public.tb_error_occurrence_2099_01")
                    assert x.execute("SELECT count(*) FROM tb_recount_request").fetchone()[0] == expected, user
                    x.rollback()
        finally:
            c.execute(f"REVOKE SELECT ON tb_recount_request FROM lookalike_{db}")
            c.execute(f"REVOKE CREATE ON SCHEMA public FROM lookalike_{db}")
            c.execute(f"DROP ROLE lookalike_{db}")


def test_retention_keeps_counts_and_rollups_exact(cluster, db):
    """drop_old_error_occurrence_partitions() and the removal of old rows from
    the default partition give their rows back: the group counts and the
    rollups agree with the rows that remain."""
    with cluster.connect(db) as c:
        c.execute("SET fraiseql_obs.error_retention_months = 12")
        c.execute("SELECT create_error_occurrence_partition((date_trunc('month', now()) - interval '8 months')::date)")
        old = "date_trunc('month', now()) - interval '8 months' + interval '3 days'"
        for t, m, at, n in (("RetError", "a", old, 3), ("RetError", "a", "now()", 2),
                            ("RetOld", "old", old, 2), ("Ancient", "x", "now()", 1)):
            for _ in range(n):
                c.execute(f"SELECT fraiseql_capture_error(%s, %s, occurred_at => {at})", (t, m))
        # rows past any retention in the default partition (restored from an old dump, say)
        c.execute("INSERT INTO tb_error_occurrence (error_id, fingerprint, error_type, message, environment, occurred_at)"
                  " SELECT error_id, fingerprint, error_type, message, environment, now() - interval '3 years'"
                  " FROM tb_error_occurrence, generate_series(1, 2) WHERE error_type = 'Ancient'")
        c.execute("SET fraiseql_obs.error_retention_months = 6")

        wait_for(lambda: counts_exact(c), what="counts equal to the rows")
        wait_for(lambda: "busy" not in c.execute("SELECT fraiseql_refresh_rollups()").fetchone()[0], what="a roll-up")

        dropped = c.execute("SELECT count(*) FROM drop_old_error_occurrence_partitions(6) WHERE dropped").fetchone()[0]
        c.execute("SELECT fraiseql_run_maintenance()")  # the default partition's old rows
        assert c.execute("SELECT count(*) FROM tb_error_occurrence").fetchone()[0] == 3
        # (the worker's maintenance may have dropped the partition first)
        assert dropped in (0, 1)
        assert c.execute("SELECT count(*) FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass"
                         " AND upper_bound <= date_trunc('month', now()) - interval '6 months'").fetchone()[0] == 0
        wait_for(lambda: counts_exact(c), what="counts equal to the remaining rows")

        wait_for(lambda: rollups_exact(c), what="rollups equal to the remaining rows")


def test_retention_drop_beside_a_reader_is_no_deadlock(cluster, db):
    """A fold reads the occurrences (the parent's lock, then each
    partition's) while drop_old locks the partition it drops and waits for
    the parent's: the reader must still get the partition."""
    with cluster.connect(db) as c, cluster.connect(db, autocommit=False) as reader:
        # (taken first: the worker's own maintenance cannot drop it meanwhile)
        reader.execute("LOCK TABLE ONLY tb_error_occurrence IN ACCESS SHARE MODE")
        c.execute("SET fraiseql_obs.error_retention_months = 12")
        part = c.execute("SELECT create_error_occurrence_partition((date_trunc('month', now()) - interval '8 months')::date)").fetchone()[0]
        c.execute("SELECT fraiseql_capture_error('DropRace', 'x', occurred_at => date_trunc('month', now()) - interval '8 months' + interval '1 day')")
        wait_for(lambda: counts_exact(c), what="counted")
        result = {}

        def drop():
            try:
                with cluster.connect(db) as d:
                    d.execute("SET lock_timeout = '20s'")
                    result["dropped"] = d.execute("SELECT count(*) FROM drop_old_error_occurrence_partitions(6)").fetchone()[0]
            except Exception as e:  # noqa: BLE001 (asserted below)
                result["error"] = e
        t = threading.Thread(target=drop)
        t.start()
        # the dropper (this thread, or the worker's maintenance) now holds
        # the partition and waits for the parent
        try:
            wait_for(lambda: c.execute("SELECT count(*) FROM pg_locks WHERE NOT granted"
                                       " AND relation = 'tb_error_occurrence'::regclass").fetchone()[0],
                     what="a drop waiting for the parent")
        except AssertionError:
            raise AssertionError((result, c.execute("SELECT l.locktype, l.relation::regclass::text, l.mode, a.backend_type, left(a.query, 60), a.wait_event"
                                                    " FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT l.granted").fetchall(),
                                  c.execute("SELECT to_regclass(%s)", (part,)).fetchone()))
        reader.execute("SET statement_timeout = '5s'")
        assert reader.execute(f"SELECT count(*) FROM {part}").fetchone()[0] == 1
        reader.commit()
        t.join(30)
        assert "error" not in result, result
        wait_for(lambda: c.execute("SELECT to_regclass(%s) IS NULL", (part,)).fetchone()[0], what="the partition dropped")
        c.execute("SELECT fraiseql_flush_counts()")
        wait_for(lambda: c.execute("SELECT coalesce(sum(occurrence_count), 0) FROM tb_error_log").fetchone()[0] == 0,
                 what="the dropped row given back")
        assert c.execute("SELECT coalesce(sum(occurrence_count), 0) FROM v_error_groups").fetchone()[0] == 0


def test_captures_with_rules_fold_in_batches_and_claim_no_deliveries(cluster, db):
    """A capture while rules exist asks for a fold at commit; the request
    stays set until the worker folds, so a stream of captures costs a fold
    every few milliseconds, not a round (and a delivery claim) per commit.
    Deliveries are looked for when something was queued, and every
    flush_interval (100 ms here) for retries."""
    with cluster.connect(db) as c:
        c.execute(f"ALTER DATABASE {db} SET track_functions = 'all'")
        c.execute("INSERT INTO tb_error_notification_config (error_type, channel_type, channel_config)"
                  " VALUES ('NoSuchError', 'pg_notify', '{\"channel\": \"nothing\"}')")
        q = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'fraiseql_obs worker' AND datname = %s"
        old = wait_for(lambda: c.execute(q, (db,)).fetchone()[0], what="the worker")
        c.execute("SELECT pg_terminate_backend(%s)", (old,))  # the next one reads track_functions
        c.execute("SELECT fraiseql_capture_error('BatchError', 'first')")
        wait_for(lambda: (c.execute(q, (db,)).fetchone() or [old])[0] != old, what="a new worker")

        def calls(fn):
            c.execute("SELECT pg_stat_clear_snapshot()")
            return c.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = %s",
                             (fn,)).fetchone()[0]
        time.sleep(1.5)  # the worker's statistics are reported at most every second
        claims0, folds0 = calls("_fraiseql_claim_deliveries"), calls("fraiseql_flush_counts")
        stop = time.monotonic() + 3
        captured = [0] * 4

        def capture(i):
            with cluster.connect(db) as w:
                while time.monotonic() < stop:
                    w.execute("SELECT fraiseql_capture_error('BatchError', 'stream')")
                    captured[i] += 1
        threads = [threading.Thread(target=capture, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        gid = group_of(c, "BatchError", "stream")
        folded(c, gid, occurrence_count=sum(captured))
        time.sleep(1.5)
        claims, folds = calls("_fraiseql_claim_deliveries") - claims0, calls("fraiseql_flush_counts") - folds0
        # ~3.5 s of polling at 100 ms, with room for a loaded machine; one
        # claim per commit would be thousands
        assert claims <= 60, (claims, sum(captured))
        assert folds < sum(captured) / 4, (folds, sum(captured))
        assert sum(captured) > 300
