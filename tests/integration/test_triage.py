"""Triage like Sentry (issue 16): release-aware resolution, archive until a
condition and escalation, alert conditions, merge and unmerge, ownership."""
import time

import psycopg
import pytest

from conftest import wait_for


def capture(c, release=None, n=1):
    for _ in range(n):
        gid = c.execute("SELECT fraiseql_capture_error('CheckoutError', 'cart is empty', release_version => %s)",
                        (release,)).fetchone()[0]
    return gid


def folded(c, gid, count):
    wait_for(lambda: c.execute("SELECT occurrence_count FROM tb_error_log WHERE error_id = %s",
                               (gid,)).fetchone()[0] == count, timeout=10, interval=0.05, what=f"{count} folded")
    return c.execute("SELECT status, is_regression, regressed_in_release, resolved_in_release, resolved_in_next_release"
                     " FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()


def test_resolved_in_a_release_reopens_only_from_that_release_on(cluster, db):
    with cluster.connect(db) as c:
        gid = capture(c, "shop@1.9.0", 2)
        folded(c, gid, 2)
        c.execute("SELECT fraiseql_resolve_error(%s, 'alice', 'null check', in_release => 'v1.10.0')", (gid,))
        # the old release still running, and an occurrence without a release: still resolved
        capture(c, "shop@1.9.0")
        capture(c, None)
        capture(c, "v1.10.0-rc.1")
        assert folded(c, gid, 5) == ("resolved", False, None, "v1.10.0", False)
        # the release named (under another spelling) reopens it
        capture(c, "shop@1.10.0")
        assert folded(c, gid, 6) == ("unresolved", True, "shop@1.10.0", None, False)
        releases = c.execute("SELECT release, regressions, open_regressions FROM v_releases").fetchall()
        assert [r[0] for r in releases] == ["shop@1.9.0", "v1.10.0-rc.1", "shop@1.10.0"]
        assert releases[2][1:] == (1, [gid])
        assert c.execute("SELECT fraiseql_release_key('v1.10.0') > fraiseql_release_key('v1.9.0')").fetchone()[0]
        # resolved again in a later release: a later one still reopens it
        c.execute("SELECT fraiseql_resolve_error(%s, in_release => '1.10.0')", (gid,))
        capture(c, "shop@1.9.0")
        assert folded(c, gid, 7)[0] == "resolved"
        capture(c, "2.0.0")
        assert folded(c, gid, 8)[:3] == ("unresolved", True, "2.0.0")


def test_resolved_in_the_next_release(cluster, db):
    with cluster.connect(db) as c:
        gid = capture(c, "build-a7f3", 2)
        folded(c, gid, 2)
        c.execute("SELECT fraiseql_resolve_error(%s, in_next_release => true)", (gid,))
        capture(c, "build-a7f3", 3)  # the release deployed at the resolution
        assert folded(c, gid, 5) == ("resolved", False, None, None, True)
        capture(c, "build-c9d1")     # first seen after it: the next release
        assert folded(c, gid, 6) == ("unresolved", True, "build-c9d1", None, False)


def test_releases_that_are_not_versions_are_ordered_by_first_seen(cluster, db):
    with cluster.connect(db) as c:
        gid = capture(c, "build-7")
        folded(c, gid, 1)
        # build-9 is not seen yet: it counts as first seen at the resolution
        c.execute("SELECT fraiseql_resolve_error(%s, in_release => 'build-9')", (gid,))
        capture(c, "build-7")
        assert folded(c, gid, 2)[0] == "resolved"
        capture(c, "build-9")
        assert folded(c, gid, 3)[:3] == ("unresolved", True, "build-9")


def test_a_plain_resolution_still_reopens_on_any_occurrence(cluster, db):
    with cluster.connect(db) as c:
        gid = capture(c, "v2.0.0")
        folded(c, gid, 1)
        c.execute("SELECT fraiseql_resolve_error(%s)", (gid,))
        capture(c, "v1.0.0")
        assert folded(c, gid, 2)[:3] == ("unresolved", True, "v1.0.0")


def test_bad_arguments_are_refused_and_change_nothing(cluster, db):
    with cluster.connect(db) as c:
        gid = capture(c, "v1")
        folded(c, gid, 1)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="exclude each other"):
            c.execute("SELECT fraiseql_resolve_error(%s, in_release => 'v2', in_next_release => true)", (gid,))
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="must name a release"):
            c.execute("SELECT fraiseql_resolve_error(%s, in_release => '  ')", (gid,))
        assert c.execute("SELECT status FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0] == "unresolved"


# ---------------------------------------------------------------------------
# Archive until a condition, escalation, and the alert conditions.
# ---------------------------------------------------------------------------
import json  # noqa: E402

from receivers import HttpReceiver  # noqa: E402


@pytest.fixture
def http():
    r = HttpReceiver().start()
    yield r
    r.stop()


def rule(c, url, **cols):
    names = ["channel_type", "channel_config", *cols]
    values = ["webhook", json.dumps({"url": url}), *cols.values()]
    return c.execute(f"INSERT INTO tb_error_notification_config ({', '.join(names)})"
                     f" VALUES ({', '.join(['%s'] * len(names))}) RETURNING config_id", values).fetchone()[0]


def err(c, user=None, context=None, message="payment declined"):
    ctx = context if context is not None else ({"user_id": user} if user else {})
    return c.execute("SELECT fraiseql_capture_error('PaymentError', %s, context => %s)",
                     (message, json.dumps(ctx))).fetchone()[0]


def settled(c, gid, count):
    """Folded to `count`, and every notification that fold queued delivered."""
    folded(c, gid, count)
    wait_for(lambda: c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0,
             timeout=10, interval=0.05, what="queue drained")


def state(c, gid):
    return c.execute("SELECT status, substatus, is_escalating FROM v_error_groups WHERE error_id = %s",
                     (gid,)).fetchone()


def paths(http):
    return sorted(r["path"] for r in http.requests)


def test_archive_until_more_occurrences_escalates_once(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, http.url + "/escalating", notify_on_escalation=True)
        rule(c, http.url + "/every")
        gid = err(c)
        err(c)
        settled(c, gid, 2)
        assert paths(http) == ["/every", "/every"]
        c.execute("SELECT fraiseql_archive_error(%s, until_occurrences => 3, archived_by => 'bob')", (gid,))
        assert state(c, gid) == ("ignored", "archived_until_condition_met", False)
        assert c.execute("SELECT archive_conditions->>'occurrences', archived_by FROM v_error_groups"
                         " WHERE error_id = %s", (gid,)).fetchone() == ("3", "bob")
        err(c)
        err(c)
        settled(c, gid, 4)
        # archived: nobody hears of it
        assert state(c, gid)[0] == "ignored" and paths(http) == ["/every", "/every"]
        err(c)
        settled(c, gid, 5)
        assert state(c, gid) == ("unresolved", "escalating", True)
        assert paths(http) == ["/escalating", "/every", "/every", "/every"]
        esc = next(json.loads(r["body"]) for r in http.requests if r["path"] == "/escalating")
        assert esc["reason"] == "escalating" and esc["error_id"] == str(gid)
        # escalation is said once; a triage action ends it
        err(c)
        settled(c, gid, 6)
        assert paths(http).count("/escalating") == 1
        c.execute("SELECT fraiseql_resolve_error(%s)", (gid,))
        assert state(c, gid)[:3] == ("resolved", None, False)


def test_archive_until_users_counts_sentry_and_sql_users(cluster, db):
    with cluster.connect(db) as c:
        gid = err(c, "u1")
        folded(c, gid, 1)
        c.execute("SELECT fraiseql_archive_error(%s, until_users => 2)", (gid,))
        for _ in range(3):
            err(c, "u1")
        err(c)  # no user
        err(c, "u9", message="another group")
        assert folded(c, gid, 5)[0] == "ignored"
        err(c, context={"user": {"id": "u2", "email": "x@example.com"}})
        assert folded(c, gid, 6)[:2] == ("unresolved", False)
        assert state(c, gid)[1:] == ("escalating", True)
        assert c.execute("SELECT users_affected FROM v_error_groups WHERE error_id = %s", (gid,)).fetchone()[0] == 2


def test_archive_until_a_rate(cluster, db):
    with cluster.connect(db) as c:
        gid = err(c)
        folded(c, gid, 1)
        c.execute("SELECT fraiseql_archive_error(%s, until_rate => 2, rate_window => '3 seconds')", (gid,))
        err(c)
        folded(c, gid, 2)
        time.sleep(4)
        err(c)  # one within the window: still archived
        assert folded(c, gid, 3)[0] == "ignored"
        err(c)  # two within it
        assert folded(c, gid, 4)[0] == "unresolved"
        assert state(c, gid)[1] == "escalating"


def test_archive_for_an_interval_ends_without_escalating(cluster, db):
    with cluster.connect(db) as c:
        gid = err(c)
        folded(c, gid, 1)
        c.execute("SELECT fraiseql_archive_error(%s, for_interval => '1 second', until_occurrences => 100)", (gid,))
        assert state(c, gid)[0] == "ignored"
        # the worker comes back for it, with no occurrence to wake it
        wait_for(lambda: state(c, gid)[0] == "unresolved", timeout=15, what="archive ended")
        assert state(c, gid)[1:] == ("ongoing", False) or state(c, gid)[1:] == ("new", False)
        assert c.execute("SELECT archive_conditions FROM v_error_groups WHERE error_id = %s", (gid,)).fetchone()[0] == {}


def test_plain_ignore_stays_silent_and_never_reopens(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, http.url + "/every")
        rule(c, http.url + "/milestone", notify_on_occurrence=[3])
        gid = err(c)
        settled(c, gid, 1)
        c.execute("SELECT fraiseql_ignore_error(%s)", (gid,))
        c.execute("SELECT fraiseql_archive_error(%s)", (gid,))  # no condition: the same
        for _ in range(4):
            err(c)
        settled(c, gid, 5)
        assert state(c, gid) == ("ignored", "archived_forever", False)
        assert paths(http) == ["/every"]


def test_archive_arguments_are_checked(cluster, db):
    with cluster.connect(db) as c:
        gid = err(c)
        folded(c, gid, 1)
        for args in ("until_occurrences => 0", "until_users => -1", "for_interval => '-1 hour'",
                     "until_rate => 5, rate_window => '0'", "for_interval => 'infinity'::timestamptz - now()"):
            with pytest.raises(psycopg.errors.Error):
                c.execute(f"SELECT fraiseql_archive_error(%s, {args})", (gid,))
        assert state(c, gid)[0] == "unresolved"
        with pytest.raises(psycopg.errors.NoDataFound):
            c.execute("SELECT fraiseql_archive_error(gen_random_uuid(), until_occurrences => 1)")


def test_frequency_rule_fires_once_per_crossing(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, http.url + "/freq", frequency_threshold=3, frequency_window="2 seconds")
        gid = err(c)
        for n in range(2, 4):
            err(c)
        settled(c, gid, 3)
        assert paths(http) == []  # three is not more than three
        err(c)
        settled(c, gid, 4)
        assert paths(http) == ["/freq"]
        body = http.json(0)
        assert body["reason"] == "frequency" and body["frequency"]["more_than_occurrences"] == 3
        for _ in range(4):
            err(c)
            c.execute("SELECT fraiseql_flush_counts()")
        settled(c, gid, 8)
        assert paths(http) == ["/freq"]  # still over it: no second message
        time.sleep(2.5)  # the window empties
        for _ in range(4):
            err(c)
        settled(c, gid, 12)
        assert paths(http) == ["/freq", "/freq"]


def test_users_threshold_and_skip_if_assigned(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, http.url + "/users", users_threshold=1, frequency_window="1 hour")
        rule(c, http.url + "/unowned", skip_if_assigned=True)
        gid = err(c, "u1")
        for _ in range(2):
            err(c, "u1")
        settled(c, gid, 3)
        assert paths(http) == ["/unowned"] * 3
        c.execute("SELECT fraiseql_assign_error(%s, 'carol')", (gid,))
        err(c, context={"user": {"id": "u2"}})
        settled(c, gid, 4)
        assert paths(http) == ["/unowned"] * 3 + ["/users"]
        err(c, "u3")  # already over it
        settled(c, gid, 5)
        assert paths(http).count("/users") == 1
        c.execute("SELECT fraiseql_assign_error(%s, NULL)", (gid,))
        err(c, "u3")
        settled(c, gid, 6)
        assert paths(http).count("/unowned") == 4


def test_alert_condition_columns_are_checked(cluster, db):
    with cluster.connect(db) as c:
        for cols, match in (({"frequency_threshold": 10}, "need frequency_window"),
                            ({"frequency_window": "1 hour"}, "need frequency_window"),
                            ({"frequency_threshold": 10, "frequency_window": "0"}, "positive"),
                            ({"users_threshold": 10, "frequency_window": "60 days"}, "at most 30 days"),
                            ({"frequency_threshold": 1, "frequency_window": "1 hour", "notify_on_occurrence": [5]},
                             "milestone")):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match=match):
                rule(c, "http://127.0.0.1:9/x", **cols)
        assert c.execute("SELECT count(*) FROM tb_error_notification_config").fetchone()[0] == 0


