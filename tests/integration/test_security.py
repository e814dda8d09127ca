"""The threat model (README, "Security"), attacked from each role on a real
cluster. Each attack is performed and shown to fail, beside the legitimate
use that must keep working."""
import json
import os
import pathlib
import shutil
import time

import psycopg
import pytest

from conftest import wait_for
from receivers import HttpReceiver
from test_worker import worker_pid


@pytest.fixture
def roles(cluster, db):
    """mallory: any login role, allowed to create in public (as on databases
    made before PostgreSQL 15); app: a capture-only role."""
    suffix = db.rsplit("_", 2)[-2] + "_" + db.rsplit("_", 1)[-1]
    mallory, app = f"mallory_{suffix}", f"app_{suffix}"
    with cluster.connect() as c:
        c.execute(f"CREATE ROLE {mallory} LOGIN CREATEDB")
        c.execute(f"CREATE ROLE {app} LOGIN")
    with cluster.connect(db) as c:
        c.execute(f"GRANT CREATE ON SCHEMA public TO {mallory}")
        c.execute(f"GRANT EXECUTE ON FUNCTION fraiseql_capture_error(text, text, text, jsonb, text, text, text, text, text, text, timestamptz, boolean) TO {app}")
    yield {"mallory": mallory, "app": app}
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        for r in (mallory, app):
            c.execute(f"DROP ROLE IF EXISTS {r}")


@pytest.fixture
def http():
    r = HttpReceiver().start()
    yield r
    r.stop()


def is_superuser(cluster, role):
    with cluster.connect() as c:
        return c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


def log(conn):
    return conn.execute("SELECT status, error_message FROM tb_error_notification_log ORDER BY sent_at").fetchall()


# ---------------------------------------------------------------------------
# 2. The worker is touched only by commands that will run
# ---------------------------------------------------------------------------

def test_failing_commands_of_a_non_owner_never_touch_the_worker(cluster, db, roles):
    m = roles["mallory"]
    pid = wait_for(lambda: worker_pid(cluster, db), what="worker")
    with cluster.connect(user=m) as c:
        for sql in [f"DROP DATABASE {db}", f"ALTER DATABASE {db} RENAME TO x_{db}",
                    f"CREATE DATABASE y_{db} TEMPLATE {db}", f"ALTER DATABASE {db} SET TABLESPACE pg_default"]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql)
    with cluster.connect(db, user=m) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DROP EXTENSION fraiseql_obs")
        # the same inside a transaction block that is rolled back
        c.autocommit = False
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DROP EXTENSION fraiseql_obs")
        c.rollback()
        # a schema of its own holding a table named like the extension's,
        # dropped with CASCADE and rolled back: not the extension's schema
        c.autocommit = True
        with cluster.connect(db) as su:
            su.execute(f"GRANT CREATE ON DATABASE {db} TO {m}")
        c.execute(f"CREATE SCHEMA own_{m}")
        c.execute(f"CREATE TABLE own_{m}.tb_error_log ()")
        c.autocommit = False
        c.execute("SAVEPOINT s")
        c.execute(f"DROP SCHEMA own_{m} CASCADE")
        c.execute("ROLLBACK TO s")
        c.rollback()
    time.sleep(1.5)  # a launcher tick: a stopped worker would be gone by now
    assert worker_pid(cluster, db) == pid
    # ... and it still works
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_capture_error('E', 'still served')")
        wait_for(lambda: c.execute("SELECT occurrence_count FROM tb_error_log").fetchone()[0] == 1, what="fold")


def test_owner_commands_that_fail_release_the_worker_at_once(cluster, db):
    pid = wait_for(lambda: worker_pid(cluster, db), what="worker")
    with cluster.connect(db) as c:
        c.autocommit = False
        c.execute("DROP EXTENSION fraiseql_obs")  # stops the worker (it would deadlock with DROP)
        c.rollback()                              # ... and the hold ends with the transaction
    new = wait_for(lambda: worker_pid(cluster, db), timeout=5, what="worker back after the rollback")
    assert new != pid
    # CREATE DATABASE ... TEMPLATE, refused because the template is in use by another session
    with cluster.connect(db) as busy:
        with cluster.connect() as c:
            with pytest.raises(psycopg.errors.ObjectInUse):
                c.execute(f"CREATE DATABASE z_{db} TEMPLATE {db}")
        wait_for(lambda: worker_pid(cluster, db), timeout=5, what="worker back after the failed CREATE DATABASE")


def test_alter_database_set_tablespace_works(cluster, db):
    wait_for(lambda: worker_pid(cluster, db), what="worker")
    where = pathlib.Path(f"/tmp/fraiseql_obs_ts_{db}")
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir()
    shutil.chown(where, "postgres", "postgres")
    ts = f"ts_{db}"
    try:
        with cluster.connect() as c:
            c.execute(f"CREATE TABLESPACE {ts} LOCATION '{where}'")
            c.execute(f"ALTER DATABASE {db} SET TABLESPACE {ts}")
            assert c.execute("SELECT t.spcname FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace "
                             "WHERE d.datname = %s", (db,)).fetchone()[0] == ts
        wait_for(lambda: worker_pid(cluster, db), timeout=5, what="worker back after the move")
    finally:
        with cluster.connect() as c:
            c.execute(f"ALTER DATABASE {db} SET TABLESPACE pg_default")
            c.execute(f"DROP TABLESPACE IF EXISTS {ts}")
        shutil.rmtree(where, ignore_errors=True)


# ---------------------------------------------------------------------------
# 3. Nothing runs with more rights than its owner
# ---------------------------------------------------------------------------

HANDLER = """
CREATE FUNCTION public.{name}(error jsonb, config jsonb, OUT success boolean, OUT error_message text)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.handler_calls SELECT current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
    BEGIN
        RESET ROLE;
        INSERT INTO public.handler_calls VALUES ('reset role worked', true);
    EXCEPTION WHEN OTHERS THEN
        INSERT INTO public.handler_calls VALUES ('reset role refused: ' || SQLERRM, false);
    END;
    IF config->>'sleep' IS NOT NULL THEN PERFORM pg_sleep((config->>'sleep')::float); END IF;
    success := true;
END $$;
"""


def test_custom_handler_runs_as_its_owner_with_a_timeout(cluster, db, roles):
    m = roles["mallory"]
    with cluster.connect(db, user=m) as c:
        c.execute("CREATE TABLE public.handler_calls (who text, super boolean)")
        c.execute(HANDLER.format(name="mallory_channel"))
    with cluster.connect(db) as c:
        # a superuser may register a function another role owns; it runs as that owner
        c.execute("SELECT fraiseql_register_channel('mallory', 'public.mallory_channel(jsonb, jsonb)'::regprocedure)")
        c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config) VALUES ('mallory', '{}')")
        c.execute("SELECT fraiseql_capture_error('E', 'run the handler')")
        wait_for(lambda: log(c), what="delivery")
        assert log(c)[0][0] == "sent", log(c)
        calls = c.execute("SELECT who, super FROM public.handler_calls").fetchall()
        assert calls[0] == (m, False), calls
        assert not any(s for _, s in calls), calls
        assert any(w.startswith("reset role refused") for w, _ in calls), calls
        assert not is_superuser(cluster, m)
        # a handler that hangs is ended by its statement timeout (notification_timeout = 1.5 s)
        c.execute("UPDATE tb_error_notification_config SET channel_config = '{\"sleep\": 30}'")
        c.execute("DELETE FROM tb_error_notification_log")
        started = time.monotonic()
        c.execute("SELECT fraiseql_capture_error('E', 'hang the handler')")
        wait_for(lambda: log(c), what="failed attempt")
        assert time.monotonic() - started < 10
        status, err = log(c)[0]
        assert status in ("retrying", "failed") and "statement timeout" in err, log(c)


