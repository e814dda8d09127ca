"""Local peers for notification tests: an HTTP receiver and an SMTP server,
both on 127.0.0.1, recording what they actually receive."""
import email
import email.policy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpReceiver:
    """Records requests; answers `status` after `delay` seconds."""

    def __init__(self, port: int | None = None, status: int = 200, delay: float = 0.0):
        self.port = port or free_port()
        self.status = status
        self.delay = delay
        self.requests = []
        self.server = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"method": self.command, "path": self.path,
                                          "headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body.decode(), "at": time.monotonic()})
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_PUT = do_PATCH = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def json(self, i=0):
        return json.loads(self.requests[i]["body"])


class SmtpReceiver:
    """mode: "plain"; "starttls" (STARTTLS and AUTH required); "tls" (implicit
    TLS, AUTH required). TLS modes need cert/key files."""

    def __init__(self, mode: str = "plain", cert: str | None = None, key: str | None = None,
                 user: str = "alerts@myapp.com", password: str = "app_password"):
        import ssl
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.port = free_port()
        self.messages = []
        self.logins = []
        receiver = self
        kwargs = {}
        if mode != "plain":
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)

            def authenticator(server, session, envelope, mechanism, auth_data):
                ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user \
                    and auth_data.password.decode() == password
                receiver.logins.append((mechanism, ok))
                return AuthResult(success=ok)

            kwargs.update(authenticator=authenticator, auth_required=True)
            if mode == "starttls":
                kwargs.update(tls_context=ctx, require_starttls=True, auth_require_tls=True)
            else:
                # implicit TLS: the whole connection is TLS, but aiosmtpd only
                # counts STARTTLS as TLS for auth_require_tls
                kwargs.update(ssl_context=ctx, auth_require_tls=False)

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
                receiver.messages.append({"from": envelope.mail_from, "to": envelope.rcpt_tos, "message": msg})
                return "250 OK"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **kwargs)

    def start(self):
        self.controller.start()
        return self

    def stop(self):
        self.controller.stop()
