"""Packet renderers: a delivery's ``format`` names one; each turns a PacketContext into
bytes for a channel, or raises RenderError (a permanent failure, with the reason)."""

from __future__ import annotations

from collections.abc import Callable

from engine.outbound.model import PacketContext, Rendered

Renderer = Callable[[PacketContext], Rendered]