def test_registering_another_roles_function_is_refused(cluster, db, roles):
    m = roles["mallory"]
    with cluster.connect(db) as c:
        c.execute("CREATE TABLE public.handler_calls (who text, super boolean)")
        c.execute(HANDLER.format(name="postgres_channel"))
        c.execute(f"GRANT INSERT, UPDATE, SELECT ON tb_notification_channel TO {m}")
        c.execute(f"GRANT EXECUTE ON FUNCTION fraiseql_register_channel(text, regprocedure, jsonb) TO {m}")
    with cluster.connect(db, user=m) as c:
        for sql in ["SELECT fraiseql_register_channel('x', 'public.postgres_channel(jsonb, jsonb)'::regprocedure)",
                    "INSERT INTO tb_notification_channel (channel_type, handler) VALUES ('y', 'public.postgres_channel(jsonb, jsonb)')"]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must own function"):
                c.execute(sql)
        # its own function is fine, and registering it again too
        c.execute(HANDLER.format(name="own_channel"))
        c.execute("SELECT fraiseql_register_channel('own', 'public.own_channel(jsonb, jsonb)'::regprocedure)")
        c.execute("SELECT fraiseql_register_channel('own', 'public.own_channel(jsonb, jsonb)'::regprocedure, '{\"k\": 1}')")


def test_a_registrar_cannot_take_another_teams_channel(cluster, db, roles):
    """Registering needs UPDATE on the channels (an upsert); that right must
    not let one registrar point another team's channel at its own function,
    nor the built-in webhook's default URL at its own server."""
    m, team = roles["mallory"], roles["app"]
    with cluster.connect(db) as c:
        c.execute("CREATE TABLE public.handler_calls (who text, super boolean)")
        c.execute("GRANT INSERT ON public.handler_calls TO PUBLIC")
        for r in (m, team):
            c.execute(f"GRANT CREATE ON SCHEMA public TO {r}")
            c.execute(f"GRANT INSERT, UPDATE, DELETE, SELECT, TRUNCATE ON tb_notification_channel TO {r}")
            c.execute(f"GRANT EXECUTE ON FUNCTION fraiseql_register_channel(text, regprocedure, jsonb),"
                      f" fraiseql_set_channel_defaults(text, jsonb) TO {r}")
    with cluster.connect(db, user=team) as c:
        c.execute(HANDLER.format(name="team_channel"))
        c.execute("SELECT fraiseql_register_channel('pagerduty', 'public.team_channel(jsonb, jsonb)'::regprocedure,"
                  " '{\"routing_key\": \"team-secret\"}')")
    with cluster.connect(db, user=m) as c:
        c.execute(HANDLER.format(name="steal_channel"))
        for sql in ["SELECT fraiseql_register_channel('pagerduty', 'public.steal_channel(jsonb, jsonb)'::regprocedure)",
                    "UPDATE tb_notification_channel SET handler = 'public.steal_channel(jsonb,jsonb)' WHERE channel_type = 'pagerduty'",
                    "UPDATE tb_notification_channel SET default_config = '{\"url\": \"http://127.0.0.1:9/\"}' WHERE channel_type = 'webhook'",
                    "SELECT fraiseql_set_channel_defaults('webhook', '{\"url\": \"http://127.0.0.1:9/\"}')",
                    "UPDATE tb_notification_channel SET registered_by = current_user WHERE channel_type = 'pagerduty'",
                    "DELETE FROM tb_notification_channel WHERE channel_type = 'pagerduty'"]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="belongs to role"):
                c.execute(sql)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only a superuser may truncate"):
            c.execute("TRUNCATE tb_notification_channel")
        # its own channel it may register, change and remove
        c.execute("SELECT fraiseql_register_channel('mine', 'public.steal_channel(jsonb, jsonb)'::regprocedure)")
        c.execute("UPDATE tb_notification_channel SET default_config = '{\"a\": 1}' WHERE channel_type = 'mine'")
        c.execute("DELETE FROM tb_notification_channel WHERE channel_type = 'mine'")
    with cluster.connect(db) as c:
        assert c.execute("SELECT handler, default_config->>'routing_key', registered_by FROM tb_notification_channel"
                         " WHERE channel_type = 'pagerduty'").fetchone() == ("public.team_channel(jsonb,jsonb)", "team-secret", team)
        assert c.execute("SELECT default_config FROM tb_notification_channel WHERE channel_type = 'webhook'").fetchone()[0] == {}
        # the built-in channels are the installer's; a superuser still sets their defaults
        c.execute("SELECT fraiseql_set_channel_defaults('webhook', '{\"timeout_ms\": 1000}')")
        assert c.execute("SELECT count(*) FROM tb_notification_channel WHERE registered_by IS NULL").fetchone()[0] == 0


TRAPS = """
CREATE TABLE public.trap_log (who text, super boolean, what text);
CREATE FUNCTION public.trap(what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.trap_log SELECT current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), what;
    BEGIN
        EXECUTE format('ALTER ROLE %I SUPERUSER', '{m}');
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
END $$;
-- better matches than the built-ins for the argument types the extension passes
CREATE FUNCTION public.cardinality(public._fraiseql_fold[]) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('cardinality'); RETURN 0; END $$;
CREATE FUNCTION public.format(text, regclass) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('format/2'); RETURN 'SELECT 1'; END $$;
CREATE FUNCTION public.format(text, regclass, text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('format/3'); RETURN 'SELECT 1'; END $$;
CREATE FUNCTION public.jsonb_build_object(text, uuid) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('jsonb_build_object'); RETURN '{{}}'; END $$;
CREATE FUNCTION public.left(text, bigint) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('left'); RETURN ''; END $$;
CREATE FUNCTION public.trap_eq(public._fraiseql_fold, public._fraiseql_fold) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('operator ='); RETURN true; END $$;
CREATE OPERATOR public.= (LEFTARG = public._fraiseql_fold, RIGHTARG = public._fraiseql_fold, FUNCTION = public.trap_eq);
CREATE FUNCTION public.trap_text_eq(text, character varying) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('operator text = varchar'); RETURN true; END $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = character varying, FUNCTION = public.trap_text_eq);
"""


