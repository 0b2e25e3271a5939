"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, in its own thread.

Use it as a context manager; it records every accepted message::

    from tests.integration.certs import make_pki
    from tests.peers.smtp_peer import SmtpPeer

    pki = make_pki(tmp_path / "pki")
    with SmtpPeer(pki.server_cert, pki.server_key, auth={"engine": "s3cret"}) as peer:
        ...  # send to 127.0.0.1:peer.port, trusting pki.ca_cert
        got = peer.wait_for(1, timeout=5)       # blocks; see wait_for_async in async tests
        got[0].message["Subject"], got[0].attachments(), got[0].tls_used

Modes (keyword arguments):

* default: STARTTLS offered and required before MAIL (``require_starttls``), AUTH
  required when ``auth`` maps logins to passwords (offered only after STARTTLS);
* ``implicit_tls=True``: TLS from the first byte (port 465 style); no STARTTLS;
* ``tls_cert=None, tls_key=None``: clear text only; STARTTLS is not offered (for "the
  server does not offer STARTTLS" cases); AUTH, if configured, is offered in clear.

Scripted failures: ``peer.fail_next("DATA", 451)`` answers the next DATA (or "RCPT",
"MAIL") with that code instead of accepting; several calls queue up in order. The reply
text may be given, e.g. to prove a client never quotes it.

``peer.auth_failures`` counts refused AUTH attempts (a client must not retry bad
credentials across mechanisms).

``wait_for`` / ``wait_for_async`` block on a condition (no sleeping) until ``n``
messages have arrived and return all received so far; on timeout they raise
``TimeoutError`` saying how many did arrive.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import threading
from collections import deque
from collections.abc import Mapping
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

Command = Literal["MAIL", "RCPT", "DATA"]


class Received(NamedTuple):
    """One accepted message."""

    envelope: Any  # aiosmtpd.smtp.Envelope: mail_from, rcpt_tos, original_content
    message: EmailMessage  # parsed with email.policy.default
    tls_used: bool  # the session was encrypted (STARTTLS or implicit TLS)

    def attachments(self) -> list[bytes]:
        """The decoded bytes of each attachment, in order."""
        out = []
        for part in self.message.iter_attachments():
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            out.append(data)
        return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Handler:
    def __init__(self, peer: SmtpPeer) -> None:
        self.peer = peer

    def _scripted(self, command: Command) -> str | None:
        with self.peer._changed:
            queue = self.peer._script[command]
            return queue.popleft() if queue else None

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.peer.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = self._scripted("MAIL")
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self._scripted("RCPT")
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self._scripted("DATA")
        if reply is not None:
            return reply
        raw: bytes = envelope.original_content
        message = BytesParser(policy=default_policy).parsebytes(raw)
        assert isinstance(message, EmailMessage)
        # session.ssl is set after STARTTLS only; an implicit-TLS transport says so itself.
        transport = server.transport
        tls = session.ssl is not None or (
            transport is not None and transport.get_extra_info("sslcontext") is not None
        )
        with self.peer._changed:
            self.peer.messages.append(Received(envelope, message, tls))
            self.peer._changed.notify_all()
        return "250 2.0.0 OK queued"


class SmtpPeer:
    """An aiosmtpd server on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        tls_cert: Path | None,
        tls_key: Path | None,
        *,
        require_starttls: bool = True,
        auth: Mapping[str, str] | None = None,
        implicit_tls: bool = False,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if implicit_tls and tls_cert is None:
            raise ValueError("implicit_tls needs tls_cert and tls_key")
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.implicit_tls = implicit_tls
        self.require_starttls = require_starttls and tls_cert is not None and not implicit_tls
        self.auth = dict(auth) if auth is not None else None
        self.port = 0
        self.messages: list[Received] = []
        self.auth_failures = 0  # refused AUTH attempts
        self._changed = threading.Condition()
        self._script: dict[Command, deque[str]] = {c: deque() for c in ("MAIL", "RCPT", "DATA")}
        self._controller: Controller | None = None

    # -- scripting -------------------------------------------------------------------

    def fail_next(self, command: Command, code: int, text: str = "") -> None:
        """Answer the next ``command`` with ``code`` (and ``text``) instead of 250."""
        kind = "transient" if code < 500 else "permanent"
        with self._changed:
            self._script[command].append(f"{code} {text or f'{code // 100}.0.0 scripted {kind}'}")

    # -- waiting ---------------------------------------------------------------------

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Received]:
        """Block until ``n`` messages have arrived; all received so far."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.messages) >= n, timeout):
                raise TimeoutError(f"SMTP peer got {len(self.messages)} of {n} messages")
            return list(self.messages)

    async def wait_for_async(self, n: int, timeout: float = 5.0) -> list[Received]:
        """:meth:`wait_for` without blocking the event loop (an in-process sender may
        still be sending on it)."""
        return await asyncio.to_thread(self.wait_for, n, timeout)

    # -- lifecycle -------------------------------------------------------------------

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self.auth is not None
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.auth.get(auth_data.login.decode()) == auth_data.password.decode()
        )
        if not ok:
            with self._changed:
                self.auth_failures += 1
        # handled=False: let aiosmtpd send the 535 (True means "already replied").
        return AuthResult(success=ok, handled=False)

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def start(self) -> SmtpPeer:
        tls = self._tls_context()
        kwargs: dict[str, Any] = {
            "hostname": "127.0.0.1",
            # A fixed name: the default asks the resolver for this host's FQDN.
            "server_hostname": "mx.peer.test",
            "require_starttls": self.require_starttls,
            "ready_timeout": 5.0,
        }
        if self.implicit_tls:
            kwargs["ssl_context"] = tls
        elif tls is not None:
            kwargs["tls_context"] = tls
        if self.auth is not None:
            kwargs["authenticator"] = self._authenticate
            # AUTH only once encrypted, except in the deliberate clear-text mode; under
            # implicit TLS aiosmtpd cannot tell the session is encrypted, so do not ask.
            # aiosmtpd warns about auth_required without auth_require_tls, so in those
            # modes handle_MAIL enforces AUTH instead.
            kwargs["auth_require_tls"] = tls is not None and not self.implicit_tls
            kwargs["auth_required"] = kwargs["auth_require_tls"]
        # aiosmtpd checks the server by connecting to the port it was given, so it
        # needs a real one; another process may take it first, hence the retries.
        for _ in range(5):
            port = _free_port()
            controller = Controller(_Handler(self), port=port, **kwargs)
            try:
                controller.start()
            except OSError as exc:
                controller.stop(no_assert=True)
                controller.loop.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self.port = port
            self._controller = controller
            return self
        raise RuntimeError("no free port for the SMTP peer after 5 tries")

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