# ---------------------------------------------------------------------------
# Merge and unmerge.
# ---------------------------------------------------------------------------
import threading  # noqa: E402


def grp(c, kind, n=1, user=None):
    gid = None
    for _ in range(n):
        gid = c.execute("SELECT fraiseql_capture_error(%s, 'broken ' || %s, context => %s)",
                        (kind, kind, json.dumps({"user_id": user} if user else {}))).fetchone()[0]
    return gid


def exact(c):
    """Every group's stored count is the number of its occurrences (its own and its merged fingerprints')."""
    # unmerges settled and everything folded (a fold of the worker's may be running: then ours does nothing)
    wait_for(lambda: c.execute("SELECT fraiseql_flush_counts() >= 0 AND NOT EXISTS (SELECT FROM tb_error_unmerge_request)"
                               " AND NOT EXISTS (SELECT FROM _fraiseql_unfolded)"
                               " AND NOT EXISTS (SELECT FROM tb_error_count_pending)").fetchone()[0],
             timeout=10, interval=0.05, what="settled")
    return c.execute("""
        SELECT g.error_type, g.occurrence_count,
               (SELECT count(*) FROM tb_error_occurrence o WHERE o.error_id = ANY (fraiseql_error_group_ids(g.error_id)))
          FROM tb_error_log g ORDER BY 1""").fetchall()