PRE_INSTALL_TRAPS = """
CREATE TABLE public.trap_log (who text, super boolean, what text);
GRANT INSERT ON public.trap_log TO PUBLIC;
CREATE FUNCTION public.trap(what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.trap_log SELECT current_user, rolsuper, what FROM pg_roles WHERE rolname = current_user; END $$;
-- better matches than the extension's own or pg_catalog's for what its views call
CREATE FUNCTION public._fraiseql_partition_bounds(part oid, OUT lower_bound timestamptz, OUT upper_bound timestamptz)
LANGUAGE plpgsql AS $$ BEGIN PERFORM public.trap('partition_bounds'); END $$;
CREATE FUNCTION public.trap_plus(bigint, numeric) RETURNS numeric LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('+'); RETURN $1::numeric + $2; END $$;
CREATE OPERATOR public.+ (LEFTARG = bigint, RIGHTARG = numeric, FUNCTION = public.trap_plus);
CREATE FUNCTION public.trap_append(uuid[], uuid) RETURNS uuid[] LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('||'); RETURN array_append($1, $2); END $$;
CREATE OPERATOR public.|| (LEFTARG = uuid[], RIGHTARG = uuid, FUNCTION = public.trap_append);
"""


def test_objects_planted_before_the_install_never_run_as_the_superuser(cluster):
    """A role that may create in public before CREATE EXTENSION offers better
    matches than pg_catalog's for what the views call: an exact-type function
    (a view binds its calls when it is created), an operator on (bigint,
    numeric). The views use none of them; one the install cannot avoid is
    found before anything runs, and the install is refused, naming it."""
    db = cluster.new_database(extension=False)
    other = cluster.new_database(extension=False)
    m = f"mallory_pre_{os.getpid()}"
    with cluster.connect() as c:
        c.execute(f"CREATE ROLE {m} LOGIN")
    try:
        for d in (db, other):
            with cluster.connect(d) as c:
                c.execute(f"GRANT CREATE ON SCHEMA public TO {m}")
            with cluster.connect(d, user=m) as c:
                c.execute(PRE_INSTALL_TRAPS)
        with cluster.connect(db) as c:
            c.execute("CREATE EXTENSION fraiseql_obs")
            c.execute("SELECT fraiseql_capture_error('E', 'one', 'Traceback', context => '{\"user_id\": \"u\"}')")
            c.execute("SELECT fraiseql_capture_error('E', 'one', 'Traceback')")
            c.execute("SELECT fraiseql_run_maintenance()")
            c.execute("SELECT * FROM v_partitions")
            c.execute("SELECT occurrence_count, users_affected FROM v_error_groups")
            wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 2, what="fold")
            assert c.execute("SELECT occurrence_count, users_affected FROM v_error_groups").fetchall() == [(2, 1)]
            assert c.execute("SELECT count(*) FROM _fraiseql_foreign_dependencies()").fetchone()[0] == 0
            assert c.execute("SELECT * FROM public.trap_log").fetchall() == []
        # one that no view can avoid (an exact count(text) beats count("any")): refused
        with cluster.connect(other, user=m) as c:
            c.execute("CREATE FUNCTION public.trap_count(bigint, text) RETURNS bigint LANGUAGE plpgsql AS $$"
                      " BEGIN PERFORM public.trap('count'); RETURN $1 + 1; END $$")
            c.execute("CREATE AGGREGATE public.count(text) (SFUNC = public.trap_count, STYPE = bigint, INITCOND = '0')")
        with cluster.connect(other) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute("CREATE EXTENSION fraiseql_obs")
            assert "count(text)" in str(e.value), e.value
            assert c.execute("SELECT * FROM public.trap_log").fetchall() == []
            assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'fraiseql_obs'").fetchone()[0] == 0
        assert not is_superuser(cluster, m)
    finally:
        with cluster.connect() as c:
            for d in (db, other):
                c.execute(f"DROP DATABASE IF EXISTS {d} WITH (FORCE)")
            c.execute(f"DROP ROLE IF EXISTS {m}")


def test_objects_in_a_writable_schema_never_run_as_the_superuser(cluster, db, roles):
    """CVE-2018-1058: the extension lives in public, which mallory may write."""
    m = roles["mallory"]
    with cluster.connect(db, user=m) as c:
        c.execute(TRAPS.replace("{m}", m))
    with cluster.connect(db, user=roles["app"]) as app:
        app.execute("SELECT fraiseql_capture_error('E', 'one', 'Traceback', environment => 'production')")
        app.execute("SELECT fraiseql_capture_error('E2', 'two')")
    with cluster.connect(db) as c:
        c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, notify_on_occurrence) "
                  "VALUES ('pg_notify', '{}', '{1,2,3}')")
        c.execute("SELECT fraiseql_capture_error('E', 'three')")
        wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 3, what="fold")
        # maintenance, rollups, delivery, the workflow, by the worker and by hand
        c.execute("SELECT fraiseql_run_maintenance()")
        c.execute("SELECT fraiseql_refresh_rollups()")
        eid = c.execute("SELECT error_id FROM v_error_groups LIMIT 1").fetchone()[0]
        c.execute("SELECT fraiseql_resolve_error(%s)", (eid,))
        c.execute("SELECT fraiseql_capture_error('E', 'regress')")
        n = c.execute("SELECT count(*) FROM v_maintenance_runs").fetchone()[0]
        wait_for(lambda: c.execute("SELECT count(*) FROM v_maintenance_runs").fetchone()[0] > n, what="worker maintenance")
        wait_for(lambda: log(c), what="a delivery")
        fired = c.execute("SELECT who, super, what FROM public.trap_log WHERE super").fetchall()
        assert fired == [], fired
    assert not is_superuser(cluster, m)


def test_change_tracking_runs_user_casts_as_the_writer(cluster, db, roles):
    m = roles["mallory"]
    with cluster.connect(db, user=m) as c:
        c.execute(TRAPS.replace("{m}", m))
        c.execute("CREATE TYPE public.mood AS ENUM ('happy', 'sad')")
        c.execute("""CREATE FUNCTION public.mood_json(public.mood) RETURNS json LANGUAGE plpgsql AS $$
                     BEGIN PERFORM public.trap('cast to json'); RETURN to_json($1::text); END $$""")
        c.execute("CREATE CAST (public.mood AS json) WITH FUNCTION public.mood_json(public.mood)")
        c.execute("CREATE TABLE public.orders (id int PRIMARY KEY, mood public.mood)")
    with cluster.connect(db) as c:
        c.execute(f"GRANT EXECUTE ON FUNCTION fraiseql_track_changes(regclass, text) TO {m}")
        c.execute(f"GRANT EXECUTE ON FUNCTION _fraiseql_track_changes_trigger() TO {m}")
    with cluster.connect(db, user=m) as c:
        c.execute("SELECT fraiseql_track_changes('public.orders')")
        c.execute("INSERT INTO public.orders VALUES (1, 'happy')")
        c.execute("UPDATE public.orders SET mood = 'sad'")
        c.execute("UPDATE public.orders SET mood = 'sad'")  # no change: no row
        c.execute("DELETE FROM public.orders")
        # the function cannot be called directly to forge rows
        with pytest.raises(psycopg.Error, match="trigger"):
            c.execute("SELECT _fraiseql_track_changes_trigger()")
    with cluster.connect(db) as c:
        rows = c.execute("SELECT change_type, entity_id, before_data->>'mood', after_data->>'mood' "
                         "FROM tb_entity_change_log ORDER BY changed_at, change_type DESC").fetchall()
        assert [r[0] for r in rows] == ["insert", "update", "delete"], rows
        assert rows[1][1:] == ("1", "happy", "sad")
        calls = c.execute("SELECT who, super FROM public.trap_log WHERE what = 'cast to json'").fetchall()
        assert calls and all(w == m and not s for w, s in calls), calls
        # a superuser writing the table runs the cast as itself: nobody gains rights
        c.execute("INSERT INTO public.orders VALUES (2, 'happy')")
    assert not is_superuser(cluster, m)


