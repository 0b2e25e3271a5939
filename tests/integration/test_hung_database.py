"""A database that stops answering (not one that refuses) still gets senders an answer."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import running
from tests.helpers import RawMllp, make_config, msg, segments

pytestmark = pytest.mark.postgres


class FreezableProxy:
    """A TCP proxy in front of PostgreSQL that can stop forwarding without closing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_hung_database_gets_every_sender_a_prompt_ar_207_and_recovers(pg_upgraded):
    direct = make_url(pg_upgraded)
    proxy = FreezableProxy(direct.port or 5432)
    port = await proxy.start()
    proxied = direct.set(port=port).render_as_string(hide_password=False)
    config = make_config(proxied, ingest={"commit_timeout_seconds": 1.5})
    try:
        async with running(config) as d:
            peers = [await RawMllp.connect(d.listeners[0].port) for _ in range(4)]
            assert segments(await peers[0].send(msg("BEFORE")))["MSA"][1] == "AA"
            proxy.flowing.clear()  # the server stops answering; connections stay open
            started = time.monotonic()
            naks = await asyncio.gather(
                *(
                    p.send(
                        msg(f"HUNG{i}"),
                    )
                    for i, p in enumerate(peers)
                )
            )
            waited = time.monotonic() - started
            proxy.flowing.set()
            after = await peers[1].send(msg("AFTER"))
            for p in peers:
                await p.close()
    finally:
        await proxy.close()
    for nak in naks:
        seg = segments(nak)
        assert seg["MSA"][1] == "AR"
        assert seg["ERR"][3].startswith("207^")
    assert waited < 10, f"senders waited {waited:.1f}s for an answer"
    assert segments(after)["MSA"][1] == "AA"
