"""PostgreSQL's own errors as captures (issue 15, part 2):
`fraiseql_obs.capture_sql_errors` turns each error a client session is told
about into an occurrence, through emit_log_hook and the autonomous queue."""
import threading
import time

import psycopg
import pytest

from conftest import wait_for

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def wait_for_worker(c):
    """Errors of a database are captured once its worker has found the extension."""
    c.execute("SELECT fraiseql_capture_error('Warmup', 'start the worker')")
    wait_for(lambda: c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'fraiseql_obs worker%%'"
                               " AND datname = current_database()").fetchone()[0] == 1,
             timeout=40, what="the database's worker")
    wait_for(lambda: c.execute("SELECT occurrence_count FROM tb_error_log WHERE error_type = 'Warmup'").fetchone(),
             timeout=20, what="the worker's first fold")


@pytest.fixture
def capturing(cluster, db):
    """The database, with capture_sql_errors on for its new sessions; its
    worker has found the extension."""
    with cluster.connect(db) as c:
        c.execute(f"ALTER DATABASE {db} SET fraiseql_obs.capture_sql_errors = on")
        wait_for_worker(c)
    return db


def occurrences(c, error_type):
    return c.execute("SELECT message, stack_trace, context, severity, trace_id, span_id, fingerprint"
                     " FROM tb_error_occurrence WHERE error_type = %s ORDER BY occurred_at", (error_type,)).fetchall()


def wait_occurrences(c, error_type, n, timeout=10):
    return wait_for(lambda: (lambda r: len(r) >= n and r)(occurrences(c, error_type)),
                    timeout=timeout, interval=0.05, what=f"{n} {error_type} occurrence(s)")


def stats(c):
    names = ("capacity_bytes", "used_bytes", "waiting", "queued", "stored", "dropped", "failed")
    return dict(zip(names, c.execute("SELECT * FROM fraiseql_autonomous_stats()").fetchone()))