# ---------------------------------------------------------------------------
# 4-6. Rules: files, destinations, escaping
# ---------------------------------------------------------------------------

def rule(conn, channel_type, config, **cols):
    names = ["channel_type", "channel_config", *cols]
    values = [channel_type, json.dumps(config), *cols.values()]
    return conn.execute(f"INSERT INTO tb_error_notification_config ({', '.join(names)}) "
                        f"VALUES ({', '.join(['%s'] * len(names))}) RETURNING config_id", values).fetchone()[0]


def test_rules_cannot_read_server_files(cluster, db):
    with cluster.connect(db) as c:
        for path in ["/dev/zero", "/etc/passwd", "../../etc/passwd", "sub/ca.pem"]:
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="tls_ca_file"):
                rule(c, "email", {"to": ["a@example.com"], "smtp_host": "localhost", "tls_ca_file": path})
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="64 KiB"):
            rule(c, "email", {"to": ["a@example.com"], "smtp_host": "localhost", "tls_ca_pem": "x" * 70000})
        # a bare file name without the superuser's directory: refused at delivery, and the
        # message is the same whether the file exists or not
        rule(c, "email", {"to": ["a@example.com"], "smtp_host": "localhost", "smtp_port": 9, "tls_ca_file": "passwd"})
        c.execute("SELECT fraiseql_capture_error('E', 'mail me')")
        wait_for(lambda: log(c), what="failed delivery")
        status, err = log(c)[0]
        assert status == "failed" and "tls_ca_directory" in err, log(c)


def with_allowed_hosts(cluster, value):
    with cluster.connect() as c:
        c.execute(f"ALTER SYSTEM SET fraiseql_obs.notification_allowed_hosts = '{value}'")
        c.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)


def test_default_allow_list_refuses_local_destinations(cluster, db, http):
    with_allowed_hosts(cluster, "*")
    try:
        with cluster.connect(db) as c:
            port = http.port
            urls = [f"http://127.0.0.1:{port}/a", f"http://localhost:{port}/b", f"http://user:pw@127.0.0.1:{port}/c",
                    f"http://2130706433:{port}/d", f"http://0x7f000001:{port}/e", f"http://[::ffff:127.0.0.1]:{port}/f",
                    f"http://[::1]:{port}/g", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/h"]
            for u in urls:
                rule(c, "webhook", {"url": u})
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="Host"):
                rule(c, "webhook", {"url": "http://example.com/", "headers": {"Host": "internal"}})
            c.execute("SELECT fraiseql_capture_error('E', 'go local')")
            wait_for(lambda: len(log(c)) == len(urls), what="every attempt recorded")
            assert all(s == "failed" for s, _ in log(c)), log(c)
            assert all("refused" in e or "not allowed" in e for _, e in log(c)), log(c)
            assert http.requests == []
    finally:
        with_allowed_hosts(cluster, "127.0.0.1,localhost")
    # an explicit entry allows the local receiver again
    with cluster.connect(db) as c:
        c.execute("DELETE FROM tb_error_notification_config")
        c.execute("DELETE FROM tb_error_notification_log")
        rule(c, "webhook", {"url": http.url + "/ok"})
        c.execute("SELECT fraiseql_capture_error('E', 'allowed')")
        wait_for(lambda: http.requests, what="delivery to an allowed host")


def test_template_values_cannot_inject(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, "webhook", {"url": http.url + "/t", "template": '{"text": "{error_message} in {environment}"}'})
        rule(c, "slack", {"webhook_url": http.url + "/services/T/B/x"})
        c.execute("""SELECT fraiseql_capture_error('E', 'x", "injected": "yes {environment} <!channel> <http://evil|your bank>')""")
        wait_for(lambda: len(http.requests) == 2, what="both deliveries")
        by_path = {r["path"]: json.loads(r["body"]) for r in http.requests}
        body = by_path["/t"]
        assert set(body) == {"text"}, body
        assert body["text"].startswith('x", "injected": "yes {environment} <!channel>'), body
        slack = json.dumps(by_path["/services/T/B/x"])
        assert "<!channel>" not in slack and "<http://evil" not in slack
        assert "&lt;!channel&gt;" in slack


# ---------------------------------------------------------------------------
# 7. Bounded input
# ---------------------------------------------------------------------------

def test_capture_input_is_bounded(cluster, db, roles):
    big = "x" * 1_000_000
    with cluster.connect(db, user=roles["app"]) as app:
        app.execute("SELECT fraiseql_capture_error(%s, 'm', environment => %s, release_version => %s, fingerprint => %s)",
                    (big, big, big, big))
        # compressible: small on disk, 10 MB when read
        app.execute("SELECT fraiseql_capture_error('Big', 'context', context => jsonb_build_object('a', repeat('x', 10000000)))")
        for when in ["infinity", "-infinity", "1970-01-02", "2554-01-01"]:
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="occurred_at"):
                app.execute("SELECT fraiseql_capture_error('E', 'm', occurred_at => %s::timestamptz)", (when,))
    with cluster.connect(db) as c:
        t, env, rel = c.execute("SELECT error_type, environment, release_version FROM tb_error_occurrence").fetchone()
        assert len(t.encode()) <= 512 and len(env.encode()) <= 64 and len(rel.encode()) <= 200
        assert "truncated" in t
        size = c.execute("SELECT octet_length(context::text) FROM tb_error_occurrence WHERE error_type = 'Big'").fetchone()[0]
        assert size <= 64 * 1024 + 1024, size
        r = c.execute("""SELECT fraiseql_ingest_otlp_traces('{"resourceSpans": [{"scopeSpans": [{"spans": [
              {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331", "name": "old",
               "startTimeUnixNano": "1000000000", "endTimeUnixNano": "2000000000"}]}]}]}')""").fetchone()[0]
        assert r["stored"] == 0 and r["rejected"] == 1 and "startTimeUnixNano" in r["partialSuccess"]["errorMessage"]


