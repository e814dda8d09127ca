"""Notifications, delivered by the worker to real local peers."""
import json
import os
import signal
import threading
import time

import psycopg
import pytest

from conftest import wait_for
from receivers import HttpReceiver, SmtpReceiver

TRACE = "Traceback (most recent call last):\n  File \"/app/api/orders.py\", line 42, in create_order\n" + "    x()\n" * 200 + "ValueError: bad"


@pytest.fixture
def http():
    r = HttpReceiver().start()
    yield r
    r.stop()


def rule(conn, channel_type, config, **cols):
    names = ["channel_type", "channel_config", *cols]
    values = [channel_type, json.dumps(config), *cols.values()]
    sql = f"INSERT INTO tb_error_notification_config ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))}) RETURNING config_id"
    return conn.execute(sql, values).fetchone()[0]


def log(conn):
    return conn.execute("SELECT status, channel_type, recipient, error_message, attempt, response_code, delivery_id"
                        " FROM tb_error_notification_log ORDER BY sent_at, attempt").fetchall()


def test_webhook_delivers_the_seed_payload(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, "webhook", {"url": http.url + "/hook", "method": "PUT",
                            "headers": {"Authorization": "Bearer secret_token", "X-Custom-Header": "value"}})
        eid = c.execute("SELECT fraiseql_capture_error('PaymentError', 'Payment gateway timeout', %s, release_version => 'v1.2.3')",
                        (TRACE,)).fetchone()[0]
        wait_for(lambda: http.requests, what="webhook received")
        req = http.requests[0]
        assert req["method"] == "PUT" and req["path"] == "/hook"
        assert req["headers"]["authorization"] == "Bearer secret_token" and req["headers"]["x-custom-header"] == "value"
        body = http.json()
        for k in ["error_id", "error_fingerprint", "error_type", "error_message", "severity", "occurrence_count",
                  "first_seen", "last_seen", "environment", "release_version", "stack_trace"]:
            assert k in body, k
        assert body["error_id"] == str(eid) and body["error_type"] == "PaymentError" and body["release_version"] == "v1.2.3"
        assert req["headers"]["x-fraiseql-delivery-id"] == body["delivery_id"]
        wait_for(lambda: log(c), what="log row")
        (status, channel, recipient, err, attempt, code, delivery_id), = log(c)
        assert (status, channel, recipient, attempt, code) == ("sent", "webhook", "127.0.0.1", 1, "200")
        assert str(delivery_id) == body["delivery_id"]
        assert "secret_token" not in json.dumps([list(map(str, r)) for r in log(c)])


def test_slack_block_kit(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, "slack", {"webhook_url": http.url + "/services/T/B/secret", "channel": "#alerts", "username": "FraiseQL Error Bot"},
             severity=["critical"])
        c.execute("SELECT fraiseql_capture_error('DiskFull', 'no space left', %s, severity => 'warning')", (TRACE,))
        c.execute("SELECT fraiseql_capture_error('DbDown', 'connection refused', %s, severity => 'critical')", (TRACE,))
        wait_for(lambda: http.requests, what="slack message")
        c.execute("SELECT pg_sleep(0.5)")
        assert len(http.requests) == 1  # the warning did not match
        msg = http.json()
        assert msg["channel"] == "#alerts" and msg["username"] == "FraiseQL Error Bot"
        blocks = msg["blocks"]
        assert blocks[0]["type"] == "header" and blocks[0]["text"]["text"] == "🔴 DbDown"
        fields = " ".join(f["text"] for f in blocks[2]["fields"])
        assert "production" in fields and "critical" in fields
        stack = blocks[3]["text"]["text"].strip("`")
        assert len(stack) == 500 and stack.startswith("Traceback")
        footer = blocks[4]["elements"][0]["text"]
        g = c.execute("SELECT error_id, error_fingerprint FROM v_error_groups WHERE error_type = 'DbDown'").fetchone()
        assert str(g[0]) in footer and g[1] in footer
        wait_for(lambda: log(c), what="log row")
        assert log(c)[0][2] == "#alerts" and "secret" not in str(log(c))