def test_off_by_default_then_a_unique_violation_becomes_an_issue(cluster, db):
    with cluster.connect(db) as c:
        c.execute("CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE)")
        c.execute("INSERT INTO users VALUES (1, 'bob@example.com')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("INSERT INTO users VALUES (2, 'bob@example.com')")
        c.execute(f"ALTER DATABASE {db} SET fraiseql_obs.capture_sql_errors = on")
        wait_for_worker(c)
    with cluster.connect(db, application_name="orders-api") as c:
        for i in (3, 4):
            with pytest.raises(psycopg.errors.UniqueViolation):
                c.execute(f"INSERT INTO users VALUES ({i}, 'bob@example.com') /* user bob */")
        rows = wait_occurrences(c, "unique_violation", 2)
        time.sleep(0.3)
        # the one before the setting was not captured
        assert len(occurrences(c, "unique_violation")) == 2
        message, stack, ctx, severity, *_ , fp = rows[0]
        assert message == 'duplicate key value violates unique constraint "users_email_key"'
        assert severity == "error" and stack is None
        assert ctx["source"] == "postgres" and ctx["sqlstate"] == "23505"
        assert ctx["table"] == "users" and ctx["constraint"] == "users_email_key" and ctx["schema"] == "public"
        # the key's value is not kept (dashboard readers see this row)
        assert ctx["detail"] == "Key (email)=(…) already exists."
        # the statement, with no value and no comment of the application's
        assert ctx["statement"] == "INSERT INTO users VALUES ($1, $2)"
        assert ctx["user"] == "postgres" and ctx["application_name"] == "orders-api" and ctx["database"] == db
        assert isinstance(ctx["backend_pid"], int)
        # both in one group, whatever the values
        assert rows[0][6] == rows[1][6]
        group = wait_for(lambda: (lambda g: g and g[0] == 2 and g)(
            c.execute("SELECT occurrence_count, title, culprit FROM v_error_groups"
                      " WHERE error_type = 'unique_violation'").fetchone()), timeout=10, what="the group folded")
        assert group[1:] == ('unique_violation: duplicate key value violates unique constraint "users_email_key"',
                             None), group


def test_division_by_zero_in_a_transaction_with_its_trace(cluster, capturing):
    with cluster.connect(capturing, autocommit=False) as c:
        c.execute("SELECT fraiseql_set_trace_context(%s)", (TRACEPARENT,))
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT 10 / (2 - 2)")
        c.rollback()
        c.autocommit = True
        rows = wait_occurrences(c, "division_by_zero", 1)
        message, stack, ctx, severity, trace_id, span_id, _ = rows[0]
        assert message == "division by zero"
        assert ctx["statement"] == "SELECT $1 / ($2 - $3)"
        assert (trace_id, span_id) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")


def test_a_raise_two_functions_deep_names_the_inner_one(cluster, capturing):
    with cluster.connect(capturing) as c:
        c.execute("""CREATE FUNCTION inner_check(qty int) RETURNS void LANGUAGE plpgsql AS $$
                     BEGIN
                       IF qty <= 0 THEN
                         RAISE EXCEPTION 'quantity must be positive, got %', qty USING ERRCODE = 'check_violation',
                           HINT = 'send a positive quantity';
                       END IF;
                     END $$""")
        c.execute("""CREATE FUNCTION create_order(qty int) RETURNS void LANGUAGE plpgsql AS $$
                     BEGIN
                       PERFORM inner_check(qty);
                     END $$""")
        for qty in (-1, -7):
            with pytest.raises(psycopg.errors.CheckViolation):
                c.execute("SELECT create_order(%s)", (qty,))
        rows = wait_occurrences(c, "check_violation", 2)
        # different parameters, one group
        assert rows[0][6] == rows[1][6]
        message, stack, ctx, *_ = rows[0]
        assert message == "quantity must be positive, got -1"
        assert ctx["hint"] == "send a positive quantity"
        assert stack.splitlines()[0].startswith("PL/pgSQL function inner_check(integer) line 4 at RAISE")
        assert "create_order(integer)" in stack
        # the SQL the CONTEXT quotes is normalized too
        assert "-1" not in stack and "-7" not in stack
        group = wait_for(lambda: c.execute("SELECT occurrence_count, culprit FROM v_error_groups"
                                           " WHERE error_type = 'check_violation'").fetchone(),
                         timeout=10, what="the group")
        assert group[1] is not None and "inner_check" in group[1] and "create_order" not in group[1]
        # the function edited: its RAISE moves two lines down, same group
        c.execute("""CREATE OR REPLACE FUNCTION inner_check(qty int) RETURNS void LANGUAGE plpgsql AS $$
                     BEGIN
                       -- a comment
                       -- another
                       IF qty <= 0 THEN
                         RAISE EXCEPTION 'quantity must be positive, got %', qty USING ERRCODE = 'check_violation';
                       END IF;
                     END $$""")
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("SELECT create_order(-3)")
        rows = wait_occurrences(c, "check_violation", 3)
        assert "line 6 at RAISE" in rows[2][1]
        assert len({r[6] for r in rows}) == 1
        wait_for(lambda: c.execute("SELECT occurrence_count FROM v_error_groups"
                                   " WHERE error_type = 'check_violation'").fetchone()[0] == 3,
                 timeout=10, what="three in the group")


def test_an_error_in_a_trigger(cluster, capturing):
    with cluster.connect(capturing) as c:
        c.execute("CREATE TABLE orders (id int, amount numeric)")
        c.execute("""CREATE FUNCTION orders_guard() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN
                       IF NEW.amount < 0 THEN RAISE EXCEPTION 'negative amount %', NEW.amount; END IF;
                       RETURN NEW;
                     END $$""")
        c.execute("CREATE TRIGGER guard BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION orders_guard()")
        with pytest.raises(psycopg.errors.RaiseException):
            c.execute("INSERT INTO orders VALUES (1, -12.50)")
        message, stack, ctx, *_ = wait_occurrences(c, "raise_exception", 1)[0]
        assert message == "negative amount -12.50"
        assert stack.startswith("PL/pgSQL function orders_guard() line 3 at RAISE")
        assert ctx["statement"] == "INSERT INTO orders VALUES ($1, -$2)"
        culprit = wait_for(lambda: c.execute("SELECT culprit FROM v_error_groups"
                                             " WHERE error_type = 'raise_exception'").fetchone()[0],
                           timeout=10, what="the group")
        assert "orders_guard" in culprit
        # a CHECK constraint's failing row is not kept either
        c.execute("ALTER TABLE orders ADD CHECK (amount < 1000)")
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("INSERT INTO orders VALUES (2, 4111111111111111)")
        message, stack, ctx, *_ = wait_occurrences(c, "check_violation", 1)[0]
        assert ctx["detail"] == "Failing row contains (…)." and ctx["constraint"] == "orders_amount_check"
        assert "4111" not in str(ctx) and stack is None


def test_a_statement_timeout_is_captured_and_a_cancel_is_not(cluster, capturing):
    with cluster.connect(capturing) as c:
        c.execute("SET statement_timeout = '50ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT pg_sleep(2)")
        c.execute("RESET statement_timeout")
        message, stack, ctx, *_ = wait_occurrences(c, "statement_timeout", 1)[0]
        assert message == "canceling statement due to statement timeout" and ctx["sqlstate"] == "57014"
        assert ctx["statement"] == "SELECT pg_sleep($1)"
        # the user's own cancel: ignored by the default exclude list
        timer = threading.Timer(0.3, c.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT pg_sleep(3)")
        timer.join()
        # a later error is captured, the cancel before it is not
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT 1 / 0")
        wait_occurrences(c, "division_by_zero", 1)
        assert occurrences(c, "query_canceled") == []


def test_only_a_superuser_sets_it_and_bad_lists_are_refused(cluster, capturing):
    with cluster.connect(capturing) as c:
        c.execute("DROP ROLE IF EXISTS sqlerr_app")
        c.execute("CREATE ROLE sqlerr_app LOGIN")
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            c.execute(f"ALTER DATABASE {capturing} SET fraiseql_obs.capture_sql_errors_exclude = 'no_such_condition'")
        assert "no_such_condition" in e.value.diag.message_detail
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            c.execute("SET fraiseql_obs.capture_sql_errors_include = '23505, bogus'")
        assert '"bogus" is not a SQLSTATE' in e.value.diag.message_detail
        # a good list is taken
        c.execute("SET fraiseql_obs.capture_sql_errors_include = '23505, 22, deadlock_detected'")
        c.execute("RESET fraiseql_obs.capture_sql_errors_include")
    try:
        with cluster.connect(capturing, user="sqlerr_app") as a:
            for setting in ("capture_sql_errors = off", "capture_sql_errors_exclude = '22'",
                            "capture_sql_errors_include = '23505'", "capture_sql_errors_min_level = fatal"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    a.execute(f"SET fraiseql_obs.{setting}")
            # its errors are captured (the setting is the database's)
            with pytest.raises(psycopg.errors.DivisionByZero):
                a.execute("SELECT 1 / 0")
        with cluster.connect(capturing) as c:
            ctx = wait_occurrences(c, "division_by_zero", 1)[0][2]
            assert ctx["user"] == "sqlerr_app"
    finally:
        with cluster.connect(capturing) as c:
            c.execute("DROP OWNED BY sqlerr_app")
            c.execute("DROP ROLE sqlerr_app")


def test_lists_per_role_and_a_minimum_level(cluster, capturing):
    with cluster.connect(capturing) as c:
        c.execute("DROP ROLE IF EXISTS sqlerr_batch")
        c.execute("CREATE ROLE sqlerr_batch LOGIN")
        c.execute("GRANT CREATE ON SCHEMA public TO sqlerr_batch")
        c.execute("ALTER ROLE sqlerr_batch IN DATABASE " + capturing +
                  " SET fraiseql_obs.capture_sql_errors_exclude = 'division_by_zero, 42P01'")
        c.execute("ALTER ROLE sqlerr_batch IN DATABASE " + capturing +
                  " SET fraiseql_obs.capture_sql_errors_min_level = warning")
    try:
        with cluster.connect(capturing, user="sqlerr_batch") as a:
            with pytest.raises(psycopg.errors.DivisionByZero):
                a.execute("SELECT 1 / 0")
            with pytest.raises(psycopg.errors.UndefinedTable):
                a.execute("SELECT * FROM no_such_table")
            a.execute("DO $$ BEGIN RAISE WARNING 'low stock for %', 'sku-1'; END $$")
            with pytest.raises(psycopg.errors.UndefinedColumn):
                a.execute("SELECT no_such_column FROM pg_class")
        with cluster.connect(capturing) as c:
            wait_occurrences(c, "undefined_column", 1)
            warning = wait_occurrences(c, "warning", 1)[0]
            assert warning[0] == "low stock for sku-1" and warning[3] == "warning"
            assert warning[1].startswith("PL/pgSQL function inline_code_block line 1 at RAISE")
            assert occurrences(c, "division_by_zero") == [] and occurrences(c, "undefined_table") == []
            # postgres (no role setting): warnings are below its level
            c.execute("DO $$ BEGIN RAISE WARNING 'not for postgres'; END $$")
            with pytest.raises(psycopg.errors.DivisionByZero):
                c.execute("SELECT 1 / 0")
            wait_occurrences(c, "division_by_zero", 1)
            assert len(occurrences(c, "warning")) == 1
    finally:
        with cluster.connect(capturing) as c:
            c.execute("DROP OWNED BY sqlerr_batch")
            c.execute("DROP ROLE sqlerr_batch")


def test_capture_errors_do_not_loop(cluster, capturing):
    with cluster.connect(capturing) as c:
        # an error raised by the capture function itself is an ordinary error:
        # captured once, like any other
        for _ in range(5):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                c.execute("SELECT fraiseql_capture_error('E', 'm', severity => 'bogus')")
        wait_occurrences(c, "invalid_parameter_value", 5)
        time.sleep(1)
        assert len(occurrences(c, "invalid_parameter_value")) == 5
        assert stats(c)["waiting"] == 0


def test_a_storm_of_failing_statements_is_counted(cluster, capturing):
    with cluster.connect(capturing) as c:
        before = stats(c)

    def storm(k):
        with cluster.connect(capturing) as s:
            for i in range(500):
                with pytest.raises(psycopg.errors.DivisionByZero):
                    s.execute(f"SELECT {i} / 0")
    t0 = time.monotonic()
    threads = [threading.Thread(target=storm, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not any(t.is_alive() for t in threads)
    took = time.monotonic() - t0
    with cluster.connect(capturing) as c:
        def settled():
            s = stats(c)
            n = c.execute("SELECT occurrence_count FROM v_error_groups WHERE error_type = 'division_by_zero'").fetchone()
            done = s["waiting"] == 0 and n is not None and n[0] == s["stored"] - before["stored"]
            return done and s
        s = wait_for(settled, timeout=30, interval=0.1, what="the queue drained and counted")
        stored, dropped = s["stored"] - before["stored"], s["dropped"] - before["dropped"]
        assert stored + dropped == 2000, (stored, dropped)
        assert stored > 0
        # one group: the values in the statement do not split it
        assert c.execute("SELECT count(*) FROM v_error_groups WHERE error_type = 'division_by_zero'").fetchone()[0] == 1
    assert took < 60, took


def test_a_database_without_the_extension_holds_no_queue_space(cluster, db):
    name = cluster.new_database(extension=False)
    try:
        with cluster.connect() as c:
            c.execute(f"ALTER DATABASE {name} SET fraiseql_obs.capture_sql_errors = on")
        with cluster.connect(name) as c:
            for _ in range(20):
                with pytest.raises(psycopg.errors.DivisionByZero):
                    c.execute("SELECT 1 / 0")
        # whatever was queued before the launcher knew is given up, not kept
        with cluster.connect(db) as c:
            wait_for(lambda: stats(c)["waiting"] == 0, timeout=30, what="no entry of that database waits")
    finally:
        with cluster.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {name}")


def test_one_session_failing_in_a_loop_is_rate_limited_visibly(cluster, capturing):
    with cluster.connect(capturing) as c:
        before = stats(c)
        c.execute("SET fraiseql_obs.capture_sql_errors_rate_limit = 5")  # bursts of 50
        t0 = time.monotonic()
        for i in range(300):
            with pytest.raises(psycopg.errors.DivisionByZero):
                c.execute("SELECT 1 / 0")
        took = time.monotonic() - t0
        c.execute("RESET fraiseql_obs.capture_sql_errors_rate_limit")

        def settled():
            s = stats(c)
            return s["waiting"] == 0 and s
        s = wait_for(settled, timeout=10, what="the queue drained")
        stored = len(occurrences(c, "division_by_zero"))
        dropped = s["dropped"] - before["dropped"]
        assert stored + dropped == 300, (stored, dropped)
        assert 50 <= stored <= 50 + 5 * took + 1, (stored, took)


def test_reconnecting_does_not_reset_the_rate_limit(cluster, capturing):
    """The limit is the login role's in the database, over all its
    sessions: a role reconnecting for every error (or using many
    connections) gets no more than one session would."""
    with cluster.connect(capturing) as c:
        before = stats(c)
    t0 = time.monotonic()
    for i in range(150):
        with cluster.connect(capturing) as s:
            s.execute("SET fraiseql_obs.capture_sql_errors_rate_limit = 5")  # bursts of 50
            with pytest.raises(psycopg.errors.DivisionByZero):
                s.execute(f"SELECT 1 / 0 AS c{i}")  # (a new statement, a new group, every time)
    took = time.monotonic() - t0
    with cluster.connect(capturing) as c:
        def settled():
            s = stats(c)
            return s["waiting"] == 0 and s
        s = wait_for(settled, timeout=10, what="the queue drained")
        stored = len(occurrences(c, "division_by_zero"))
        assert stored + (s["dropped"] - before["dropped"]) == 150
        assert 50 <= stored <= 50 + 5 * took + 1, (stored, took)
