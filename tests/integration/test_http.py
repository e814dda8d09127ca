"""The HTTP service (issue 14): Sentry SDKs, OTLP/HTTP and Prometheus talk to
the database directly. A cluster of its own, with a listener for database
`ingest` on a loopback port; the real sentry-sdk sends to it."""
import gzip
import http.client
import json
import os
import pathlib
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import zlib

import psycopg
import pytest

from conftest import ROOT, Cluster, free_port, wait_for

MAX_CONNECTIONS = 32


@pytest.fixture(scope="module")
def svc():
    path = pathlib.Path(f"/tmp/fraiseql_obs_http_{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    port, hport = free_port(), free_port()
    conf = [
        "fraiseql_obs.flush_interval = 100",
        "fraiseql_obs.launcher_naptime = 1",
        f"fraiseql_obs.http_listen = 'ingest@127.0.0.1:{hport}'",
        f"fraiseql_obs.http_max_connections = {MAX_CONNECTIONS}",
        "fraiseql_obs.http_max_event_size = '256kB'",
    ]
    subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "start", str(path), str(port), *conf], check=True)
    c = Cluster(path, port)
    with c.connect() as conn:
        conn.execute("CREATE DATABASE ingest")
    with c.connect("ingest") as conn:
        conn.execute("CREATE EXTENSION fraiseql_obs")
    # the worker retries its connection until the database exists
    wait_for(lambda: request(hport, "GET", "/health")[0] == 200, timeout=30, what="the HTTP service")
    c.hport = hport
    try:
        yield c
    finally:
        subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "stop", str(path)], check=False)
        if os.environ.get("KEEP_TEST_CLUSTER") != "1":
            shutil.rmtree(path, ignore_errors=True)


def request(port, method, path, body=b"", headers=None, timeout=30):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), data
    except (ConnectionError, OSError):
        return None, {}, b""


def project(svc, name, **kw):
    """A new project: its DSN, public key and id."""
    args = ", ".join(f"{k} => %s" for k in kw)
    with svc.connect("ingest") as c:
        dsn = c.execute(f"SELECT fraiseql_create_project(%s{', ' + args if args else ''})",
                        [name, *kw.values()]).fetchone()[0]
    key = dsn.split("//")[1].split("@")[0]
    pid = int(dsn.rsplit("/", 1)[1])
    return dsn, key, pid


def secret(svc, public_key):
    """The secret key that goes with a public key (OTLP, /metrics)."""
    with svc.connect("ingest") as c:
        return c.execute("SELECT secret_key FROM v_projects WHERE public_key = %s", [public_key]).fetchone()[0]


def envelope(event, dsn=None, event_id=None):
    header = {"event_id": event_id or event.get("event_id") or uuid.uuid4().hex}
    if dsn:
        header["dsn"] = dsn
    payload = json.dumps(event).encode()
    return (json.dumps(header) + "\n" + json.dumps({"type": "event", "length": len(payload)}) + "\n").encode() + payload + b"\n"


def auth(key):
    return {"X-Sentry-Auth": f"Sentry sentry_key={key}, sentry_version=7, sentry_client=test/1.0",
            "Content-Type": "application/x-sentry-envelope"}


def occurrences(svc, where="true", params=()):
    with svc.connect("ingest") as c:
        return c.execute(f"SELECT count(*) FROM tb_error_occurrence WHERE {where}", params).fetchone()[0]


SDK_SCRIPT = textwrap.dedent('''
    import sys, sentry_sdk
    dsn, algo, release = sys.argv[1], sys.argv[2], sys.argv[3]
    sentry_sdk.init(dsn=dsn, release=release, traces_sample_rate=1.0,
                    _experiments={"transport_compression_algo": algo} if algo != "none" else {})
    sentry_sdk.set_user({"id": "user-" + algo})
    sentry_sdk.set_tag("algo", algo)

    def load_cart(cart_id):
        return {"a": 1}[cart_id]

    def checkout(cart_id):
        return load_cart(cart_id)

    with sentry_sdk.start_transaction(name="POST /checkout", op="http.server"):
        for cart in ["x1", "x2"]:
            try:
                checkout(cart)
            except KeyError:
                sentry_sdk.capture_exception()
    sentry_sdk.capture_message("payment provider slow")
    sentry_sdk.flush(10)
''')