def test_email_recipients_are_held_to_the_allowed_domains(cluster, db):
    """A rule writer chooses its recipients, and with the channel's SMTP
    defaults it sends as the team: fraiseql_obs.notification_allowed_email_domains
    keeps that within the team's domains."""
    smtp = SmtpReceiver().start()
    with cluster.connect() as su:
        su.execute("ALTER SYSTEM SET fraiseql_obs.notification_allowed_email_domains = 'myapp.com, *.ops.myapp.com'")
        su.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    try:
        with cluster.connect(db) as c:
            c.execute("SELECT fraiseql_set_channel_defaults('email', %s)",
                      (json.dumps({"smtp_host": "127.0.0.1", "smtp_port": smtp.port, "tls": "none",
                                   "from_address": "noreply@myapp.com"}),))
            rule(c, "email", {"to": ["team@myapp.com", "pager@eu.ops.myapp.com"]}, error_type="Allowed")
            rule(c, "email", {"to": "team@myapp.com, victim@elsewhere.test"}, error_type="Refused")
            c.execute("SELECT fraiseql_capture_error('Allowed', 'm')")
            c.execute("SELECT fraiseql_capture_error('Refused', 'm')")
            wait_for(lambda: len(log(c)) == 2, what="both attempts recorded")
            assert [sorted(m["to"]) for m in smtp.messages] == [["pager@eu.ops.myapp.com", "team@myapp.com"]]
            failed = [r for r in log(c) if r[0] != "sent"]
            assert len(failed) == 1 and failed[0][0] == "failed" and "victim@elsewhere.test" in failed[0][3], log(c)
    finally:
        smtp.stop()
        with cluster.connect() as su:
            su.execute("ALTER SYSTEM RESET fraiseql_obs.notification_allowed_email_domains")
            su.execute("SELECT pg_reload_conf()")


def test_email_multipart_with_templates(cluster, db):
    smtp = SmtpReceiver().start()
    try:
        with cluster.connect(db) as c:
            c.execute("SELECT fraiseql_set_channel_defaults('email', %s)",
                      (json.dumps({"smtp_host": "127.0.0.1", "smtp_port": smtp.port, "tls": "none",
                                   "from_address": "noreply@myapp.com"}),))
            rule(c, "email", {"to": ["team@myapp.com", "oncall@myapp.com"], "subject": "Production Error: {error_type} x{occurrence_count}"},
                 error_type="ValueError", severity=["error", "critical"], environment=["production"])
            c.execute("SELECT fraiseql_capture_error('ValueError', 'invalid literal <b>', %s)", (TRACE,))
            wait_for(lambda: smtp.messages, what="e-mail")
            m = smtp.messages[0]
            assert sorted(m["to"]) == ["oncall@myapp.com", "team@myapp.com"] and m["from"] == "noreply@myapp.com"
            msg = m["message"]
            assert msg["subject"] == "Production Error: ValueError x1"
            assert msg.get_content_type() == "multipart/alternative"
            text = msg.get_body(("plain",)).get_content()
            html = msg.get_body(("html",)).get_content()
            assert "ValueError" in text and "Stack trace" in text
            assert "&lt;b&gt;" in html and "#d32f2f" in html and "<pre" in html
            wait_for(lambda: log(c), what="log")
            assert log(c)[0][0] == "sent" and log(c)[0][5].startswith("SMTP 250")
    finally:
        smtp.stop()


def test_pg_notify_and_custom_channel(cluster, db):
    with cluster.connect(db) as listener, cluster.connect(db) as c:
        listener.execute("LISTEN fraiseql_obs_errors")
        c.execute("CREATE TABLE sms_outbox (to_number text, body text)")
        c.execute("""CREATE FUNCTION send_sms(error jsonb, config jsonb, OUT success boolean, OUT error_message text)
                     LANGUAGE plpgsql AS $$
                     BEGIN
                         IF config->>'to' IS NULL THEN success := false; error_message := 'No recipient phone number'; RETURN; END IF;
                         INSERT INTO sms_outbox VALUES (config->>'to', '🚨 ' || (error->>'error_type') || ': ' || left(error->>'error_message', 80));
                         success := true;
                     END $$""")
        c.execute("SELECT fraiseql_register_channel('twilio_sms', 'send_sms(jsonb, jsonb)')")
        rule(c, "twilio_sms", {"to": "+1234567890", "account_sid": "AC...", "auth_token": "your_token"}, severity=["critical"])
        rule(c, "pg_notify", {})
        c.execute("SELECT fraiseql_capture_error('Boom', 'it broke', severity => 'critical')")
        gen = listener.notifies(timeout=10)
        n = next(gen)
        assert n.channel == "fraiseql_obs_errors" and json.loads(n.payload)["error_type"] == "Boom"
        gen.close()
        wait_for(lambda: c.execute("SELECT to_number, body FROM sms_outbox").fetchall() == [("+1234567890", "🚨 Boom: it broke")],
                 what="custom channel called")


