"""Every format a route or directory may name has a renderer, and no renderer is hidden."""

from __future__ import annotations

from engine.outbound.packets.registry import FORMATS, renderers
from engine.outbound.routing import ROUTE_OPTIONS


def test_the_known_format_names_are_exactly_the_renderers() -> None:
    assert set(renderers()) == FORMATS


def test_every_route_option_says_what_it_does() -> None:
    assert all(ROUTE_OPTIONS.values())