def test_a_bad_row_never_stops_maintenance(cluster, db):
    with cluster.connect(db) as c:
        eid = c.execute("SELECT fraiseql_capture_error('E', 'seed')").fetchone()[0]
        # written directly by the owner, bypassing capture
        fp = c.execute("SELECT fingerprint FROM tb_error_occurrence WHERE error_id = %s LIMIT 1", (eid,)).fetchone()[0]
        c.execute("INSERT INTO tb_error_occurrence_default (error_id, fingerprint, occurred_at, error_type, message, severity, environment) "
                  "VALUES (%s, %s, 'infinity', 'E', 'm', 'error', 'p'), (%s, %s, now() + interval '10 years', 'E', 'm', 'error', 'p')",
                  (eid, fp, eid, fp))
        furthest = c.execute("SELECT max(partition_name) FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass "
                             "AND NOT is_default").fetchone()[0]
        c.execute(f"DROP TABLE {furthest}")
        r = c.execute("SELECT fraiseql_run_maintenance()").fetchone()[0]
        assert r["error"] is None, r
        # made again (by this run or by the worker's, every 2 s here)
        assert c.execute("SELECT count(*) FROM v_partitions WHERE partition_name = %s", (furthest,)).fetchone()[0] == 1
        # far-future rows wait in the default partition: no partition per month up to them
        n = c.execute("SELECT count(*) FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass").fetchone()[0]
        assert n < 12, n
        assert c.execute("SELECT count(*) FROM tb_error_occurrence_default").fetchone()[0] == 2


# ---------------------------------------------------------------------------
# 8. Secrets
# ---------------------------------------------------------------------------

def test_secrets_are_redacted_at_any_depth(cluster, db):
    with cluster.connect(db) as c:
        rule(c, "webhook", {"url": "http://127.0.0.1:9/x?token=abc",
                            "headers": {"Authorization": "Bearer s3cret"},
                            "nested": {"credentials": {"user": "u", "password": "p4ss"}, "list": [{"api_key": "k3y"}]},
                            "method": "POST"})
        cfg = c.execute("SELECT channel_config FROM v_notification_rules").fetchone()[0]
        text = json.dumps(cfg)
        for secret in ["abc", "s3cret", "p4ss", "k3y"]:
            assert secret not in text, cfg
        assert cfg["method"] == "POST"


def test_smtp_login_over_plaintext_is_refused(cluster, db):
    with cluster.connect(db) as c:
        rule(c, "email", {"to": ["a@example.com"], "smtp_host": "127.0.0.1", "smtp_port": 9, "tls": "none",
                          "smtp_user": "u", "smtp_password": "p"})
        c.execute("SELECT fraiseql_capture_error('E', 'mail')")
        wait_for(lambda: log(c), what="refused delivery")
        status, err = log(c)[0]
        assert status == "failed" and "unencrypted" in err, log(c)


# ---------------------------------------------------------------------------
# Second review: what a handler, a database owner or any role can still do
# ---------------------------------------------------------------------------

ROGUE_HANDLER = """
CREATE FUNCTION public.rogue(error jsonb, config jsonb, OUT success boolean, OUT error_message text)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.handler_calls VALUES (config->>'mode', false);
    IF config->>'mode' = 'settings' THEN
        -- session-level SETs that would break every later transaction of the worker
        SET default_transaction_read_only = on;
        SET statement_timeout = 1;
        PERFORM set_config('search_path', 'public', false);
    ELSIF config->>'mode' = 'swallow' THEN
        -- catches the statement timeout's cancel and goes on for ever
        LOOP
            BEGIN
                PERFORM pg_sleep(10);
            EXCEPTION WHEN query_canceled THEN
                INSERT INTO public.handler_calls VALUES ('cancel swallowed', false);
            END;
        END LOOP;
    END IF;
    success := true;
END $$;
"""


def test_a_handlers_settings_do_not_outlive_it(cluster, db, roles):
    m = roles["mallory"]
    with cluster.connect(db, user=m) as c:
        c.execute("CREATE TABLE public.handler_calls (who text, super boolean)")
        c.execute(ROGUE_HANDLER)
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_register_channel('rogue', 'public.rogue(jsonb, jsonb)'::regprocedure)")
        rule(c, "rogue", {"mode": "settings"})
        c.execute("SELECT fraiseql_capture_error('E', 'first')")
        wait_for(lambda: log(c), what="first delivery")
        assert log(c)[0][0] == "sent", log(c)
        # the worker's next transactions are read-write, untimed, as before
        c.execute("SELECT fraiseql_capture_error('E2', 'second')")
        wait_for(lambda: len(log(c)) == 2, what="second delivery")
        assert [s for s, _ in log(c)] == ["sent", "sent"], log(c)
        wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 2, what="folds")
        r = c.execute("SELECT fraiseql_run_maintenance()").fetchone()[0]
        assert r["error"] is None, r


def test_a_handler_that_swallows_its_timeout_cannot_keep_the_worker(cluster, db, roles):
    m = roles["mallory"]
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM SET fraiseql_obs.notification_max_attempts = 1")
        c.execute("SELECT pg_reload_conf()")
    try:
        with cluster.connect(db, user=m) as c:
            c.execute("CREATE TABLE public.handler_calls (who text, super boolean)")
            c.execute(ROGUE_HANDLER)
        with cluster.connect(db) as c:
            c.execute("SELECT fraiseql_register_channel('rogue', 'public.rogue(jsonb, jsonb)'::regprocedure)")
        pid = wait_for(lambda: worker_pid(cluster, db), what="worker")
        with cluster.connect(db) as c:
            rule(c, "rogue", {"mode": "swallow"})
            started = time.monotonic()
            c.execute("SELECT fraiseql_capture_error('E', 'hang for ever')")
            # the hard deadline (2 x 1.5 s + 1 s) ends that worker; another one serves the database
            wait_for(lambda: worker_pid(cluster, db) not in (None, pid), timeout=20, what="the worker ended and restarted")
            assert time.monotonic() - started < 15
            wait_for(lambda: "went on past its statement timeout" in cluster.log(), what="the reason in the server log")
            # the delivery whose outcome never came is an attempt: with one allowed, it fails (after its lease)
            wait_for(lambda: log(c), timeout=30, what="the lost delivery logged")
            status, err = log(c)[0]
            assert status == "failed" and "lease" in err, log(c)
            assert c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0
            # and the database is served: counts fold
            c.execute("SELECT fraiseql_capture_error('E', 'after')")
            wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 2, what="fold")
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET fraiseql_obs.notification_max_attempts")
            c.execute("SELECT pg_reload_conf()")


def test_no_role_can_hold_maintenance_off(cluster, db, roles):
    m = roles["mallory"]
    with cluster.connect(db, user=m) as c:
        # the lock the first version used: any role could take it
        c.execute("SELECT pg_advisory_lock(hashtext('fraiseql_obs.maintenance')::bigint)")
        c.autocommit = False
        for sql in ["SELECT FROM tb_maintenance_lock FOR UPDATE", "LOCK TABLE tb_maintenance_lock",
                    "LOCK TABLE tb_error_fold_state", "LOCK TABLE tb_rollup_state"]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql)
            c.rollback()
        c.execute("SELECT pg_advisory_lock(hashtext('fraiseql_obs.maintenance')::bigint)")
        with cluster.connect(db) as owner:
            r = owner.execute("SELECT fraiseql_run_maintenance()").fetchone()[0]
            assert r.get("busy") is None and r["error"] is None, r
            owner.execute("SELECT fraiseql_capture_error('E', 'm')")
            wait_for(lambda: owner.execute("SELECT occurrence_count FROM tb_error_log").fetchone()[0] == 1, what="fold")


