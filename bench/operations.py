"""Operations benchmarks (#12): what the worker costs a cluster idle and under
load, notification latency with 20 active databases on PostgreSQL's default
8 worker processes, and delivery with one destination hung. Each part runs
on a cluster of its own, started here."""
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psycopg

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from receivers import HttpReceiver, free_port  # noqa: E402

IDLE_S = int(os.environ.get("BENCH_IDLE_SECONDS", "60"))
LOAD_S = int(os.environ.get("BENCH_LOAD_SECONDS", "60"))


class Cluster:
    def __init__(self, name, *conf):
        self.dir = pathlib.Path(tempfile.gettempdir()) / f"fraiseql_obs_bench_{name}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.port = free_port()
        subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "start", str(self.dir), str(self.port),
                        "fraiseql_obs.notification_allowed_hosts = '127.0.0.1'", *conf], check=True,
                       capture_output=True)

    def connect(self, db="postgres"):
        return psycopg.connect(host=str(self.dir), port=self.port, dbname=db, user="postgres", autocommit=True)

    def database(self, name):
        with self.connect() as c:
            c.execute(f"CREATE DATABASE {name}")
        with self.connect(name) as c:
            c.execute("CREATE EXTENSION fraiseql_obs")
        return name

    def stop(self):
        subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "stop", str(self.dir)], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def worker_pids(c):
    return [r[0] for r in c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type LIKE 'fraiseql_obs%'")]


def cpu_seconds(pid):
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def measure(c, seconds, during=None):
    """xids, WAL bytes and the extension's processes' CPU seconds over `seconds`
    (CPU sampled every 0.2 s, so a worker that exits is counted up to then)."""
    x0 = int(c.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()[0])
    w0 = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    first, last = {}, {}
    stop = threading.Event()
    t = threading.Thread(target=during, args=(stop,)) if during else None
    if t:
        t.start()
    end = time.monotonic() + seconds
    with psycopg.connect(c.info.dsn, autocommit=True) as s:
        while time.monotonic() < end:
            for pid in worker_pids(s):
                v = cpu_seconds(pid)
                if v is not None:
                    first.setdefault(pid, v)
                    last[pid] = v
            time.sleep(0.2)
    if t:
        stop.set()
        t.join()
    x1 = int(c.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()[0])
    wal = c.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (w0,)).fetchone()[0]
    cpu = sum(last[p] - first[p] for p in last)
    return x1 - x0, float(wal), cpu


def bench_cost():
    """The worker idle, then under a steady 100 captures/s (with a rule)."""
    cl = Cluster("cost", "shared_buffers = 128MB")
    rx = HttpReceiver().start()
    out = {}
    try:
        db = cl.database("cost")
        with cl.connect(db) as c:
            c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, error_type) "
                      "VALUES ('webhook', %s, 'Load')", (json.dumps({"url": rx.url}),))
            for i in range(50):
                c.execute("SELECT fraiseql_capture_error('Seed', %s)", (f"group {i}",))
            time.sleep(5)  # the first maintenance, the folds of the seed rows
            out["idle"] = measure(c, IDLE_S)

            def load(stop):
                with cl.connect(db) as w:
                    n, t0 = 0, time.monotonic()
                    while not stop.is_set():
                        w.execute("SELECT fraiseql_capture_error('Load', %s)", (f"item {n % 20}",))
                        n += 1
                        delay = t0 + n / 100 - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    out["load_captures"] = n
            out["load"] = measure(c, LOAD_S, load)
            out["load_seconds"] = LOAD_S
    finally:
        rx.stop()
        cl.stop()
    xi, wi, ci = out["idle"]
    xl, wl, cll = out["load"]
    print(f"worker cost: idle {xi} xids, {wi:.0f} B WAL, {ci:.2f} s CPU in {IDLE_S} s; "
          f"100 captures/s: {xl} xids, {wl / 1e6:.1f} MB WAL, {cll:.2f} s CPU in {LOAD_S} s", flush=True)
    return out


def bench_many_databases(dbs=20, rounds=10):
    cl = Cluster("many", "max_worker_processes = 8")
    rx = HttpReceiver().start()
    conns = {}
    try:
        for i in range(dbs):
            n = cl.database(f"app{i}")
            conns[n] = cl.connect(n)
            conns[n].execute("INSERT INTO tb_error_notification_config (channel_type, channel_config) VALUES ('webhook', %s)",
                             (json.dumps({"url": f"{rx.url}/{n}"}),))
        time.sleep(5)
        lat = []
        for r in range(rounds):
            sent = {}
            for n, c in conns.items():
                t0 = time.monotonic()
                c.execute("SELECT fraiseql_capture_error('E', %s)", (f"{n} round {r}",))
                sent[f"{n} round {r}"] = t0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(any(k in q["body"] for q in rx.requests) for k in sent):
                time.sleep(0.01)
            for k, t0 in sent.items():
                ats = [q["at"] for q in rx.requests if k in q["body"]]
                lat.append((min(ats) - t0) * 1000 if ats else 60_000)
            time.sleep(0.5)
        lat.sort()
        with cl.connect() as c:
            workers = c.execute("SHOW fraiseql_obs.max_workers").fetchone()[0]
        out = {"p50": statistics.median(lat), "p99": lat[int(len(lat) * 0.99) - 1], "n": len(lat),
               "dbs": dbs, "workers": workers}
    finally:
        for c in conns.values():
            c.close()
        rx.stop()
        cl.stop()
    print(f"{dbs} databases: notification p50 {out['p50']:.0f} ms, p99 {out['p99']:.0f} ms", flush=True)
    return out