def test_pg_notify_batch_one_bad_channel_takes_no_other(cluster, db):
    """The pg_notify deliveries of a batch share one transaction (a
    subtransaction each): every good one arrives, once, and one whose
    channel PostgreSQL refuses fails alone."""
    with cluster.connect(db) as listener, cluster.connect(db) as c:
        listener.execute("LISTEN storm")
        rule(c, "pg_notify", {"channel": "storm"})
        c.execute("ALTER TABLE tb_error_notification_config DISABLE TRIGGER notification_config_check")
        rule(c, "pg_notify", {"channel": "x" * 100})  # "channel name too long"
        c.execute("ALTER TABLE tb_error_notification_config ENABLE TRIGGER notification_config_check")
        with c.transaction():  # one fold, one delivery batch
            for i in range(50):
                c.execute("SELECT fraiseql_capture_error('Storm' || %s, 'm')", (i,))
        got = set()
        for n in listener.notifies(timeout=15):
            got.add(json.loads(n.payload)["error_type"])
            if len(got) == 50:
                break
        assert got == {f"Storm{i}" for i in range(50)}
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_error_notification_log WHERE status = 'sent'").fetchone()[0] == 50,
                 what="50 recorded as sent")
        bad = c.execute("SELECT DISTINCT status, error_message FROM tb_error_notification_log WHERE status <> 'sent'").fetchall()
        assert bad and all("too long" in (m or "") for _, m in bad), bad


def test_rolled_back_capture_notifies_nobody(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, "webhook", {"url": http.url})
    with cluster.connect(db, autocommit=False) as c:
        c.execute("SELECT fraiseql_capture_error('E', 'never happened')")
        c.rollback()
    with cluster.connect(db) as c:
        c.execute("SELECT fraiseql_capture_error('E', 'happened')")
        wait_for(lambda: http.requests, what="delivery")
        c.execute("SELECT pg_sleep(0.5)")
        assert [json.loads(r["body"])["error_message"] for r in http.requests] == ["happened"]


def test_error_storm_under_rate_limit_sends_one(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, "webhook", {"url": http.url}, rate_limit_minutes=60)
    errors = []

    def storm():
        try:
            with cluster.connect(db) as s:
                for _ in range(100):
                    s.execute("SELECT fraiseql_capture_error('StormError', 'same bug')")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=storm) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    with cluster.connect(db) as c:
        wait_for(lambda: http.requests, what="the one delivery")
        c.execute("SELECT pg_sleep(1)")
        assert len(http.requests) == 1
        assert c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0


def test_milestones_exactly_once_each(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, "webhook", {"url": http.url}, notify_on_occurrence=[1, 10, 100])
        for _ in range(150):
            c.execute("SELECT fraiseql_capture_error('Milestone', 'again')")
        wait_for(lambda: len(http.requests) >= 3, what="three milestones")
        c.execute("SELECT pg_sleep(1)")
        assert sorted(json.loads(r["body"])["milestone"] for r in http.requests) == [1, 10, 100]


def test_new_regression_threshold_and_condition_rules(cluster, db, http):
    with cluster.connect(db) as c:
        new = rule(c, "webhook", {"url": http.url + "/new"}, notify_on_new=True)
        reg = rule(c, "webhook", {"url": http.url + "/regression"}, notify_on_regression=True)
        thr = rule(c, "webhook", {"url": http.url + "/threshold"}, min_occurrence_count=5, error_type="Thr")
        cond = rule(c, "webhook", {"url": http.url + "/gold"}, condition='$.context.tier == "gold"')
        for _ in range(3):
            c.execute("SELECT fraiseql_capture_error('A', 'first bug')")
        gid = c.execute("SELECT error_id FROM v_error_groups WHERE error_type = 'A'").fetchone()[0]
        c.execute("SELECT fraiseql_resolve_error(%s)", (gid,))
        c.execute("SELECT fraiseql_capture_error('A', 'first bug', occurred_at => clock_timestamp() + interval '1 second')")
        for _ in range(6):
            c.execute("SELECT fraiseql_capture_error('Thr', 'threshold')")
            c.execute("SELECT fraiseql_flush_counts()")
        c.execute("SELECT fraiseql_capture_error('C', 'vip', context => '{\"tier\": \"gold\"}')")
        c.execute("SELECT fraiseql_capture_error('C', 'vip', context => '{\"tier\": \"free\"}')")
        wait_for(lambda: {r["path"] for r in http.requests} >= {"/new", "/regression", "/threshold", "/gold"}, what="all rules")
        c.execute("SELECT pg_sleep(1)")
        paths = [r["path"] for r in http.requests]
        assert paths.count("/new") == 3  # groups A, Thr, C
        assert paths.count("/regression") == 1
        assert paths.count("/threshold") == 2  # the 5th and 6th occurrences
        assert paths.count("/gold") == 1