def test_merge_moves_counts_and_later_captures(cluster, db):
    with cluster.connect(db) as c:
        a = grp(c, "A", 3, "u1")
        b = grp(c, "B", 2, "u2")
        cc = grp(c, "C", 1, "u1")
        folded(c, cc, 1)
        assert c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s, %s, %s]::uuid[], 'dana')", (a, b, cc, a)).fetchone()[0] == 2
        rows = c.execute("SELECT error_id, occurrence_count, users_affected FROM v_error_groups").fetchall()
        assert rows == [(a, 6, 2)]
        # the merged fingerprints' new occurrences land in the target
        assert grp(c, "B") == b  # (a capture still returns its fingerprint's id)
        assert c.execute("SELECT occurrence_count FROM v_error_groups WHERE error_id = %s", (a,)).fetchone()[0] == 7
        folded(c, a, 7)
        assert exact(c) == [("A", 7, 7)]
        # the old id leads to the target
        c.execute("SELECT fraiseql_resolve_error(%s, 'dana')", (b,))
        assert c.execute("SELECT status FROM tb_error_log WHERE error_id = %s", (a,)).fetchone()[0] == "resolved"
        assert {r[0] for r in c.execute("SELECT error_id FROM monitoring.errors").fetchall()} == {a}
        assert c.execute("SELECT error_id, occurrences FROM fraiseql_panel_top_errors(now() - interval '1 hour', now() + interval '1 hour')"
                         ).fetchall() == [(a, 7)]
        merges = c.execute("SELECT source_id, merged_by, occurrences_stored FROM v_error_merges ORDER BY occurrences_stored").fetchall()
        assert merges == [(cc, "dana", 1), (b, "dana", 3)]
        # a regression of the merged fingerprint reopens the target
        grp(c, "C")
        assert folded(c, a, 8)[:2] == ("unresolved", True)