def test_database_settings_cannot_break_the_worker(cluster, db):
    """A database owner's ALTER DATABASE ... SET applies to every session in
    it, the worker's too: the settings that would stop it are overridden."""
    with cluster.connect() as c:
        for setting in ["default_transaction_read_only = on", "statement_timeout = 1", "lock_timeout = 1",
                        "default_transaction_isolation = serializable", "search_path = public",
                        "DateStyle = 'SQL, DMY'", "idle_in_transaction_session_timeout = 1"]:
            c.execute(f"ALTER DATABASE {db} SET {setting}")
        old = wait_for(lambda: worker_pid(cluster, db), what="worker")
        c.execute("SELECT pg_terminate_backend(%s)", (old,))
        wait_for(lambda: worker_pid(cluster, db) not in (None, old), timeout=20, what="a worker with the new settings")
    ours = "-c statement_timeout=0 -c lock_timeout=0 -c default_transaction_read_only=off -c idle_in_transaction_session_timeout=0"
    with cluster.connect(db, options=ours) as c:
        c.execute("SELECT fraiseql_capture_error('E', 'counted')")
        wait_for(lambda: c.execute("SELECT occurrence_count FROM tb_error_log").fetchone()[0] == 1, what="fold")
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_maintenance_run WHERE triggered_by = 'worker' "
                                   "AND last_error IS NULL AND started_at > now() - interval '5 seconds'").fetchone()[0],
                 what="a clean maintenance run")


def test_a_command_refused_in_a_pipeline_or_block_never_touches_the_worker(cluster, db):
    pid = wait_for(lambda: worker_pid(cluster, db), what="worker")
    with cluster.connect() as c:
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            with c.pipeline():
                c.execute("SELECT 1")
                c.execute(f"DROP DATABASE {db}")
    with cluster.connect(autocommit=False) as c:
        c.execute("SELECT 1")
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            c.execute(f"ALTER DATABASE {db} SET TABLESPACE pg_default")
        c.rollback()
    time.sleep(1.5)
    assert worker_pid(cluster, db) == pid


def test_spans_are_bounded_one_by_one(cluster, db, roles):
    big = "n" * 100_000
    now_ns = time.time_ns()

    def span(i, **kw):
        s = {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": f"{i:016x}", "name": f"op{i}",
             "startTimeUnixNano": str(now_ns), "endTimeUnixNano": str(now_ns + 1_000_000)}
        s.update(kw)
        return s
    spans = [
        span(1, name=big, status={"code": 2, "message": big}),
        span(2, attributes=[{"key": "long", "value": {"stringValue": "v" * 100_000}}]
                + [{"key": f"k{j}", "value": {"stringValue": "v" * 100}} for j in range(1000)]),
        span(3, events=[{"timeUnixNano": str(now_ns), "name": "e"}] * 1000),
        span(4, name="é" * 1000),  # cut on a character boundary
        span(5, endTimeUnixNano=str(now_ns + 10**9 * 86400 * 400)),  # ends in more than a year
        span(6),
    ]
    payload = json.dumps({"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": big}},
        {"key": "deployment.environment", "value": {"stringValue": big}}]},
        "scopeSpans": [{"spans": spans}]}]})
    with cluster.connect(db) as c:
        c.execute(f"GRANT EXECUTE ON FUNCTION fraiseql_ingest_otlp_traces(jsonb) TO {roles['app']}")
    with cluster.connect(db, user=roles["app"]) as app:
        r = app.execute("SELECT fraiseql_ingest_otlp_traces(%s::jsonb)", (payload,)).fetchone()[0]
    assert r["stored"] == 5 and r["rejected"] == 1, r
    assert "endTimeUnixNano" in r["partialSuccess"]["errorMessage"], r
    with cluster.connect(db) as c:
        rows = {s: (n, msg, a, e, env, svc) for s, n, msg, a, e, env, svc in c.execute(
            "SELECT span_id, operation_name, status_message, attributes, events, environment, service_name FROM monitoring.traces")}
        n, msg, _, _, env, svc = rows["0000000000000001"]
        assert len(n.encode()) <= 1024 and len(msg.encode()) <= 4096 and len(env.encode()) <= 64 and len(svc.encode()) <= 200
        a = rows["0000000000000002"][2]
        assert len(a) <= 129 and a["_fraiseql_truncated"]["attributes"] == 1001 - 128, list(a)[:3]
        assert all(len(v) <= 4096 for k, v in a.items() if k != "_fraiseql_truncated")
        assert len(rows["0000000000000003"][3]) == 128
        assert rows["0000000000000004"][0] == "é" * 512
        # the rollups take the clipped names (the primary key's index stays within its limit)
        c.execute("SELECT fraiseql_refresh_rollups()")
        assert c.execute("SELECT count(*) FROM tb_rollup_operation_hour").fetchone()[0] >= 1
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="end_time"):
            c.execute("SELECT fraiseql_record_span('0af7651916cd43dd8448eb211c80319c', 'b7ad6b7169203331', 'x', "
                      "now(), 'infinity')")


