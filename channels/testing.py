"""A fake channel that ships with the code: records envelopes, plays scripted outcomes.

For unit tests of the dispatcher and for the simulator, never for proving a real
channel works (those are tested against real peers). Register it in a config as
``type = "fake"`` only from tests that install it with :func:`install`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar

from channels.base import (
    ChannelContext,
    ChannelError,
    ChannelSettings,
    Envelope,
    Receipt,
)

Outcome = Receipt | ChannelError


class FakeSettings(ChannelSettings):
    pass


class FakeChannel:
    """Every ``send`` appends its envelope to ``sent`` and plays the next scripted
    outcome (a :class:`Receipt` or an error to raise); with no script left, it accepts."""

    Settings: ClassVar[type[ChannelSettings]] = FakeSettings

    def __init__(
        self, name: str, settings: Any = None, context: ChannelContext | None = None
    ) -> None:
        self.name = name
        self.settings = settings
        self.sent: list[Envelope] = []
        self.script: deque[Outcome] = deque()
        self.closed = False
        self.changed = asyncio.Event()

    def play(self, outcomes: Iterable[Outcome]) -> None:
        self.script.extend(outcomes)

    async def send(self, envelope: Envelope) -> Receipt:
        self.sent.append(envelope)
        self.changed.set()
        outcome = self.script.popleft() if self.script else Receipt(detail="fake accepted")
        if isinstance(outcome, ChannelError):
            raise outcome
        return outcome

    async def aclose(self) -> None:
        self.closed = True