def test_unmerge_gives_the_fingerprint_its_own_group_for_good(cluster, db):
    with cluster.connect(db) as c:
        a = grp(c, "A", 3)
        b = grp(c, "B", 4)
        folded(c, b, 4)
        c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (a, b))
        grp(c, "B", 2)
        folded(c, a, 9)
        # one of B's occurrences deleted while merged, not folded yet
        c.execute("DELETE FROM monitoring.errors WHERE id = (SELECT id FROM monitoring.errors"
                  " WHERE exception_type = 'B' ORDER BY occurred_at LIMIT 1)")
        fp = c.execute("SELECT error_fingerprint FROM v_error_groups WHERE error_id = %s", (a,)).fetchone()[0]
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not merged into"):
            c.execute("SELECT fraiseql_unmerge_error(%s, %s)", (a, fp))
        fpb = c.execute("SELECT fingerprint FROM v_error_merges").fetchone()[0]
        assert c.execute("SELECT fraiseql_unmerge_error(%s, %s)", (a, fpb)).fetchone()[0] == b
        assert exact(c) == [("A", 3, 3), ("B", 5, 5)]
        assert sorted(c.execute("SELECT error_type, occurrence_count FROM v_error_groups").fetchall()) == [("A", 3), ("B", 5)]
        # it stays separate
        grp(c, "B", 3)
        folded(c, b, 8)
        assert exact(c) == [("A", 3, 3), ("B", 8, 8)]
        assert c.execute("SELECT count(*) FROM v_error_merges").fetchone()[0] == 0


