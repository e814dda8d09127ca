"""A real PostgreSQL 15 cluster with fraiseql_obs preloaded, for the session.

The worker runs with short intervals so its effects show within seconds.
"""
import itertools
import os
import pathlib
import shutil
import socket
import subprocess
import time

import psycopg
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, path: pathlib.Path, port: int):
        self.path = path
        self.port = port
        self._names = itertools.count(1)

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host={self.path} port={self.port} dbname={dbname} user={user}"

    def connect(self, dbname: str = "postgres", user: str = "postgres", autocommit: bool = True, **kw):
        return psycopg.connect(self.dsn(dbname, user), autocommit=autocommit, **kw)

    def new_database(self, extension: bool = True) -> str:
        name = f"it_{os.getpid()}_{next(self._names)}"
        with self.connect() as c:
            c.execute(f"CREATE DATABASE {name}")
        if extension:
            with self.connect(name) as c:
                c.execute("CREATE EXTENSION fraiseql_obs")
        return name

    def log(self) -> str:
        return (self.path / "server.log").read_text(errors="replace")


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2, what: str = "condition"):
    """Polls until predicate() is truthy (no fixed sleeps); returns its value."""
    deadline = time.monotonic() + timeout
    last_exc = None
    v = None
    while time.monotonic() < deadline:
        try:
            v = predicate()
            if v:
                return v
        except psycopg.OperationalError as e:  # e.g. during a crash restart
            last_exc = e
        except TypeError as e:  # a row not there yet: fetchone() gave None
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last value: {v!r:.300})"
                         + (f" (last error: {last_exc})" if last_exc else ""))


@pytest.fixture(scope="session")
def cluster():
    path = pathlib.Path(f"/tmp/fraiseql_obs_it_{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    port = free_port()
    conf = [
        "fraiseql_obs.launcher_naptime = 1",
        "fraiseql_obs.maintenance_interval = 2",
        "fraiseql_obs.flush_interval = 100",
        # small, so that test_autonomous can show its limits
        "fraiseql_obs.autonomous_queue_size = 256",
        # workers stay (the tests look at their pids); test_operations tests leaving
        "fraiseql_obs.worker_idle_timeout = 3600",
        "fraiseql_obs.ddl_lock_timeout = 200",
        # never send anything beyond this machine
        "fraiseql_obs.notification_allowed_hosts = '127.0.0.1,localhost'",
        "fraiseql_obs.notification_retry_interval = 200",
        "fraiseql_obs.notification_timeout = 1500",
        "fraiseql_obs.notification_connect_timeout = 500",
        "restart_after_crash = on",
        "max_connections = 60",
        "max_prepared_transactions = 10",
    ]
    subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "start", str(path), str(port), *conf], check=True)
    c = Cluster(path, port)
    try:
        yield c
    finally:
        subprocess.run([str(ROOT / "scripts/pgcluster.sh"), "stop", str(path)], check=False)
        if os.environ.get("KEEP_TEST_CLUSTER") != "1":
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def db(cluster):
    """A fresh database with the extension; dropped afterwards."""
    name = cluster.new_database()
    yield name
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE IF EXISTS {name}")