def test_invalid_rules_are_refused(cluster, db):
    with cluster.connect(db) as c:
        for cols, needle in [
            ({"channel_type": "carrier_pigeon", "channel_config": "{}"}, "unknown channel type"),
            ({"channel_type": "webhook", "channel_config": "{}"}, "needs url"),
            ({"channel_type": "webhook", "channel_config": '{"url": "ftp://x"}'}, "http"),
            ({"channel_type": "webhook", "channel_config": '{"url": "http://127.0.0.1", "method": "GET"}'}, "method"),
            ({"channel_type": "email", "channel_config": '{"subject": "x"}'}, "needs to"),
            ({"channel_type": "slack", "channel_config": '{"channel": "#x"}'}, "webhook_url"),
            ({"channel_type": "webhook", "channel_config": '{"url": "http://127.0.0.1"}', "rate_limit_minutes": -1}, "rate_limit_minutes"),
            ({"channel_type": "webhook", "channel_config": '{"url": "http://127.0.0.1"}', "notify_on_occurrence": "{0}"}, "notify_on_occurrence"),
            ({"channel_type": "webhook", "channel_config": "[1]"}, "JSON object"),
        ]:
            names = ", ".join(cols)
            with pytest.raises(psycopg.Error, match=needle):
                c.execute(f"INSERT INTO tb_error_notification_config ({names}) VALUES ({', '.join(['%s'] * len(cols))})",
                          list(cols.values()))
        assert c.execute("SELECT count(*) FROM tb_error_notification_config").fetchone()[0] == 0


def test_receiver_down_then_back(cluster, db):
    down = HttpReceiver()  # not started: connection refused
    with cluster.connect(db) as c:
        rule(c, "webhook", {"url": down.url})
        c.execute("SELECT fraiseql_capture_error('E', 'while the receiver is down')")
        wait_for(lambda: any(r[0] == "retrying" for r in log(c)), what="a failed attempt")
        down.start()
        try:
            wait_for(lambda: down.requests, timeout=30, what="delivered once it is back")
            wait_for(lambda: log(c)[-1][0] == "sent", what="logged as sent")
            statuses = [r[0] for r in log(c)]
            assert statuses[-1] == "sent" and set(statuses[:-1]) == {"retrying"}
            ids = {r[6] for r in log(c)}
            assert len(ids) == 1  # one delivery, several attempts
        finally:
            down.stop()


def test_hanging_receiver_does_not_hold_up_others(cluster, db, http):
    hang = HttpReceiver(delay=5).start()
    try:
        with cluster.connect(db) as c:
            rule(c, "webhook", {"url": hang.url + "/slow"})
            rule(c, "webhook", {"url": http.url + "/fast"})
            c.execute("SELECT fraiseql_capture_error('E', 'x')")
            wait_for(lambda: http.requests, timeout=4, what="the fast receiver served within the timeout")
            wait_for(lambda: any(r[0] == "retrying" and "127.0.0.1" in (r[3] or "") for r in log(c)), what="timeout logged")
    finally:
        hang.stop()


def test_http_500_retried_then_failed(cluster, db):
    bad = HttpReceiver(status=500).start()
    try:
        with cluster.connect(db) as c:
            c.execute("ALTER SYSTEM SET fraiseql_obs.notification_max_attempts = 3")
            c.execute("SELECT pg_reload_conf()")
            rule(c, "webhook", {"url": bad.url})
            c.execute("SELECT fraiseql_capture_error('E', 'x')")
            wait_for(lambda: [r[0] for r in log(c)] == ["retrying", "retrying", "failed"], timeout=30, what="3 attempts")
            assert [r[5] for r in log(c)] == ["500", "500", "500"] and len(bad.requests) == 3
            assert c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0
    finally:
        bad.stop()
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET fraiseql_obs.notification_max_attempts")
            c.execute("SELECT pg_reload_conf()")