def test_merge_chains_and_bad_arguments(cluster, db):
    with cluster.connect(db) as c:
        a = grp(c, "A")
        b = grp(c, "B", 2)
        d = grp(c, "D", 3)
        folded(c, d, 3)
        c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (a, b))
        c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (d, a))
        assert exact(c) == [("D", 6, 6)]
        assert sorted(r[0] for r in c.execute("SELECT target_id FROM v_error_merges").fetchall()) == [d, d]
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="nothing to merge"):
            c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (d, b))  # b is d already
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            c.execute("SELECT fraiseql_merge_errors(%s, '{}')", (d,))
        with pytest.raises(psycopg.errors.NoDataFound):
            c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[gen_random_uuid()])", (d,))
        fpb = c.execute("SELECT fingerprint FROM v_error_merges WHERE source_id = %s", (b,)).fetchone()[0]
        c.execute("SELECT fraiseql_unmerge_error(%s, %s)", (d, fpb))
        assert exact(c) == [("B", 2, 2), ("D", 4, 4)]
        # a target deleted by hand frees what was merged into it
        c.execute("DELETE FROM tb_error_log WHERE error_id = %s", (d,))
        assert c.execute("SELECT count(*) FROM v_error_merges").fetchone()[0] == 0


def test_merge_and_unmerge_under_concurrent_captures_stay_exact(cluster, db):
    with cluster.connect(db) as c:
        a = grp(c, "A")
        b = grp(c, "B")
        folded(c, b, 1)
        stop = threading.Event()
        done = []

        def capture_loop(kind):
            with cluster.connect(db) as w:
                n = 0
                while not stop.is_set():
                    with w.transaction():
                        w.execute("SELECT fraiseql_capture_error(%s, 'broken ' || %s)", (kind, kind))
                        w.execute("SELECT fraiseql_capture_error(%s, 'broken ' || %s)", (kind, kind))
                    n += 2
                done.append(n)

        threads = [threading.Thread(target=capture_loop, args=(k,)) for k in ("A", "B", "B")]
        for t in threads:
            t.start()
        fpb = c.execute("SELECT error_fingerprint FROM tb_error_log WHERE error_id = %s", (b,)).fetchone()[0]
        for _ in range(5):
            time.sleep(0.3)
            c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (a, b))
            time.sleep(0.3)
            c.execute("SELECT fraiseql_unmerge_error(%s, %s)", (a, fpb))
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        total = 2 + sum(done)
        wait_for(lambda: sum(r[1] for r in exact(c)) == total, timeout=10, what="all folded")
        assert [r[1] == r[2] for r in exact(c)] == [True, True]


# ---------------------------------------------------------------------------
# Ownership rules.
# ---------------------------------------------------------------------------
PAY = 'Traceback (most recent call last):\n  File "/app/src/payments/charge.py", line 42, in charge\n    x()\nValueError: declined'