@pytest.mark.parametrize("algo", ["br", "gzip", "none"])
def test_the_official_python_sdk(svc, algo):
    """sentry-sdk, unchanged but for its DSN: exceptions grouped by their
    frames, a message, a transaction as spans; brotli, gzip or no compression."""
    dsn, key, pid = project(svc, f"py-{algo}")
    release = f"shop@1.0.{len(algo)}"
    out = subprocess.run([sys.executable, "-c", SDK_SCRIPT, dsn, algo, release],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with svc.connect("ingest") as c:
        rows = wait_for(lambda: (lambda r: r if len(r) == 3 else None)(c.execute(
            "SELECT error_type, message, environment, release_version, context, stack_trace, error_id "
            "FROM tb_error_occurrence WHERE context #>> '{sentry,project_id}' = %s ORDER BY occurred_at",
            [str(pid)]).fetchall()), what="three occurrences")
        kinds = sorted(r[0] for r in rows)
        assert kinds == ["KeyError", "KeyError", "Message"]
        errs = [r for r in rows if r[0] == "KeyError"]
        # two carts, one group: the in-app frames decide, not the message
        assert errs[0][6] == errs[1][6]
        assert {r[1] for r in errs} == {"'x1'", "'x2'"}
        e = errs[0]
        assert e[2] == "production"  # the SDK's own default
        assert e[3] == release
        assert e[4]["user"]["id"] == f"user-{algo}"
        assert e[4]["tags"]["algo"] == algo
        assert e[4]["sentry"]["sdk"]["name"] == "sentry.python"
        assert "in load_cart" in e[5] and "in checkout" in e[5]
        # groups are the project's own
        total, users = c.execute(
            "SELECT count(*), count(DISTINCT context #>> '{user,id}') FROM tb_error_occurrence WHERE error_id = %s",
            [e[6]]).fetchone()
        group = wait_for(lambda: (lambda g: g if g and g[0] == total else None)(c.execute(
            "SELECT occurrence_count, culprit, users_affected FROM v_error_groups WHERE error_id = %s",
            [e[6]]).fetchone()), what="the group's count")
        assert total == 2 and users == 1
        assert "load_cart" in (group[1] or "")
        assert group[2] == users
        # the transaction, as spans of the same trace as the errors
        trace_id = e[4]["contexts"]["trace"]["trace_id"]
        spans = c.execute("SELECT operation_name FROM monitoring.traces WHERE trace_id = %s", [trace_id]).fetchall()
        assert ("POST /checkout",) in spans


def test_keys_wrong_missing_revoked_and_rotated(svc):
    dsn, key, pid = project(svc, "keys")
    ev = {"message": "hello", "event_id": uuid.uuid4().hex}
    path = f"/api/{pid}/envelope/"
    assert request(svc.hport, "POST", path, envelope(ev), {"Content-Type": "application/x-sentry-envelope"})[0] == 401
    assert request(svc.hport, "POST", path, envelope(ev), auth("0" * 32))[0] == 403
    # another project's key does not open this one
    _, other_key, _ = project(svc, "other")
    assert request(svc.hport, "POST", path, envelope(ev), auth(other_key))[0] == 403
    # the key as a query parameter, and in the envelope's DSN
    st, _, body = request(svc.hport, "POST", f"{path}?sentry_key={key}&sentry_version=7", envelope(ev))
    assert st == 200 and json.loads(body)["id"] == ev["event_id"]
    ev2 = {"message": "hello", "event_id": uuid.uuid4().hex}
    assert request(svc.hport, "POST", path, envelope(ev2, dsn=dsn))[0] == 200
    with svc.connect("ingest") as c:
        new_dsn = c.execute("SELECT fraiseql_rotate_project_key('keys')").fetchone()[0]
    new_key = new_dsn.split("//")[1].split("@")[0]
    assert new_key != key
    ev3 = {"message": "hello", "event_id": uuid.uuid4().hex}
    assert request(svc.hport, "POST", path, envelope(ev3), auth(key))[0] == 403
    assert request(svc.hport, "POST", path, envelope(ev3), auth(new_key))[0] == 200
    with svc.connect("ingest") as c:
        assert c.execute("SELECT fraiseql_revoke_project_key(%s)", [new_key]).fetchone()[0] is True
    assert request(svc.hport, "POST", path, envelope(ev3), auth(new_key))[0] == 403
    assert occurrences(svc, "context #>> '{sentry,project_id}' = %s", [str(pid)]) == 3


def test_reply_comes_after_the_commit_and_duplicates_are_stored_once(svc):
    _, key, pid = project(svc, "dup", default_environment="staging")
    ev = {"exception": {"values": [{"type": "DupError", "value": "once"}]}, "event_id": uuid.uuid4().hex}
    for _ in range(3):
        st, _, body = request(svc.hport, "POST", f"/api/{pid}/envelope/", envelope(ev), auth(key))
        assert st == 200
        # visible to anyone as soon as the reply is
        assert occurrences(svc, "error_type = 'DupError'") == 1
    # an event that names no environment gets the project's
    assert occurrences(svc, "error_type = 'DupError' AND environment = 'staging'") == 1
    # the legacy store endpoint, deflate-compressed
    ev = {"exception": {"values": [{"type": "StoreError", "value": "legacy"}]}}
    st, _, body = request(svc.hport, "POST", f"/api/{pid}/store/", zlib.compress(json.dumps(ev).encode()),
                          {**auth(key), "Content-Encoding": "deflate", "Content-Type": "application/json"})
    assert st == 200, body
    assert len(json.loads(body)["id"]) == 32
    assert occurrences(svc, "error_type = 'StoreError'") == 1


def test_bad_input_is_refused_and_nothing_stored_is_lost(svc):
    _, key, pid = project(svc, "bad")
    good = {"exception": {"values": [{"type": "KeptError", "value": "kept"}]}}
    assert request(svc.hport, "POST", f"/api/{pid}/envelope/", envelope(good), auth(key))[0] == 200
    path = f"/api/{pid}/envelope/"
    full = envelope({"message": "x" * 100})
    cases = [
        (full[: len(full) // 2], {}, 400),                         # truncated
        (b"{not json\n", {}, 400),                                 # malformed header
        (b'{}\n{"type":"event","length":5}\n{"a":', {}, 400),      # cut item
        (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400),  # not gzip
        (b"x", {"Content-Encoding": "zstd"}, 415),
        # a decompression bomb: 64 MiB of zeros in ~64 kB
        (gzip.compress(b"\0" * (64 << 20), 9), {"Content-Encoding": "gzip"}, 413),
        # one event over http_max_event_size (256 kB)
        (envelope({"message": "y" * 300_000}), {}, 413),
    ]
    for body, hdrs, want in cases:
        st, _, resp = request(svc.hport, "POST", path, body, {**auth(key), **hdrs})
        assert st == want, (body[:40], st, resp)
    assert request(svc.hport, "GET", "/api/1/envelope/")[0] == 405
    assert request(svc.hport, "GET", "/nothing")[0] == 404
    assert occurrences(svc, "error_type = 'KeptError'") == 1
    assert request(svc.hport, "POST", path, envelope(good), auth(key))[0] == 200


def test_a_projects_rate_limit(svc):
    _, key, pid = project(svc, "limited", rate_limit_per_minute=3)
    statuses = []
    for i in range(5):
        st, hdrs, _ = request(svc.hport, "POST", f"/api/{pid}/envelope/", envelope({"message": f"m{i}"}), auth(key))
        statuses.append(st)
    assert statuses == [200, 200, 200, 429, 429]
    assert int(hdrs["Retry-After"]) >= 1
    assert hdrs["X-Sentry-Rate-Limits"].endswith("::project:project_quota")


def test_slow_clients_and_a_connection_flood_leave_the_service_serving(svc):
    _, key, pid = project(svc, "flood")
    # a client that sends half a request head and stalls holds one thread only
    slow = socket.create_connection(("127.0.0.1", svc.hport))
    slow.sendall(b"POST /api/1/envelope/ HTTP/1.1\r\nContent-Le")
    # as many connections as this process may open, held open
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(10_000, hard - 100)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want + 200), hard))
    held, refused = [], 0
    try:
        for _ in range(want):
            try:
                s = socket.create_connection(("127.0.0.1", svc.hport), timeout=2)
                held.append(s)
            except OSError:
                refused += 1
        # those over the cap were answered 503 and closed
        answered = 0
        for s in held[MAX_CONNECTIONS + 10: MAX_CONNECTIONS + 60]:
            s.settimeout(5)
            try:
                if s.recv(64).startswith(b"HTTP/1.1 503"):
                    answered += 1
            except OSError:
                pass
        assert answered > 0
    finally:
        for s in held:
            s.close()
        slow.close()
    # and the service goes on
    ev = {"exception": {"values": [{"type": "AfterFloodError", "value": "ok"}]}}
    st = wait_for(lambda: request(svc.hport, "POST", f"/api/{pid}/envelope/", envelope(ev), auth(key))[0] == 200,
                  timeout=30, what="service after the flood")
    assert occurrences(svc, "error_type = 'AfterFloodError'") == 1


