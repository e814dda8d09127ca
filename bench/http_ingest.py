"""make bench, the HTTP service (issue 14): Sentry events through the envelope
endpoint beside fraiseql_capture_error over SQL at the same concurrency;
OTLP protobuf spans beside COPY of the same rows; request latency.

A cluster of its own with a listener on a loopback port. Sentry events are
sent by wrk (bench/sentry_envelope.lua) over kept-alive connections, as an
SDK's transport keeps one; OTLP batches by client processes."""
import http.client
import json
import multiprocessing as mp
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

import psycopg

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")
DURATION = float(os.environ.get("BENCH_HTTP_SECONDS", "10"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TRACE_TEXT = ("Traceback (most recent call last):\n"
              '  File "/usr/lib/python3/site-packages/django/core/handlers/base.py", line 197, in _get_response\n'
              '  File "/srv/app/views.py", line 42, in checkout\n'
              '  File "/srv/app/cart.py", line 7, in total\n'
              "KeyError: 'cart'")


def otlp_client(args):
    hport, key, bodies = args
    conn = http.client.HTTPConnection("127.0.0.1", hport, timeout=60)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-protobuf"}
    for b in bodies:
        conn.request("POST", "/v1/traces", body=b, headers=headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
    conn.close()
    return len(bodies)


def otlp_protobuf(batch_no: int, size: int = 512) -> bytes:
    """An ExportTraceServiceRequest of `size` spans, serialized by the
    official opentelemetry-proto classes."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="bench")))
    ss = rs.scope_spans.add()
    now = time.time_ns()
    for i in range(size):
        s = ss.spans.add()
        s.trace_id = (batch_no + 1).to_bytes(8, "big") + (i // 8 + 1).to_bytes(8, "big")
        s.span_id = (batch_no + 1).to_bytes(4, "big") + (i + 1).to_bytes(4, "big")
        if i % 8:
            s.parent_span_id = (batch_no + 1).to_bytes(4, "big") + (i - i % 8 + 1).to_bytes(4, "big")
        s.name = ["POST /orders", "GET /users/{id}", "db.query", "cache.get"][i % 4]
        s.kind = 1 + i % 3
        s.start_time_unix_nano = now - (i * 1_000_000)
        s.end_time_unix_nano = now - (i * 1_000_000) + 500_000
        s.attributes.append(KeyValue(key="http.method", value=AnyValue(string_value="POST")))
        s.attributes.append(KeyValue(key="http.status_code", value=AnyValue(int_value=200)))
    return req.SerializeToString()


class Cluster:
    def __init__(self):
        self.dir = pathlib.Path(tempfile.gettempdir()) / "fraiseql_obs_bench_http"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.port, self.hport = free_port(), free_port()
        subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "start", str(self.dir), str(self.port),
                        "shared_buffers = 512MB", "max_wal_size = 4GB",
                        f"fraiseql_obs.http_listen = 'bench@127.0.0.1:{self.hport}'"], check=True,
                       stdout=subprocess.DEVNULL)
        with self.connect("postgres") as c:
            c.execute("CREATE DATABASE bench")
        with self.connect() as c:
            c.execute("CREATE EXTENSION fraiseql_obs")
            dsn = c.execute("SELECT fraiseql_create_project('bench')").fetchone()[0]
        self.key = dsn.split("//")[1].split("@")[0]
        self.pid = int(dsn.rsplit("/", 1)[1])
        with self.connect() as c:
            self.secret = c.execute("SELECT secret_key FROM v_projects WHERE public_key = %s", [self.key]).fetchone()[0]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.hport, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.3)

    def connect(self, db="bench"):
        return psycopg.connect(host=str(self.dir), port=self.port, dbname=db, user="postgres", autocommit=True)

    def stop(self):
        subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "stop", str(self.dir)], check=False,
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def pgbench(self, script: str, clients: int, seconds: float) -> float:
        import re
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(script)
            path = f.name
        os.chmod(path, 0o644)
        out = subprocess.run([f"{BIN}/pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(clients),
                              "-T", str(int(seconds)), "-f", path, "-h", str(self.dir), "-p", str(self.port),
                              "-U", "postgres", "bench"], check=True, capture_output=True, text=True).stdout
        os.unlink(path)
        return float(re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out).group(1))


# The same occurrence over SQL: the application formats its stack trace and
# context itself (what an SDK event carries, as SQL arguments).
SQL_CAPTURE = """\\set i random(1, 1000000000)
\\set g random(1, 1000)
SELECT fraiseql_capture_error('KeyError', 'cart-' || :i,
  replace(%s, 'in total', 'in total_' || :g),
  ('{"user": {"id": "u-' || (:i %% 500) || '"}, "tags": {"region": "eu"}, "breadcrumbs": [{"message": "step 0"}, {"message": "step 1"}, {"message": "step 2"}, {"message": "step 3"}, {"message": "step 4"}]}')::jsonb,
  'production', 'error', 'shop@1.4.2');
"""


def wrk(c: "Cluster", clients: int, seconds: float) -> dict:
    """wrk (C, epoll) as the client: the server is what is measured."""
    import re
    out = subprocess.run(["wrk", f"-t{min(clients, 2)}", f"-c{clients}", f"-d{int(seconds)}s", "--latency",
                          "-s", str(ROOT / "bench/sentry_envelope.lua"),
                          "-H", f"X-Sentry-Auth: Sentry sentry_key={c.key}, sentry_version=7",
                          "-H", "Content-Type: application/x-sentry-envelope",
                          f"http://127.0.0.1:{c.hport}/api/{c.pid}/envelope/"],
                         check=True, capture_output=True, text=True).stdout
    assert "Non-2xx" not in out, out

    def ms(label):
        m = re.search(rf"\s{label}%\s+([0-9.]+)(us|ms|s)", out)
        v = float(m.group(1))
        return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    return {"http": rate, "p50": ms("50"), "p99": ms("99")}


def bench_http() -> dict:
    c = Cluster()
    out = {}
    try:
        script = SQL_CAPTURE % ("'" + TRACE_TEXT.replace("'", "''") + "'")
        for clients in (1, 8):
            r = wrk(c, clients, DURATION)
            sql_rate = c.pgbench(script, clients, DURATION)
            out[clients] = {**r, "sql": sql_rate}
            print(f"HTTP ingest, {clients} client(s): envelope {r['http']:.0f} events/s "
                  f"(p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms), "
                  f"SQL {sql_rate:.0f} captures/s ({r['http'] / sql_rate:.2f}×)", flush=True)
        with c.connect() as conn:
            stored = conn.execute("SELECT count(*) FROM tb_error_occurrence WHERE error_type = 'KeyError'").fetchone()[0]
        out["stored_checked"] = stored
        # OTLP protobuf spans beside COPY of the same rows
        batches = [otlp_protobuf(n) for n in range(40)]
        t = time.perf_counter()
        with mp.Pool(2) as pool:
            sent = sum(pool.map(otlp_client, [(c.hport, c.secret, batches[k::2]) for k in range(2)]))
        otlp_s = time.perf_counter() - t
        spans = sent * 512
        with c.connect() as conn:
            assert conn.execute("SELECT count(*) FROM monitoring.traces").fetchone()[0] == spans
            cols = ("trace_id, span_id, parent_span_id, operation_name, start_time, end_time, duration_ms, status_code,"
                    " attributes, events, links, resource, environment, service_name, span_kind")
            rows = conn.execute(f"SELECT {cols} FROM monitoring.traces").fetchall()
            conn.execute("TRUNCATE monitoring.traces")
            t = time.perf_counter()
            for k in range(0, len(rows), 512):
                with conn.cursor().copy(f"COPY monitoring.traces ({cols}) FROM STDIN") as cp:
                    for r in rows[k:k + 512]:
                        cp.write_row([*r[:8], json.dumps(r[8]), json.dumps(r[9]), json.dumps(r[10]),
                                      json.dumps(r[11]), *r[12:]])
            copy_s = time.perf_counter() - t
        out["otlp"] = spans / otlp_s
        out["copy"] = spans / copy_s
        print(f"OTLP protobuf: {out['otlp']:.0f} spans/s, COPY {out['copy']:.0f} spans/s "
              f"({out['otlp'] / out['copy']:.2f}×)", flush=True)
    finally:
        c.stop()
    return out


def section(r: dict) -> list:
    lines = [
        "## HTTP ingest (issue 14)",
        "",
        f"A cluster of its own with a listener on 127.0.0.1. Sentry events (a Python exception of 3 frames,",
        "user, tags, 5 breadcrumbs, trace context; one of 1,000 groups; each its own event id) POSTed as",
        "envelopes by wrk over kept-alive connections (bench/sentry_envelope.lua), beside",
        "`fraiseql_capture_error` over SQL (pgbench, prepared)",
        f"with the same occurrence at the same concurrency; {DURATION:.0f} s each. Target: HTTP at least as fast per event.",
        "",
        "| clients | envelope events/s | p50 | p99 | SQL captures/s | HTTP ÷ SQL |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in (1, 8):
        x = r[clients]
        lines.append(f"| {clients} | {x['http']:,.0f} | {x['p50']:.1f} ms | {x['p99']:.1f} ms | {x['sql']:,.0f} | "
                     f"{x['http'] / x['sql']:.2f} |")
    lines += [
        "",
        "wrk and pgbench run on the same 2 cores as the server. An HTTP event also pays for the server's",
        "HTTP and JSON parsing, grouping from the frames, and the event-id check that stores a retried",
        "event once, which the SQL call does not.",
        "",
        f"OTLP/HTTP protobuf (batches of 512 spans serialized by opentelemetry-proto, 2 clients):",
        f"{r['otlp']:,.0f} spans/s; COPY of the same rows into the same table: {r['copy']:,.0f} spans/s;",
        f"ratio {r['otlp'] / r['copy']:.2f} (target ≥ 0.7).",
        "",
    ]
    return lines


if __name__ == "__main__":
    print("\n".join(section(bench_http())))