def test_ownership_rules_assign_new_groups(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, http.url + "/new-unowned", notify_on_new=True, skip_if_assigned=True)
        c.execute("SELECT fraiseql_add_ownership_rule('path:src/payments/*', 'payments')")
        c.execute("SELECT fraiseql_add_ownership_rule('type:Timeout*', 'infra')")
        c.execute("SELECT fraiseql_add_ownership_rule('tags.customer:acme*', 'acme-team')")
        c.execute("SELECT fraiseql_add_ownership_rule('url:*/checkout*', 'checkout')")
        cases = {
            "payments": ("ValueError", "declined", PAY, {}),
            "infra": ("TimeoutError", "db slow", None, {}),
            "acme-team": ("KeyError", "sku", None, {"tags": {"customer": "acme-eu"}}),
            "checkout": ("KeyError", "cart", None, {"request": {"url": "https://shop.example/checkout/pay"}}),
            None: ("KeyError", "nobody's", None, {"tags": {"customer": "globex"}}),
        }
        ids = {}
        for owner, (t, m, st, ctx) in cases.items():
            ids[owner] = c.execute("SELECT fraiseql_capture_error(%s, %s, %s, %s)", (t, m, st, json.dumps(ctx))).fetchone()[0]
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_log").fetchone()[0] == 5, what="groups made")
        for owner, gid in ids.items():
            assert c.execute("SELECT assigned_to FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0] == owner
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0, what="delivered")
        assert paths(http) == ["/new-unowned"]  # only the group nobody owns
        # the last matching rule wins; existing groups keep their assignee
        c.execute("SELECT fraiseql_add_ownership_rule('path:*/charge.py', 'billing')")
        assert c.execute("SELECT assigned_to FROM tb_error_log WHERE error_id = %s", (ids["payments"],)).fetchone()[0] == "payments"
        gid = c.execute("SELECT fraiseql_capture_error('ValueError', 'refund', %s)", (PAY.replace("in charge", "in refund"),)).fetchone()[0]
        wait_for(lambda: c.execute("SELECT assigned_to FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone(), what="group")
        assert c.execute("SELECT assigned_to FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0] == "billing"
        # patterns are globs, never regular expressions
        c.execute("SELECT fraiseql_add_ownership_rule('type:Bad(Error', 'x')")
        assert c.execute("SELECT regex FROM tb_ownership_rule ORDER BY rule_id DESC LIMIT 1").fetchone()[0] == r"^Bad\(Error$"
        for bad in ("paths:x", "tags.:x", "type:", "nonsense"):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                c.execute("SELECT fraiseql_add_ownership_rule(%s, 'x')", (bad,))
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            c.execute("SELECT fraiseql_add_ownership_rule('type:A', ' ')")
        c.execute("DROP ROLE IF EXISTS owner_rule_intruder")
        c.execute("CREATE ROLE owner_rule_intruder LOGIN")
    try:
        with cluster.connect(db, user="owner_rule_intruder") as c2:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c2.execute("SELECT fraiseql_add_ownership_rule('type:*', 'intruder')")
    finally:
        with cluster.connect(db) as c:
            c.execute("DROP ROLE owner_rule_intruder")


def test_triage_by_the_readmes_support_role_and_nobody_else(cluster, db):
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    grant = re.search(r"(GRANT EXECUTE ON FUNCTION fraiseql_resolve_error[^;]*TO support_role;)", readme, re.S).group(1)
    with cluster.connect(db) as c:
        a = grp(c, "A", 2)
        b = grp(c, "B")
        folded(c, b, 1)
        for r in ("support_role", "nobody_role"):
            c.execute(f"DROP ROLE IF EXISTS {r}")
            c.execute(f"CREATE ROLE {r} LOGIN")
        c.execute(grant)
        c.execute("GRANT SELECT ON tb_error_log, v_error_groups TO support_role")
    try:
        with cluster.connect(db, user="nobody_role") as n:
            for call in ("fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", "fraiseql_archive_error(%s, until_users => 1)"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    n.execute(f"SELECT {call}", (a, b) if "merge" in call else (a,))
        with cluster.connect(db, user="support_role") as s:
            s.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[], 'support')", (a, b))
            s.execute("SELECT fraiseql_archive_error(%s, until_occurrences => 5)", (a,))
            assert s.execute("SELECT status, occurrence_count FROM v_error_groups").fetchall() == [("ignored", 3)]
        with cluster.connect(db) as c:
            c_fp = c.execute("SELECT fingerprint FROM v_error_merges").fetchone()[0]
        with cluster.connect(db, user="support_role") as s:
            assert s.execute("SELECT fraiseql_unmerge_error(%s, %s)", (a, c_fp)).fetchone()[0] == b
            # the rules stay out of reach
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                s.execute("SELECT * FROM tb_error_notification_config")
    finally:
        with cluster.connect(db) as c:
            for r in ("support_role", "nobody_role"):
                c.execute(f"DROP OWNED BY {r}")
                c.execute(f"DROP ROLE {r}")


# ---------------------------------------------------------------------------
# The review's attacks on the above.
# ---------------------------------------------------------------------------
def test_a_merge_left_open_delays_only_its_groups(cluster, db):
    with cluster.connect(db) as c, cluster.connect(db, autocommit=False) as m:
        a = grp(c, "A")
        b = grp(c, "B")
        other = grp(c, "Other")
        folded(c, other, 1)
        m.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (a, b))  # and the transaction stays open
        grp(c, "Other", 2)
        grp(c, "New")
        assert folded(c, other, 3)  # the worker folds the others meanwhile
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_log WHERE error_type = 'New'").fetchone()[0] == 1,
                 timeout=10, what="a new group made")
        grp(c, "B", 2)  # counted by folds that do not see the merge yet
        c.execute("SELECT pg_sleep(1.5)")
        m.commit()
        assert dict((t, n) for t, n, _ in exact(c)) == {"A": 4, "New": 1, "Other": 3}
        assert [r[1] == r[2] for r in exact(c)] == [True] * 3


def test_archive_counts_new_occurrences_not_deletes_or_merges(cluster, db):
    with cluster.connect(db) as c:
        a = grp(c, "A", 5)
        b = grp(c, "B", 10)
        folded(c, b, 10)
        c.execute("SELECT fraiseql_archive_error(%s, until_occurrences => 3)", (a,))
        c.execute("DELETE FROM monitoring.errors WHERE exception_type = 'A'")  # retention took them
        c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (a, b))  # ten more at once
        grp(c, "A", 2)
        assert folded(c, a, 12)[0] == "ignored"
        grp(c, "A")
        assert folded(c, a, 13)[0] == "unresolved"
        assert state(c, a)[1] == "escalating"


