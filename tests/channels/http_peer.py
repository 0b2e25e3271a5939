"""A recording HTTP peer for the HTTP channels' tests (webhook, sms, fax), and the
channels those tests build.

pytest-httpserver runs Werkzeug on a real loopback socket; :class:`Peer` records every
request it answers (method, path, headers, raw body, form fields, uploaded files, Basic
credentials) and answers from a script per path, the last answer repeating. One server
per test module, cleared for every test.

A test module takes the fixtures ``http_server`` and ``peer`` by importing their
functions (named apart from the fixtures, so a test's ``peer`` argument shadows no import),
and says which path its channel talks to::

    from tests.channels.http_peer import (
        Peer,
        http_server_fixture,  # noqa: F401 (a fixture)
        peer_fixture,  # noqa: F401 (a fixture)
    )

    @pytest.fixture
    def peer_path() -> str:
        return "/v1/faxes"
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from channels import registry
from channels.base import Channel, ChannelContext
from tests.channels.contract import Received
from tests.helpers import wait_for

#: What a script holds: a response, or a handler that builds one from the request.
Answer = Response | Callable[[Request], Response]


@dataclass(frozen=True)
class Part:
    """One uploaded file of a multipart request."""

    filename: str | None
    content_type: str | None
    data: bytes


@dataclass(frozen=True)
class Seen:
    """One request as the peer received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    form: dict[str, str]
    files: dict[str, Part]
    username: str | None  # HTTP Basic credentials, when the request carried them
    password: str | None


def record(request: Request) -> Seen:
    # The raw body first: Werkzeug parses the form from the cached copy afterwards.
    body = request.get_data()
    auth = request.authorization
    return Seen(
        method=request.method,
        path=request.path,
        headers=dict(request.headers),
        body=body,
        form=request.form.to_dict(),
        files={n: Part(f.filename, f.content_type, f.read()) for n, f in request.files.items()},
        username=auth.username if auth else None,
        password=auth.password if auth else None,
    )


def reply(answer: Answer, request: Request) -> Response:
    return answer(request) if callable(answer) and not isinstance(answer, Response) else answer


@dataclass
class Peer:
    """A real HTTP server that records every request and answers from a script per path
    (the last answer repeats). ``path`` is where the channel under test sends by default."""

    server: HTTPServer
    path: str = "/"
    seen: list[Seen] = field(default_factory=list)

    def url(self, path: str | None = None) -> str:
        return str(self.server.url_for(self.path if path is None else path))

    def base_url(self) -> str:
        return str(self.server.url_for("")).rstrip("/")

    def of(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    def answer(self, *answers: Answer, path: str | None = None, method: str = "POST") -> None:
        script = list(answers)

        def handle(request: Request) -> Response:
            self.seen.append(record(request))
            return reply(script.pop(0) if len(script) > 1 else script[0], request)

        where = self.path if path is None else path
        self.server.expect_request(where, method=method).respond_with_handler(handle)

    def received(self, payload: Callable[[Seen], bytes]) -> Received:
        """The contract's ``contract_received``: waits until ``n`` requests arrived and
        returns the payload of each, as ``payload`` finds it in the request."""

        async def wait(n: int) -> list[bytes]:
            await wait_for(lambda: len(self.seen) >= n, timeout=5)
            return [payload(s) for s in self.seen]

        return wait


C = TypeVar("C", bound=Channel)


@asynccontextmanager
async def built_channels(
    cls: type[C], name: str, table: Mapping[str, Any], context: ChannelContext
) -> AsyncIterator[Callable[..., C]]:
    """A maker of ``cls`` channels built through the registry (as the daemon builds them)
    from ``table`` and the keys each test adds; every one made is closed when the block
    ends."""
    made: list[C] = []

    def make(**raw: Any) -> C:
        channel = registry.build(name, {**table, **raw}, context)
        assert isinstance(channel, cls)
        made.append(channel)
        return channel

    try:
        yield make
    finally:
        for channel in made:
            await channel.aclose()


@contextmanager
def stalled(answer: Answer) -> Iterator[Callable[[Request], Response]]:
    """A handler that holds each request until the block ends (a peer slower than any
    timeout under test), then answers; the block's end releases it even when it fails."""
    release = threading.Event()

    def stall(request: Request) -> Response:
        release.wait(10)
        return reply(answer, request)

    try:
        yield stall
    finally:
        release.set()


@pytest.fixture(scope="module", name="http_server")
def http_server_fixture() -> Iterator[HTTPServer]:
    # Threaded: a request a test holds (see stalled) does not hold up the others.
    srv = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    srv.start()
    yield srv
    srv.clear()
    srv.stop()


@pytest.fixture(name="peer")
def peer_fixture(http_server: HTTPServer, peer_path: str) -> Iterator[Peer]:
    """The module's server, cleared, as a :class:`Peer`; ``peer_path`` is the module's
    fixture naming the channel's default path. A handler that raised fails teardown."""
    http_server.clear()
    yield Peer(http_server, peer_path)
    http_server.check_handler_errors()
