"""Server-side scrubbing (issue 16, point 6): what is scrubbed reaches no
table, no delivery-log row and no delivery, from any capture path."""
import json

import psycopg
import pytest

from conftest import wait_for
from receivers import HttpReceiver

CARD = "4111 1111 1111 1111"
SECRETS = ["hunter2", "Bearer eyJhbGciOi", "sk_live_51H", "sessid-77", CARD, "4111111111111111", "DE89-iban"]

CONTEXT = {
    "user_id": "u-42",
    "password": "hunter2",
    "request": {"headers": {"Authorization": "Bearer eyJhbGciOi", "Accept": "application/json",
                            "Cookie": "sessionid=sessid-77"},
                "data": {"api_key": "sk_live_51H", "iban": "DE89-iban", "items": [{"note": f"paid {CARD}"}]}},
}


@pytest.fixture
def http():
    r = HttpReceiver().start()
    yield r
    r.stop()


def everything_stored(c) -> str:
    """Every row of every table of the extension's schema and its
    partitions, as text."""
    tables = [r[0] for r in c.execute(
        "SELECT format('%I.%I', n.nspname, t.relname) FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace"
        " WHERE t.relkind = 'r' AND n.nspname IN ('public', 'monitoring')")]
    return "\n".join(str(c.execute(f"SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {t} t").fetchone()[0])
                     for t in tables)


def test_nothing_scrubbed_reaches_a_table_a_log_row_or_a_delivery(cluster, db, http):
    with cluster.connect() as c:
        c.execute(f"ALTER DATABASE {db} SET fraiseql_obs.scrub_fields = 'iban'")
        c.execute(f"ALTER DATABASE {db} SET fraiseql_obs.capture_sql_errors = on")
    with cluster.connect(db) as c:
        from test_sql_errors import wait_for_worker
        wait_for_worker(c)
        c.execute("DELETE FROM tb_error_occurrence")
        c.execute("DELETE FROM tb_error_log")
        c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config) VALUES ('webhook', %s)",
                  (json.dumps({"url": http.url + "/hook"}),))
        c.execute("SELECT fraiseql_capture_error('PaymentError', %s, %s, %s)",
                  (f"charge failed for card {CARD}", f"Traceback:\n  File \"pay.py\", line 3, in charge\n    card={CARD}",
                   json.dumps(CONTEXT)))
        c.execute("SELECT fraiseql_capture_error('AutoPaymentError', 'autonomous', NULL, %s, autonomous => true)",
                  (json.dumps(CONTEXT),))
        c.execute("SELECT fraiseql_capture_message(%s, context => %s)", (f"refund to {CARD}", json.dumps(CONTEXT)))
        with pytest.raises(psycopg.errors.RaiseException):
            c.execute(f"DO $$ BEGIN RAISE EXCEPTION 'declined: {CARD}'; END $$")
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_occurrence").fetchone()[0] == 4,
                 timeout=10, what="four occurrences")
        wait_for(lambda: len(http.requests) >= 4, timeout=15, what="four deliveries")
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_notification_log WHERE status = 'sent'").fetchone()[0] >= 4,
                 timeout=15, what="four log rows")
        stored = everything_stored(c)
        sent = json.dumps(http.requests)
        for secret in SECRETS:
            assert secret not in stored, secret
            assert secret not in sent, secret
        # what was scrubbed says so; what was not is intact
        ctx = c.execute("SELECT context FROM tb_error_occurrence WHERE error_type = 'PaymentError'").fetchone()[0]
        assert ctx["user_id"] == "u-42" and ctx["password"] == "[Filtered]"
        assert ctx["request"]["headers"] == {"Authorization": "[Filtered]", "Accept": "application/json",
                                             "Cookie": "[Filtered]"}
        assert ctx["request"]["data"] == {"api_key": "[Filtered]", "iban": "[Filtered]",
                                          "items": [{"note": "paid [Filtered]"}]}
        row = c.execute("SELECT message, stack_trace FROM tb_error_occurrence WHERE error_type = 'PaymentError'").fetchone()
        assert row == ("charge failed for card [Filtered]",
                       "Traceback:\n  File \"pay.py\", line 3, in charge\n    card=[Filtered]")
        assert c.execute("SELECT message FROM tb_error_occurrence WHERE error_type = 'raise_exception'").fetchone()[0] \
            == "declined: [Filtered]"


def test_a_capturing_role_cannot_switch_it_off(cluster, db):
    with cluster.connect(db) as c:
        c.execute("DROP ROLE IF EXISTS scrub_app")
        c.execute("CREATE ROLE scrub_app LOGIN")
        c.execute("GRANT EXECUTE ON FUNCTION fraiseql_capture_error TO scrub_app")
    try:
        with cluster.connect(db, user="scrub_app") as a:
            for setting in ("scrub_defaults = off", "scrub_exclude_fields = 'password'", "scrub_fields = ''"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    a.execute(f"SET fraiseql_obs.{setting}")
            a.execute("SELECT fraiseql_capture_error('AppError', 'x', NULL, '{\"password\": \"hunter2\"}')")
        with cluster.connect(db) as c:
            assert c.execute("SELECT context->>'password' FROM tb_error_occurrence"
                             " WHERE error_type = 'AppError'").fetchone()[0] == "[Filtered]"
            # the owner may turn a default off, or keep a key, for its own database
            c.execute("SET fraiseql_obs.scrub_exclude_fields = 'password'")
            c.execute("SELECT fraiseql_capture_error('OwnerError', 'x', NULL, '{\"password\": \"kept\", \"token\": \"t\"}')")
            ctx = c.execute("SELECT context FROM tb_error_occurrence WHERE error_type = 'OwnerError'").fetchone()[0]
            assert ctx == {"password": "kept", "token": "[Filtered]"}
    finally:
        with cluster.connect(db) as c:
            c.execute("DROP OWNED BY scrub_app")
            c.execute("DROP ROLE scrub_app")
