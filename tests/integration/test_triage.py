"""Triage like Sentry (issue 16): release-aware resolution."""
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