def test_disallowed_host_is_never_contacted(cluster, db):
    with cluster.connect(db) as c:
        rule(c, "webhook", {"url": "https://example.invalid/hook"})
        c.execute("SELECT fraiseql_capture_error('E', 'x')")
        wait_for(lambda: log(c), what="logged")
        status, *_rest = log(c)[0]
        assert status == "failed" and "notification_allowed_hosts" in log(c)[0][3]


def test_digest_lists_the_window(cluster, db, http):
    with cluster.connect(db) as c:
        rule(c, "slack", {"webhook_url": http.url + "/digest"}, digest=True, rate_limit_minutes=1440, environment=["staging"])
        for t in ("E1", "E2", "E2"):
            c.execute("SELECT fraiseql_capture_error(%s, 'x', environment => 'staging')", (t,))
        # collected by the fold, not sent
        wait_for(lambda: c.execute("SELECT count(*) FROM tb_notification_digest").fetchone()[0] == 2, what="collected")
        c.execute("SELECT pg_sleep(1)")
        assert not http.requests
        c.execute("UPDATE tb_notification_digest SET window_start = now() - interval '2 days'")
        wait_for(lambda: http.requests, what="the digest")
        msg = http.json()
        assert msg["blocks"][0]["text"]["text"] == "🔵 Error digest: 2 errors"


def test_rules_secrets_are_not_readable_by_others(cluster, db):
    with cluster.connect(db) as c:
        rule(c, "webhook", {"url": "http://127.0.0.1/x", "headers": {"Authorization": "Bearer secret_token"}})
        c.execute("DROP ROLE IF EXISTS viewer")
        c.execute("CREATE ROLE viewer LOGIN")
        c.execute("GRANT SELECT ON v_notification_rules TO viewer")
    try:
        with cluster.connect(db, user="viewer") as v:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                v.execute("SELECT * FROM tb_error_notification_config")
            cfg = v.execute("SELECT channel_config FROM v_notification_rules").fetchone()[0]
            assert "secret_token" not in json.dumps(cfg) and cfg["headers"] == "[redacted]"
    finally:
        with cluster.connect(db) as c:
            c.execute("DROP OWNED BY viewer")
            c.execute("DROP ROLE viewer")