def test_a_spike_is_counted_exactly_and_stored_sampled(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SET fraiseql_obs.spike_threshold = 10")
        stack = "Traceback (most recent call last):\n" + "  File \"app.py\", line 1, in f\n" * 200
        for _ in range(300):
            c.execute("SELECT fraiseql_capture_error('LoopError', %s, %s, jsonb_build_object('big', repeat('x', 5000)))",
                      ("m" * 1000, stack))
        total, light = c.execute("SELECT count(*), count(*) FILTER (WHERE sampled_out) FROM tb_error_occurrence").fetchone()
        assert total == 300
        # the first 10 of the minute whole, then one in 100 (a minute boundary in between allows 10 more)
        assert 300 - 10 - 3 - 10 <= light <= 300 - 10 - 2, light
        heavy = c.execute("SELECT count(*) FROM tb_error_occurrence WHERE sampled_out AND "
                          "(stack_trace IS NOT NULL OR context IS NOT NULL OR octet_length(message) > 256)").fetchone()[0]
        assert heavy == 0
        assert c.execute("SELECT occurrence_count, occurrences_not_stored FROM v_error_groups").fetchone() == (300, light)
        wait_for(lambda: c.execute("SELECT occurrence_count, occurrences_not_stored FROM tb_error_log").fetchone()
                 == (300, light), what="fold")
        # the rollups count every occurrence too
        c.execute("SELECT fraiseql_refresh_rollups()")
        assert c.execute("SELECT sum(occurrences) FROM tb_rollup_error_minute").fetchone()[0] == 300


def test_drop_schema_cascade_of_the_extension(cluster, db, roles):
    """DROP SCHEMA ... CASCADE of the extension's schema drops the extension:
    refused for a non-owner without touching the worker; for the owner the
    worker steps aside first (no deadlock) and nothing is left running."""
    pid = wait_for(lambda: worker_pid(cluster, db), what="worker")
    with cluster.connect(db, user=roles["mallory"]) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DROP SCHEMA public CASCADE")
    time.sleep(1.5)
    assert worker_pid(cluster, db) == pid
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_capture_error('E', 'busy')")
        # (monitoring belongs to the extension: PostgreSQL refuses to drop it alone)
        with pytest.raises(psycopg.errors.DependentObjectsStillExist):
            c.execute("DROP SCHEMA monitoring CASCADE")
        assert worker_pid(cluster, db) == pid
        c.execute("DROP SCHEMA public CASCADE")
        assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'fraiseql_obs'").fetchone()[0] == 0
    time.sleep(2)
    assert worker_pid(cluster, db) is None


# ---------------------------------------------------------------------------
# Rule writers: what INSERT on the rules gives, and what it must not
# ---------------------------------------------------------------------------

def test_a_rule_writer_gets_no_default_credentials_for_its_own_destination(cluster, db, roles, http):
    """The README's rule writer (INSERT on the rules, nothing else) can add
    rules; one that names its own destination gets none of the channel
    defaults' credentials, which still go to the defaults' destination."""
    m = roles["mallory"]
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_set_channel_defaults('webhook', %s)",
                  (json.dumps({"url": http.url + "/team", "headers": {"Authorization": "Bearer s3cret"}}),))
        c.execute(f"GRANT INSERT ON tb_error_notification_config TO {m}")
        rule(c, "webhook", {})  # the owner's rule: the defaults, credentials included
    with cluster.connect(db, user=m) as w:
        w.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config) VALUES ('webhook', %s)",
                  (json.dumps({"url": http.url + "/mine"}),))
        # the same host, another way in: still no credentials
        w.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config) VALUES ('webhook', %s)",
                  (json.dumps({"url": http.url + "/team", "method": "PUT", "tls_ca_pem": "x"}),))
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_capture_error('E', 'deliver me')")
        wait_for(lambda: len(http.requests) >= 3, what="three deliveries")
    by_path = {}
    for r in http.requests:
        by_path.setdefault((r["path"], r["method"]), []).append(r["headers"].get("authorization"))
    assert by_path[("/team", "POST")] == ["Bearer s3cret"], by_path
    assert by_path[("/mine", "POST")] == [None], by_path
    assert by_path[("/team", "PUT")] == [None], by_path
    with cluster.connect(db) as c:
        # e-mail: the team's login never sends as another sender, nor elsewhere
        merged = lambda rule_cfg: c.execute(
            "SELECT _fraiseql_channel_config(%s, %s)",
            (json.dumps({"smtp_host": "smtp.example.com", "smtp_user": "team", "smtp_password": "pw",
                         "from_address": "alerts@example.com"}), json.dumps(rule_cfg))).fetchone()[0]
        assert merged({"to": ["oncall@example.com"]})["smtp_password"] == "pw"
        for cfg in ({"from": "CEO <ceo@example.com>"}, {"from_address": "ceo@example.com"},
                    {"smtp_host": "mx.elsewhere.example"}, {"tls": "none"}):
            assert "smtp_password" not in merged(cfg) and "smtp_user" not in merged(cfg), cfg


def test_a_rule_condition_that_would_run_for_hours_is_refused(cluster, db):
    with cluster.connect(db) as c:
        for cond, why in [
            ('exists($.** ? (exists($.** ? (exists($.** ? (@ == "no"))))))', "root"),
            ('exists($.** ? (exists(@.** ? (@ == "no"))))', "recursive"),
            ('exists($.context.a[*] ? (exists($.context.a[*] ? (@ == 1))))', "root"),
            ('exists($.a ? (exists(@.b ? (exists(@.c ? (exists(@.d ? (@ == 1))))))))', "deep"),
            ('exists($' + '[0,0,0,0,0,0,0,0,0,0]' * 12 + '.nope)', "several"),
            ('exists($.a[0 to 1000000000])', "range"),
            ('$.a[*].* == $.b[*]', "wildcards"),
        ]:
            with pytest.raises(psycopg.errors.InvalidParameterValue, match=why):
                rule(c, "pg_notify", {}, condition=cond)
        # what the README documents stays accepted
        rule(c, "pg_notify", {}, condition='$.context.user_id == "vip"')
        rule(c, "pg_notify", {}, condition='exists($.context.items[*] ? (@.price > 100))')


def test_slow_rules_are_skipped_suspended_and_the_counts_go_on(cluster, db):
    """Rules that together run past the fold's time for rules
    (fraiseql_obs.rules_timeout) are retried one by one, each within a
    quarter of it and all within one more: each slow one is skipped with a
    warning and suspended, so the next folds spend no time on it; the
    counts and the other rules go on. A change to a rule ends its
    suspension. (A back-reference makes the regular expression quadratic:
    an allowed condition, slow on a long string.)"""
    slow = 'exists($.** ? (@ like_regex "^(a*)\\\\1$"))'
    timeouts = lambda: cluster.log().count("canceling statement due to statement timeout")
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM SET fraiseql_obs.rules_timeout = 1000")
        c.execute("SELECT pg_reload_conf()")
    try:
        with cluster.connect(db) as c:
            c.execute("CREATE TABLE sent (tag text)")
            c.execute("""CREATE FUNCTION record_it(error jsonb, config jsonb, OUT success boolean, OUT error_message text)
                         LANGUAGE sql AS $$ INSERT INTO sent VALUES (config->>'tag') RETURNING true, NULL::text $$""")
            c.execute("SELECT fraiseql_register_channel('recorder', 'record_it(jsonb, jsonb)')")
            rule(c, "recorder", {"tag": "good"})
            for i in range(2):
                rule(c, "recorder", {"tag": f"slow{i}"}, condition=slow)
            big = json.dumps({"s": "a" * 30001})  # (seconds per evaluation on any machine)
            before = timeouts()
            with c.transaction():  # one fold
                for _ in range(20):
                    c.execute("SELECT fraiseql_capture_error('E', 'm', context => %s)", (big,))
            wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 20,
                     timeout=60, what="the counts, past the slow rules")
            wait_for(lambda: c.execute("SELECT count(*) FROM sent WHERE tag = 'good'").fetchone()[0] == 20,
                     what="the good rule")
            assert c.execute("SELECT count(*) FROM sent WHERE tag LIKE 'slow%'").fetchone()[0] == 0
            # both were struck in that fold (half of the retries' budget)
            suspended = c.execute("SELECT count(*) FROM v_notification_rules WHERE suspended_until > now()"
                                  " AND channel_config->>'tag' LIKE 'slow%'").fetchone()[0]
            assert suspended == 2, c.execute("SELECT channel_config, suspended_until, suspension_reason FROM v_notification_rules").fetchall()
            assert "suspended until" in cluster.log()
            struck = timeouts()
            assert struck > before
            # the next fold spends no time on them
            with c.transaction():
                for _ in range(20):
                    c.execute("SELECT fraiseql_capture_error('E', 'm', context => %s)", (big,))
            wait_for(lambda: c.execute("SELECT count(*) FROM sent WHERE tag = 'good'").fetchone()[0] == 40,
                     what="the good rule, next fold")
            assert c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 40
            assert timeouts() == struck
            # a change to its condition ends a rule's suspension; another change does not
            c.execute("UPDATE tb_error_notification_config SET channel_config = '{\"tag\": \"slow1b\"}'"
                      " WHERE channel_config->>'tag' = 'slow1'")
            assert c.execute("SELECT suspended_until FROM v_notification_rules WHERE channel_config->>'tag' = 'slow1b'").fetchone()[0] is not None
            c.execute("UPDATE tb_error_notification_config SET channel_config = '{\"tag\": \"fixed\"}', condition = NULL"
                      " WHERE channel_config->>'tag' = 'slow0'")
            assert c.execute("SELECT suspended_until FROM v_notification_rules WHERE channel_config->>'tag' = 'fixed'").fetchone()[0] is None
            c.execute("SELECT fraiseql_capture_error('E', 'm')")
            wait_for(lambda: c.execute("SELECT count(*) FROM sent WHERE tag = 'fixed'").fetchone()[0] == 1, what="the fixed rule")
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET fraiseql_obs.rules_timeout")
            c.execute("SELECT pg_reload_conf()")