def bench_hung_destination(healthy_n=200, hung_n=50):
    """Deliveries to a healthy endpoint, alone and beside an endpoint that
    accepts connections and never answers."""
    cl = Cluster("hung", "fraiseql_obs.notification_timeout = 2000")
    healthy, hung = HttpReceiver().start(), HttpReceiver(delay=3600).start()
    out = {}
    try:
        db = cl.database("hung")
        with cl.connect(db) as c:
            for url, etype in [(healthy.url, "Healthy"), (hung.url, "Hung")]:
                c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, error_type) "
                          "VALUES ('webhook', %s, %s)", (json.dumps({"url": url}), etype))
            time.sleep(3)
            for label, with_hung in (("alone", False), ("beside", True)):
                healthy.requests.clear()
                with c.transaction():
                    if with_hung:
                        c.execute("SELECT fraiseql_capture_error('Hung', 'x' || g) FROM generate_series(1, %s) g", (hung_n,))
                    c.execute("SELECT fraiseql_capture_error('Healthy', 'y' || g) FROM generate_series(1, %s) g", (healthy_n,))
                t0 = time.monotonic()
                while len(healthy.requests) < healthy_n and time.monotonic() - t0 < 300:
                    time.sleep(0.01)
                out[label] = len(healthy.requests) / (time.monotonic() - t0)
                # empty the queue for the next part (rows the worker holds are skipped, taken next time)
                for _ in range(100):
                    c.execute("DELETE FROM tb_notification_queue WHERE delivery_id IN "
                              "(SELECT delivery_id FROM tb_notification_queue FOR UPDATE SKIP LOCKED)")
                    if c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0:
                        break
                    time.sleep(0.2)
                time.sleep(3)
    finally:
        healthy.stop()
        hung.stop()
        cl.stop()
    print(f"hung destination: healthy deliveries {out['alone']:.0f}/s alone, {out['beside']:.0f}/s beside "
          f"{hung_n} hung", flush=True)
    out["hung_n"], out["healthy_n"] = hung_n, healthy_n
    return out


def section(cost, many, hung):
    xi, wi, ci = cost["idle"]
    xl, wl, cl = cost["load"]
    hour_i, hour_l = 3600 / IDLE_S, 3600 / cost["load_seconds"]
    return [
        "## Operations: what the worker costs, many databases, a hung destination (issue: operations)",
        "",
        "Each on a cluster of its own. CPU is the launcher's and the workers' (user + system, from",
        "/proc); WAL and transaction ids are the whole cluster's, extrapolated to an hour.",
        "",
        "| setup | transaction ids / hour | WAL / hour | worker CPU / hour |",
        "|---|---:|---:|---:|",
        f"| idle (one database, a rule, 50 groups; measured {IDLE_S} s) | {xi * hour_i:,.0f} | {wi * hour_i / 1e6:,.2f} MB | {ci * hour_i:,.1f} s |",
        f"| 100 captures/s with a webhook rule (measured {cost['load_seconds']} s, {cost['load_captures']:,} captures) |"
        f" {xl * hour_l:,.0f} | {wl * hour_l / 1e6:,.0f} MB | {cl * hour_l:,.1f} s |",
        "",
        "Target: idle costs nothing (no transaction id, no WAL written by the worker). Under load the",
        "transaction ids and WAL are the captures' own (one transaction each) plus the worker's: a",
        "claim and a record transaction for each delivery round (one round per commit-time wake-up),",
        "and the fold and rollups once a second.",
        "",
        f"**{many['dbs']} active databases**, `max_worker_processes = 8` (PostgreSQL's default),"
        f" `fraiseql_obs.max_workers = {many['workers']}`: one capture in every database per round, a webhook",
        f"rule in each; capture to request received over {many['n']} notifications: p50 {many['p50']:,.0f} ms,"
        f" p99 {many['p99']:,.0f} ms (target p50 < 1 s).",
        "",
        f"**A hung destination**: {hung['healthy_n']} deliveries to a healthy endpoint, committed at once,"
        f" alone: {hung['alone']:,.0f}/s; beside {hung['hung_n']} deliveries to an endpoint that accepts"
        f" and never answers: {hung['beside']:,.0f}/s ({hung['beside'] / hung['alone']:.2f}×). A batch that holds the",
        "hung endpoint's first attempts waits for them one delivery deadline; the endpoint then cools (one",
        "second, doubling while it keeps failing) and later batches do not wait for it. Results are not yet",
        "collected across batches, which would remove that first wait.",
        "",
    ]


if __name__ == "__main__":
    print("\n".join(section(bench_cost(), bench_many_databases(), bench_hung_destination())))