def test_otlp_json_traces_and_prometheus_metrics(svc):
    _, public, pid = project(svc, "otel")
    key = secret(svc, public)
    # the public key (it ships in browser code) opens Sentry ingest only
    assert request(svc.hport, "GET", "/metrics", headers={"Authorization": f"Bearer {public}"})[0] == 403
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    now = time.time_ns()
    # (a label naming another project is the sender's word only: replaced)
    payload = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "shop"}},
                                                              {"key": "fraiseql.project_id", "value": {"intValue": "999"}}]},
                                  "scopeSpans": [{"spans": [{"traceId": trace_id, "spanId": span_id, "name": "GET /",
                                                             "kind": 2, "startTimeUnixNano": str(now - 5_000_000),
                                                             "endTimeUnixNano": str(now)}]}]}]}
    body = json.dumps(payload).encode()
    assert request(svc.hport, "POST", "/v1/traces", body, {"Content-Type": "application/json"})[0] == 401
    st, hdrs, resp = request(svc.hport, "POST", "/v1/traces", gzip.compress(body),
                             {"Content-Type": "application/json", "Content-Encoding": "gzip",
                              "Authorization": f"Bearer {key}"})
    assert st == 200, resp
    assert json.loads(resp) == {"partialSuccess": {}}
    with svc.connect("ingest") as c:
        assert c.execute("SELECT service_name, resource->>'fraiseql.project_id' FROM monitoring.traces WHERE trace_id = %s",
                         [trace_id]).fetchone() == ("shop", str(pid))
        c.execute("SELECT fraiseql_metric_increment('orders_total', '{\"shop\": \"eu\"}')")
    assert request(svc.hport, "GET", "/metrics")[0] == 401
    st, hdrs, text = request(svc.hport, "GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
    assert st == 200
    assert hdrs["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"orders_total" in text


def test_dsn_needs_an_address(svc):
    """A database no listener serves gets a clear error, not a DSN to nowhere."""
    with svc.connect() as c:
        c.execute("CREATE DATABASE nolistener")
    try:
        with svc.connect("nolistener") as c:
            c.execute("CREATE EXTENSION fraiseql_obs")
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                c.execute("SELECT fraiseql_create_project('p')")
    finally:
        with svc.connect() as c:
            c.execute("DROP DATABASE nolistener")


def test_only_the_owner_manages_projects(svc):
    with svc.connect("ingest") as c:
        c.execute("DROP ROLE IF EXISTS app_http")
        c.execute("CREATE ROLE app_http LOGIN")
        c.execute("GRANT USAGE ON SCHEMA public TO app_http")
    with psycopg.connect(svc.dsn("ingest", "app_http"), autocommit=True) as c:
        for sql in ["SELECT fraiseql_create_project('mine')", "SELECT * FROM v_projects",
                    "SELECT * FROM tb_project_key", "SELECT fraiseql_revoke_project_key('x')"]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql)


def test_hostile_events_never_take_the_service_down(svc):
    """Deep nesting, timestamps built to overflow or cut a character, sent
    without a key and with one: answered, and the service goes on."""
    _, key, pid = project(svc, "hostile")
    deep = '{"message":"x","extra":{"a":' + "[" * 5000 + "1" + "]" * 5000 + "}}"
    for hdrs in ({}, auth(key)):
        st, _, _ = request(svc.hport, "POST", f"/api/{pid}/store/", deep.encode(), hdrs)
        assert st in (400, 401), st
    bad_times = ["2026-01-01T10:00:00+1\u00e9", "999999999999999999-01-01T00:00:00Z", "2026-01-01T00:00:00+99999999999999999:00"]
    for _ in range(3 * MAX_CONNECTIONS):
        for t in bad_times:
            ev = {"message": "bad time", "timestamp": t, "event_id": uuid.uuid4().hex}
            assert request(svc.hport, "POST", f"/api/{pid}/envelope/", envelope(ev), auth(key))[0] == 200
    assert request(svc.hport, "GET", "/health")[0] == 200
    with svc.connect("ingest") as c:
        # the server never restarted: this session lived through it all
        assert c.execute("SELECT count(*) FROM tb_error_occurrence WHERE message = 'bad time'").fetchone()[0] == 9 * MAX_CONNECTIONS


def test_one_project_cannot_reach_anothers_groups(svc):
    """A public key ships in browser code: with it, one project's events
    never land in another project's group, nor suppress its event ids."""
    _, key_a, pid_a = project(svc, "tenant-a")
    _, key_b, pid_b = project(svc, "tenant-b")
    shared_id = uuid.uuid4().hex
    ev_b = {"exception": {"values": [{"type": "PaymentError", "value": "declined"}]}, "event_id": shared_id,
            "fingerprint": ["payments"]}
    assert request(svc.hport, "POST", f"/api/{pid_b}/envelope/", envelope(ev_b), auth(key_b))[0] == 200
    with svc.connect("ingest") as c:
        fp_b = c.execute("SELECT fingerprint FROM tb_error_occurrence WHERE context #>> '{sentry,project_id}' = %s",
                         [str(pid_b)]).fetchone()[0]
    # project A aims at B's group by its fingerprint, with B's event id
    for fp in (["payments"], [fp_b]):
        ev_a = {"exception": {"values": [{"type": "PaymentError", "value": "declined"}]}, "level": "fatal",
                "event_id": shared_id if fp == ["payments"] else uuid.uuid4().hex, "fingerprint": fp}
        assert request(svc.hport, "POST", f"/api/{pid_a}/envelope/", envelope(ev_a), auth(key_a))[0] == 200
    with svc.connect("ingest") as c:
        rows = c.execute("SELECT context #>> '{sentry,project_id}', error_id FROM tb_error_occurrence "
                         "WHERE error_type = 'PaymentError'").fetchall()
        assert len(rows) == 3  # A's event with B's id was stored: ids are per project
        b_group = [r[1] for r in rows if r[0] == str(pid_b)]
        a_groups = {r[1] for r in rows if r[0] == str(pid_a)}
        assert len(b_group) == 1 and b_group[0] not in a_groups


def test_a_lock_held_elsewhere_is_answered_not_waited_for(svc):
    """A table the batch needs, locked by another session: the request is
    answered 503 (the client retries) within the batch's lock_timeout, and
    the next one is stored once the lock is gone."""
    _, key, pid = project(svc, "locked")
    with svc.connect("ingest", autocommit=False) as locker:
        locker.execute("LOCK tb_ingest_event IN ACCESS EXCLUSIVE MODE")
        t = time.monotonic()
        st, hdrs, _ = request(svc.hport, "POST", f"/api/{pid}/envelope/", envelope({"message": "while locked"}), auth(key))
        assert st == 503 and "Retry-After" in hdrs
        assert time.monotonic() - t < 15
        locker.rollback()
    assert request(svc.hport, "POST", f"/api/{pid}/envelope/", envelope({"message": "after the lock"}), auth(key))[0] == 200


def test_otlp_hostile_metrics_and_exact_cumulative_counts(svc):
    """A NUL in a metric name is refused (it made PostgreSQL's unique check
    and equality disagree: an endless insert loop); two replicas of one
    service sending the same cumulative counter count apart; a point sent
    again or late changes nothing; a histogram whose buckets overflow is
    refused and the scrape stays valid."""
    _, public, _ = project(svc, "otel-metrics")
    key = secret(svc, public)
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def send(metrics, instance="a"):
        body = {"resourceMetrics": [{"resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "shop"}},
            {"key": "service.instance.id", "value": {"stringValue": instance}}]},
            "scopeMetrics": [{"metrics": metrics}]}]}
        st, _, resp = request(svc.hport, "POST", "/v1/metrics", json.dumps(body).encode(), h)
        assert st == 200, resp
        return json.loads(resp)

    r = send([{"name": "bad\u0000name", "gauge": {"dataPoints": [{"asDouble": 1}]}}])
    assert r["partialSuccess"]["rejectedDataPoints"] == 1
    cum = lambda v, t: [{"name": "replica_orders", "sum": {"aggregationTemporality": 2, "isMonotonic": True,
                         "dataPoints": [{"asInt": str(v), "startTimeUnixNano": "1000", "timeUnixNano": str(t)}]}}]
    for v, t in [(100, 1), (101, 2), (102, 3)]:
        send(cum(v, t), "a")
        send(cum(v, t), "b")
    send(cum(101, 2), "a")   # sent again, late
    send(cum(100, 1), "b")
    with svc.connect("ingest") as c:
        total = c.execute("SELECT value FROM v_metric_series WHERE metric_name = 'replica_orders'").fetchone()[0]
    assert total == 204, total  # 102 from each replica
    send(cum(5, 4), "a")  # lower, at a later time, same start: a restart that kept its start time
    with svc.connect("ingest") as c:
        total = c.execute("SELECT value FROM v_metric_series WHERE metric_name = 'replica_orders'").fetchone()[0]
    assert total == 209, total
    # a histogram and a summary of one name: the summary's _sum/_count gauges
    # would be the histogram's samples a second time
    send([{"name": "collide", "histogram": {"aggregationTemporality": 1, "dataPoints": [
              {"bucketCounts": ["1", "0"], "explicitBounds": [1.0], "count": "1", "sum": 0.5}]}},
          {"name": "collide", "summary": {"dataPoints": [{"sum": 3.0, "count": "2",
              "quantileValues": [{"quantile": 0.5, "value": 1.0}]}]}}])
    big = str(2 ** 63 - 1)
    r = send([{"name": "overflowing", "histogram": {"aggregationTemporality": 1, "dataPoints": [
        {"bucketCounts": [big, big, "0"], "explicitBounds": [0.1, 0.5]}]}}])
    assert r["partialSuccess"]["rejectedDataPoints"] == 1
    st, _, text = request(svc.hport, "GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
    assert st == 200 and b"replica_orders_total" in text
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert check.returncode in (0, 3) and b"error" not in check.stderr.lower(), check.stderr


def test_exceptions_without_a_message_are_stored(svc):
    """`raise ValueError()` and a bare `assert` have no message: stored,
    reading as their type, not refused."""
    _, key, pid = project(svc, "no-message")
    ev = {"exception": {"values": [{"type": "AssertionError", "value": ""}]}}
    assert request(svc.hport, "POST", f"/api/{pid}/envelope/", envelope(ev), auth(key))[0] == 200
    assert occurrences(svc, "error_type = 'AssertionError' AND message = 'AssertionError'") == 1


def test_a_large_body_with_an_unknown_key_is_not_parsed(svc):
    """Decompressing and parsing multiply a body's size in memory: a large
    one is read only for a key some project has."""
    big = gzip.compress(json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": f"m{i}", "gauge": {"dataPoints": [{"asDouble": i}]}} for i in range(5000)]}]}]}).encode())
    h = {"Content-Type": "application/json", "Content-Encoding": "gzip", "Authorization": "Bearer " + "0" * 32}
    statuses = {request(svc.hport, "POST", "/v1/metrics", big, h)[0] for _ in range(3)}
    assert statuses <= {403, 503} and 403 in wait_for(
        lambda: {request(svc.hport, "POST", "/v1/metrics", big, h)[0]} & {403}, timeout=10, what="a 403"), statuses
    _, public, _ = project(svc, "large-ok")
    h["Authorization"] = "Bearer " + secret(svc, public)
    # a key made a moment ago: refused at most until the keys are read again
    assert wait_for(lambda: request(svc.hport, "POST", "/v1/metrics", big, h)[0] == 200, timeout=10,
                    what="the new key's large request")


def test_drop_database_is_not_blocked_by_the_listener(svc):
    """The listener leaves its database for DROP DATABASE, and comes back
    when it exists again."""
    with svc.connect() as c:
        c.execute("DROP DATABASE ingest")
        c.execute("CREATE DATABASE ingest")
    with svc.connect("ingest") as c:
        c.execute("CREATE EXTENSION fraiseql_obs")
    _, key, pid = project(svc, "again")
    wait_for(lambda: request(svc.hport, "POST", f"/api/{pid}/envelope/", envelope({"message": "back"}), auth(key))[0] == 200,
             timeout=30, what="the listener back in the new database")


JS = ROOT / "tests/js"

OTEL_SCRIPT = textwrap.dedent('''
    import sys, logging
    from opentelemetry import trace, metrics
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

    endpoint, key, compression, tag = sys.argv[1:5]
    comp = Compression.Gzip if compression == "gzip" else Compression.NoCompression
    headers = {"Authorization": "Bearer " + key}
    res = Resource.create({"service.name": "py-shop", "service.version": "2.0.0",
                           "deployment.environment": "otel-" + tag})
    tp = TracerProvider(resource=res)
    tp.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint + "/v1/traces", headers=headers, compression=comp)))
    tracer = tp.get_tracer("test")
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint + "/v1/metrics", headers=headers, compression=comp),
                                           export_interval_millis=3_600_000)
    mp = MeterProvider(resource=res, metric_readers=[reader])
    meter = mp.get_meter("test")
    orders = meter.create_counter("orders." + tag)
    latency = meter.create_histogram("latency_" + tag, unit="s")
    lp = LoggerProvider(resource=res)
    lp.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=endpoint + "/v1/logs", headers=headers, compression=comp)))
    log = logging.getLogger("shop")
    log.addHandler(LoggingHandler(logger_provider=lp))
    log.setLevel(logging.INFO)

    def charge(amount):
        raise ValueError("card declined for amount %d" % amount)

    with tracer.start_as_current_span("checkout " + tag):
        orders.add(2, {"region": "eu"})
        orders.add(3, {"region": "eu"})
        for v in (0.02, 0.2, 2.0):
            latency.record(v)
        log.info("all fine")
        try:
            charge(42)
        except ValueError:
            log.exception("payment failed")
    reader.force_flush()
    orders.add(1, {"region": "eu"})
    reader.force_flush()
    tp.shutdown(); lp.shutdown(); mp.shutdown()
''')


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_the_official_python_opentelemetry_exporters(svc, compression):
    """opentelemetry-sdk with the OTLP/HTTP protobuf exporters: spans, a
    counter sent cumulatively twice (counted once), a histogram, and an
    error log with its exception captured and joined to its trace."""
    _, public, _ = project(svc, f"otel-py-{compression}")
    key = secret(svc, public)
    tag = compression
    out = subprocess.run([sys.executable, "-c", OTEL_SCRIPT, f"http://127.0.0.1:{svc.hport}", key, compression, tag],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Failed to export" not in out.stderr, out.stderr
    with svc.connect("ingest") as c:
        span = c.execute("SELECT trace_id, service_name, environment FROM monitoring.traces WHERE operation_name = %s",
                         [f"checkout {tag}"]).fetchone()
        assert span[1:] == ("py-shop", f"otel-{tag}")
        err = c.execute("SELECT error_type, message, trace_id, environment, release_version, stack_trace "
                        "FROM tb_error_occurrence WHERE trace_id = %s", [span[0]]).fetchall()
        assert len(err) == 1, err
        assert err[0][0] == "ValueError" and "card declined" in err[0][1]
        assert err[0][3:5] == (f"otel-{tag}", "2.0.0")
        assert "in charge" in err[0][5]
        # cumulative 5, then 6: the counter holds 6, not 11
        total = c.execute("SELECT value FROM v_metric_series WHERE metric_name = %s AND environment = %s",
                          [f"orders.{tag}", f"otel-{tag}"]).fetchone()[0]
        assert total == 6
        h = c.execute("SELECT obs_count, obs_sum FROM v_metric_series WHERE metric_name = %s",
                      [f"latency_{tag}"]).fetchone()
        assert h[0] == 3 and abs(h[1] - 2.22) < 1e-9


def test_the_official_js_clients(svc):
    """@sentry/node (an event over 32 KiB is gzipped) and the OpenTelemetry
    JS OTLP/HTTP exporter (JSON)."""
    dsn, key, pid = project(svc, "node")
    out = subprocess.run(["node", str(JS / "send.mjs"), "sentry", dsn, "node@3.1.0"],
                         capture_output=True, text=True, timeout=60, cwd=JS)
    assert out.returncode == 0, out.stderr
    with svc.connect("ingest") as c:
        rows = c.execute("SELECT error_type, error_id, environment, release_version, stack_trace, context "
                         "FROM tb_error_occurrence WHERE context #>> '{sentry,project_id}' = %s ORDER BY error_type",
                         [str(pid)]).fetchall()
        assert [r[0] for r in rows] == ["Message", "SyntaxError", "SyntaxError"], [r[:4] for r in rows]
        assert rows[1][1] == rows[2][1]  # two parse errors, one group
        assert rows[1][2:4] == ("node-test", "node@3.1.0")
        assert "parseOrder" in rows[1][4]
        assert rows[1][5]["user"]["id"] == "node-user"
        assert rows[0][5]["sentry"]["sdk"]["name"] == "sentry.javascript.node"
    out = subprocess.run(["node", str(JS / "send.mjs"), "otel", f"http://127.0.0.1:{svc.hport}", secret(svc, key), "js-span"],
                         capture_output=True, text=True, timeout=60, cwd=JS)
    assert out.returncode == 0, out.stderr
    with svc.connect("ingest") as c:
        assert c.execute("SELECT service_name, environment FROM monitoring.traces WHERE operation_name = 'js-span'"
                         ).fetchone() == ("js-shop", "js-test")


def test_bad_otlp_is_refused(svc):
    _, public, _ = project(svc, "otel-bad")
    key = secret(svc, public)
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-protobuf"}
    assert request(svc.hport, "POST", "/v1/traces", b"\x0a\x05\x01", h)[0] == 400
    assert request(svc.hport, "POST", "/v1/metrics", b"\xff" * 20, h)[0] == 400
    assert request(svc.hport, "POST", "/v1/logs", b"{", {**h, "Content-Type": "application/json"})[0] == 400
    assert request(svc.hport, "POST", "/v1/logs", b"{}", {**h, "Content-Type": "text/plain"})[0] == 415
    assert request(svc.hport, "POST", "/v1/traces", b"", {**h, "Authorization": "Bearer nope"})[0] == 403
    # an empty request is valid and stores nothing
    st, hdrs, body = request(svc.hport, "POST", "/v1/traces", b"", h)
    assert st == 200 and hdrs["Content-Type"] == "application/x-protobuf" and body == b""


def test_prometheus_scrapes_and_promtool_accepts(svc):
    _, public, _ = project(svc, "prom")
    key = secret(svc, public)
    with svc.connect("ingest") as c:
        c.execute("SELECT fraiseql_metric_increment('scrape.hits', '{\"a\": \"1\"}', 2)")
        c.execute("SELECT fraiseql_metric_increment('scrape_hits', '{\"a\": \"1\"}', 3)")
        c.execute("SELECT fraiseql_metric_record_histogram('scrape_latency', 0.3)")
    st, _, text = request(svc.hport, "GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
    assert st == 200
    assert b'scrape_hits_total{a="1",environment="production"} 5' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs it)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    # promtool's lint warns about help texts and units; errors fail the check
    assert check.returncode in (0, 3) and b"error" not in check.stderr.lower(), check.stderr


def test_a_real_prometheus_server_scrapes_the_endpoint(svc, tmp_path):
    """Debian's prometheus, configured with the project key as its bearer
    token, scrapes /metrics; the series reach its query API."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (make test installs it)")
    _, public, _ = project(svc, "scraper")
    key = secret(svc, public)
    with svc.connect("ingest") as c:
        c.execute("SELECT fraiseql_metric_increment('scraped_orders', '{\"shop\": \"eu\"}', 7)")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(textwrap.dedent(f"""
        global: {{scrape_interval: 1s}}
        scrape_configs:
          - job_name: fraiseql
            authorization: {{type: Bearer, credentials: {key}}}
            static_configs: [{{targets: ['127.0.0.1:{svc.hport}']}}]
    """))
    proc = subprocess.Popen([prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def value():
            st, _, body = request(port, "GET", "/api/v1/query?query=scraped_orders_total", timeout=5)
            if st != 200:
                return None
            res = json.loads(body)["data"]["result"]
            return res[0]["value"][1] if res else None
        assert wait_for(value, timeout=30, what="prometheus to scrape") == "7"
        st, _, body = request(port, "GET", "/api/v1/targets", timeout=5)
        health = json.loads(body)["data"]["activeTargets"][0]["health"]
        assert health == "up"
    finally:
        proc.terminate()
        proc.wait(10)