def test_rule_checks_hold_during_a_restore_and_at_fold_time(cluster, db, roles):
    """While a restore is in progress (tb_restore_session), only the
    restoring superuser's rows skip the rule checks; and a refused condition
    already in the table (an older dump, a check bypassed) is never
    evaluated by a fold."""
    m = roles["mallory"]
    nested = 'exists($.** ? (exists($.** ? (@ == "no"))))'
    with cluster.connect(db) as c:
        c.execute(f"GRANT INSERT ON tb_error_notification_config TO {m}")
        c.execute("INSERT INTO tb_restore_session SELECT pg_backend_pid(), backend_start, pg_current_xact_id()"
                  " FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        try:
            with cluster.connect(db, user=m) as w:
                with pytest.raises(psycopg.errors.InvalidParameterValue, match="condition refused"):
                    w.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, condition)"
                              " VALUES ('pg_notify', '{}', %s)", (nested,))
        finally:
            c.execute("DELETE FROM tb_restore_session")
        c.execute("ALTER TABLE tb_error_notification_config DISABLE TRIGGER notification_config_check")
        rule(c, "pg_notify", {"channel": "nested"}, condition=nested)
        c.execute("ALTER TABLE tb_error_notification_config ENABLE TRIGGER notification_config_check")
        rule(c, "pg_notify", {"channel": "plain"})
        big = json.dumps({"a": list(range(6000))})
        c.execute("SELECT fraiseql_capture_error('E', 'm', context => %s)", (big,))
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_notification_log WHERE status = 'sent'").fetchone()[0] == 1,
                 what="the plain rule's notification")
        assert c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0
        assert c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 1


def test_squatted_names_never_leave_a_partition_without_its_indexes(cluster, db, roles):
    """A role that may create in the extension's schema takes the name of a
    coming partition and of its indexes: the partition is made under another
    name, with every index, and later months are made too."""
    m = roles["mallory"]
    with cluster.connect(db) as c:
        lo = c.execute("SELECT (date_trunc('month', now()) + interval '6 months')::date").fetchone()[0]
        name = f"tb_error_occurrence_{lo:%Y_%m}"
        lo7 = c.execute("SELECT (date_trunc('month', now()) + interval '7 months')::date").fetchone()[0]
        name7 = f"tb_error_occurrence_{lo7:%Y_%m}"
    with cluster.connect(db, user=m) as w:
        w.execute(f"CREATE TABLE public.{name} ()")
        for suffix in ("capture_xid", "error_id", "pkey"):
            w.execute(f"CREATE TABLE public.{name}_{suffix} ()")
        # a type holds a name as well as a table (a table's row type takes it)
        w.execute(f"CREATE TYPE public.{name7} AS (x int)")
        w.execute(f"CREATE TYPE public.{name7}_1 AS ENUM ()")
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_ensure_partitions('tb_error_occurrence', 9)")
        part7 = c.execute("SELECT partition_name FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass"
                          " AND lower_bound = %s::timestamptz", (lo7,)).fetchone()[0]
        assert part7 == f"{name7}_2", part7
        part = c.execute("SELECT partition_name FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass"
                         " AND lower_bound = %s::timestamptz", (lo,)).fetchone()[0]
        assert part != name
        expected = c.execute("SELECT count(*) FROM tb_partition_index WHERE parent_table = 'tb_error_occurrence'::regclass").fetchone()[0]
        have = c.execute("SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass", (part,)).fetchone()[0]
        assert have == expected
        later = c.execute("SELECT count(*) FROM v_partitions WHERE parent_table = 'tb_error_occurrence'::regclass"
                          " AND lower_bound > %s::timestamptz", (lo,)).fetchone()[0]
        assert later >= 1


def test_a_role_holding_the_rules_locked_never_hangs_the_worker(cluster, db, roles, http):
    """A role allowed to change rules (UPDATE) may lock their table; while it
    holds it the worker's loop goes on (maintenance runs; a step that needs
    the table waits 10 s at most and is retried), and everything resumes
    when it lets go."""
    m = roles["mallory"]
    with cluster.connect(db) as c:
        c.execute(f"GRANT SELECT, UPDATE ON tb_error_notification_config TO {m}")
        rule(c, "webhook", {"url": http.url + "/x"})
        c.execute("SELECT fraiseql_capture_error('E', 'before')")
        wait_for(lambda: len(http.requests) == 1, what="a first delivery")
    holder = cluster.connect(db, user=m, autocommit=False)
    try:
        holder.execute("LOCK TABLE tb_error_notification_config IN ACCESS EXCLUSIVE MODE")
        with cluster.connect(db) as c:
            c.execute("SELECT fraiseql_capture_error('E', 'while locked')")
            t0 = c.execute("SELECT clock_timestamp()").fetchone()[0]
            wait_for(lambda: c.execute("SELECT count(*) FROM tb_maintenance_run WHERE triggered_by = 'worker'"
                                       " AND started_at > %s + interval '11 seconds'", (t0,)).fetchone()[0] >= 1,
                     timeout=40, what="maintenance going on past a lock wait")
    finally:
        holder.rollback()
        holder.close()
    with cluster.connect(db) as c:
        wait_for(lambda: c.execute("SELECT sum(occurrence_count) FROM tb_error_log").fetchone()[0] == 2, what="the count")
        wait_for(lambda: len(http.requests) == 2, timeout=40, what="the delivery held up")