def test_worker_killed_mid_delivery_redelivers_with_the_same_id(cluster, db):
    slow = HttpReceiver(delay=1.0).start()
    try:
        with cluster.connect(db) as c:
            rule(c, "webhook", {"url": slow.url})
            c.execute("SELECT fraiseql_capture_error('E', 'in flight')")
        wait_for(lambda: slow.requests, what="first attempt in flight")
        with cluster.connect() as c:
            pid = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'fraiseql_obs worker' AND datname = %s", (db,)).fetchone()[0]
        os.kill(pid, signal.SIGKILL)  # before it can record the outcome
        wait_for(lambda: len(slow.requests) >= 2, timeout=60, what="redelivered after the lease")
        ids = {r["headers"]["x-fraiseql-delivery-id"] for r in slow.requests}
        assert len(ids) == 1
        with cluster.connect(db) as c:
            wait_for(lambda: c.execute("SELECT count(*) FROM tb_notification_queue").fetchone()[0] == 0, what="queue drained")
    finally:
        slow.stop()


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_email_over_tls_with_login(cluster, db, mode):
    import pathlib
    import shutil
    import subprocess
    import tempfile
    # readable by the server, which runs as another OS user
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="fraiseql_obs_tls_"))
    ca, ca_key = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert, key, csr, ext = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "srv.csr", tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    for cmd in (["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
                 "-days", "1", "-subj", "/CN=fraiseql test CA"],
                ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1"],
                ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-out", str(cert), "-days", "1", "-extfile", str(ext)]):
        subprocess.run(cmd, check=True, capture_output=True)
    os.chmod(tmp_path, 0o755)
    os.chmod(ca, 0o644)
    smtp = SmtpReceiver(mode, str(cert), str(key)).start()
    try:
        with cluster.connect(db) as c:
            cfg = {"smtp_host": "127.0.0.1", "smtp_port": smtp.port, "tls": mode, "tls_ca_pem": ca.read_text(),
                   "smtp_user": "alerts@myapp.com", "smtp_password": "app_password",
                   "from_address": "noreply@myapp.com", "to": "oncall@myapp.com"}
            rule(c, "email", cfg)
            c.execute("SELECT fraiseql_capture_error('TlsError', 'over tls')")
            try:
                wait_for(lambda: smtp.messages, what=f"e-mail over {mode}")
            except AssertionError:
                raise AssertionError(f"no e-mail over {mode}; delivery log: {log(c)}")
            assert smtp.logins and all(ok for _, ok in smtp.logins)
            assert smtp.messages[0]["to"] == ["oncall@myapp.com"]
            # a wrong password is a logged failure, and the password is never in the log
            c.execute("DELETE FROM tb_error_notification_config")
            rule(c, "email", {**cfg, "smtp_password": "wrong-password"})
            c.execute("SELECT fraiseql_capture_error('TlsError2', 'bad login')")
            wait_for(lambda: any(r[0] in ("failed", "retrying") for r in log(c)), what="failed login logged")
            assert "wrong-password" not in str(log(c)) and "app_password" not in str(log(c))
    finally:
        smtp.stop()
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_webhook_body_from_the_rule_template(cluster, db, http):
    with cluster.connect(db) as c:
        c.execute("INSERT INTO tb_error_notification_config (channel_type, channel_config, message_template)"
                  " VALUES ('webhook', %s, %s)",
                  (json.dumps({"url": http.url}),
                   '{"text": "{error_type} in {environment}, seen {occurrence_count}x, id {error_id}"}'))
        eid = c.execute("SELECT fraiseql_capture_error('TemplError', 'x', environment => 'staging')").fetchone()[0]
        wait_for(lambda: http.requests, what="templated webhook")
        assert http.json() == {"text": f"TemplError in staging, seen 1x, id {eid}"}


def test_rules_on_one_fold_each_see_their_own_occurrence(cluster, db):
    """Several occurrences of a group counted by one fold, looked at by
    several rules: each notification carries its own occurrence (context,
    count), whichever rules share it."""
    with cluster.connect(db) as c:
        c.execute("CREATE TABLE sent (tag text, error jsonb)")
        c.execute("""CREATE FUNCTION record_it(error jsonb, config jsonb, OUT success boolean, OUT error_message text)
                     LANGUAGE sql AS $$ INSERT INTO sent VALUES (config->>'tag', error) RETURNING true, NULL::text $$""")
        c.execute("SELECT fraiseql_register_channel('recorder', 'record_it(jsonb, jsonb)')")
        rule(c, "recorder", {"tag": "gold"}, condition='$.context.tier == "gold"')
        rule(c, "recorder", {"tag": "free"}, condition='$.context.tier == "free"')
        rule(c, "recorder", {"tag": "min3"}, min_occurrence_count=3)
        rule(c, "recorder", {"tag": "all"})
        rule(c, "recorder", {"tag": "never"}, min_occurrence_count=5)
        tiers = ["gold", "free", "gold", "other"]
        with c.transaction():  # one transaction: one fold counts them all
            for t in tiers:
                c.execute("SELECT fraiseql_capture_error('P', 'pay', context => jsonb_build_object('tier', %s::text),"
                          " occurred_at => clock_timestamp())", (t,))
        wait_for(lambda: c.execute("SELECT count(*) FROM sent").fetchone()[0] >= 9, what="deliveries")
        c.execute("SELECT pg_sleep(1)")
        got = {}
        for tag, error in c.execute("SELECT tag, error FROM sent").fetchall():
            got.setdefault(tag, []).append((error["occurrence_count"], error["context"]["tier"]))
        expected_at = {n: t for n, t in enumerate(tiers, start=1)}
        for tag, rows in got.items():
            for count, tier in rows:
                assert expected_at[count] == tier, (tag, rows)
        assert sorted(got["all"]) == [(1, "gold"), (2, "free"), (3, "gold"), (4, "other")]
        assert sorted(got["gold"]) == [(1, "gold"), (3, "gold")]
        assert sorted(got["free"]) == [(2, "free")]
        assert sorted(got["min3"]) == [(3, "gold"), (4, "other")]
        assert "never" not in got