def test_a_deleted_target_gives_back_its_merged_fingerprints(cluster, db):
    with cluster.connect(db) as c:
        a = grp(c, "A", 2)
        b = grp(c, "B", 3)
        folded(c, b, 3)
        c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (a, b))
        c.execute("DELETE FROM tb_error_log WHERE error_id = %s", (a,))
        wait_for(lambda: c.execute("SELECT occurrence_count FROM tb_error_log WHERE error_id = %s", (b,)).fetchone(),
                 timeout=10, what="B made again")
        assert exact(c) == [("B", 3, 3)]
        c.execute("TRUNCATE tb_error_log")
        assert c.execute("SELECT count(*) FROM tb_error_merge").fetchone()[0] == 0


def test_a_fingerprint_rule_follows_its_fingerprint_into_a_merge(cluster, db, http):
    with cluster.connect(db) as c:
        a = grp(c, "A")
        b = grp(c, "B")
        folded(c, b, 1)
        fpb = c.execute("SELECT error_fingerprint FROM tb_error_log WHERE error_id = %s", (b,)).fetchone()[0]
        rule(c, http.url + "/b", error_fingerprint=fpb)
        rule(c, http.url + "/b-milestone", error_fingerprint=fpb, notify_on_occurrence=[4])
        c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (a, b))
        grp(c, "B")
        grp(c, "A")
        settled(c, a, 4)
        assert paths(http) == ["/b", "/b", "/b-milestone"]  # the B and the A occurrence: the group is B's too


def test_extreme_windows_and_thresholds_are_refused_or_harmless(cluster, db, http):
    with cluster.connect(db) as c:
        a = grp(c, "A")
        folded(c, a, 1)
        for args in ("until_rate => 1, rate_window => '300000 years'", "until_users => 1, users_window => '31 days'",
                     "for_interval => '11 years'"):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                c.execute(f"SELECT fraiseql_archive_error(%s, {args})", (a,))
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("UPDATE tb_error_log SET archive_rate_window = '300000 years'")
        # thresholds are bounded (each fold reads at most threshold + 1 rows)
        with pytest.raises(psycopg.errors.CheckViolation):
            rule(c, http.url + "/never", frequency_threshold=2147483647, frequency_window="1 hour")
        rule(c, http.url + "/never", frequency_threshold=10000, users_threshold=10000, frequency_window="30 days")
        rule(c, http.url + "/every")
        grp(c, "A", 2)
        settled(c, a, 3)
        assert paths(http) == ["/every", "/every"]


def test_frequency_crossing_is_not_fooled_by_late_rows_or_other_environments(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, http.url + "/prod", frequency_threshold=2, frequency_window="1 hour", environment=["production"])

        def cap(env, ago="0"):
            return c.execute("SELECT fraiseql_capture_error('E', 'x', environment => %s,"
                             " occurred_at => now() - %s::interval)", (env, ago)).fetchone()[0]
        gid = cap("staging")
        for _ in range(4):
            cap("staging")  # the other environment does not count for the rule
        settled(c, gid, 5)
        assert paths(http) == []
        for _ in range(3):
            cap("production")
        settled(c, gid, 8)
        assert paths(http) == ["/prod"]
        cap("production", "40 minutes")  # late: an SDK's queue, an old timestamp
        cap("production", "50 minutes")
        settled(c, gid, 10)
        assert paths(http) == ["/prod"]


def test_milestones_are_not_announced_twice_after_an_unmerge(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, http.url + "/m", notify_on_occurrence=[3, 5])
        a = grp(c, "A", 2)
        b = grp(c, "B", 2)
        folded(c, b, 2)
        c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (a, b))
        grp(c, "A")  # 5: crossed
        settled(c, a, 5)
        fpb = c.execute("SELECT fingerprint FROM v_error_merges").fetchone()[0]
        c.execute("SELECT fraiseql_unmerge_error(%s, %s)", (a, fpb))
        exact(c)
        grp(c, "A", 2)  # 3 again, then 5 again: nothing new
        settled(c, a, 5)
        assert [json.loads(r["body"])["milestone"] for r in http.requests] == [5]


def test_a_huge_user_id_cannot_stop_the_fold(cluster, db):
    import os
    with cluster.connect(db) as c:
        a = grp(c, "A")
        folded(c, a, 1)
        huge = os.urandom(6000).hex()  # incompressible, far over a btree entry's limit
        c.execute("SELECT fraiseql_capture_error('A', 'broken A', context => %s)", (json.dumps({"user": {"id": huge}}),))
        c.execute("SELECT fraiseql_capture_error('A', 'broken A', context => %s)", (json.dumps({"user_id": huge}),))
        grp(c, "A")
        folded(c, a, 4)
        assert c.execute("SELECT users_affected FROM v_error_groups WHERE error_id = %s", (a,)).fetchone()[0] == 1


def test_a_triage_transaction_left_open_stops_no_fold(cluster, db):
    with cluster.connect(db) as c, cluster.connect(db, autocommit=False) as t:
        a = grp(c, "A", 2)
        b = grp(c, "B", 3)
        other = grp(c, "Other")
        folded(c, b, 3)
        c.execute("SELECT fraiseql_merge_errors(%s, ARRAY[%s]::uuid[])", (a, b))
        fpb = c.execute("SELECT fingerprint FROM v_error_merges").fetchone()[0]
        # someone holds the target's row (an assignment not committed) ...
        t.execute("SELECT fraiseql_assign_error(%s, 'eve')", (a,))
        # ... while an unmerge and deletes of its rows are settled
        c.execute("SELECT fraiseql_unmerge_error(%s, %s)", (a, fpb))
        c.execute("DELETE FROM monitoring.errors WHERE id = (SELECT id FROM monitoring.errors"
                  " WHERE exception_type = 'A' LIMIT 1)")
        grp(c, "Other", 2)
        assert folded(c, other, 3)  # folds go on
        wait_for(lambda: c.execute("SELECT occurrence_count FROM tb_error_log WHERE error_id = %s", (b,)).fetchone(),
                 timeout=10, what="B made again while A is held")
        t.commit()
        assert exact(c) == [("A", 1, 1), ("B", 3, 3), ("Other", 3, 3)]


def test_the_fold_waits_for_a_restore_to_finish(cluster, db):
    with cluster.connect(db) as c:
        a = grp(c, "A")
        folded(c, a, 1)
        # a restore in progress, by a session still connected
        with cluster.connect(db) as r:
            pid = r.execute("SELECT pg_backend_pid()").fetchone()[0]
            c.execute("INSERT INTO tb_restore_session (pid, backend_start, xid) SELECT pid, backend_start, pg_current_xact_id()"
                      " FROM pg_stat_activity WHERE pid = %s", (pid,))
            grp(c, "A")
            assert c.execute("SELECT fraiseql_flush_counts()").fetchone()[0] == 0
            assert c.execute("SELECT occurrence_count FROM tb_error_log WHERE error_id = %s", (a,)).fetchone()[0] == 1
        # its session gone, the restore is over and folds resume
        folded(c, a, 2)


def test_a_backlog_is_folded_in_bounded_folds(cluster, db):
    with cluster.connect(db) as c:
        for _ in range(3):  # three transactions of 30,000 captures, over the per-fold budget together
            c.execute("SELECT fraiseql_capture_error('Backlog', 'x' || (i % 7)) FROM generate_series(1, 30000) i")
        c.execute("SELECT fraiseql_capture_error('Backlog', 'x1')")
        wait_for(lambda: c.execute("SELECT NOT EXISTS (SELECT FROM _fraiseql_unfolded)").fetchone()[0],
                 timeout=60, interval=0.2, what="the backlog folded")
        assert c.execute("SELECT sum(occurrence_count) FROM v_error_groups").fetchone()[0] == 90001
        rows = exact(c)
        assert len(rows) == 7 and all(n == m for _, n, m in rows) and sum(n for _, n, _ in rows) == 90001


def test_a_rule_writer_with_insert_and_select_adds_ownership_rules(cluster, db):
    with cluster.connect(db) as c:
        c.execute("DROP ROLE IF EXISTS owner_writer")
        c.execute("CREATE ROLE owner_writer LOGIN")
        c.execute("GRANT INSERT, SELECT ON tb_ownership_rule TO owner_writer")  # (as the README says)
    try:
        with cluster.connect(db, user="owner_writer") as w:
            w.execute("SELECT fraiseql_add_ownership_rule('type:Owned*', 'team-a')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege), w.transaction():
                w.execute("LOCK TABLE tb_ownership_rule IN ACCESS EXCLUSIVE MODE")
        with cluster.connect(db) as c:
            gid = c.execute("SELECT fraiseql_capture_error('OwnedError', 'mine')").fetchone()[0]
            wait_for(lambda: c.execute("SELECT assigned_to FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone(),
                     what="group made")
            assert c.execute("SELECT assigned_to FROM tb_error_log WHERE error_id = %s", (gid,)).fetchone()[0] == "team-a"
    finally:
        with cluster.connect(db) as c:
            c.execute("DROP OWNED BY owner_writer")
            c.execute("DROP ROLE owner_writer")
