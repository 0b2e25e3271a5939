"""Finding channel plugins: the ``refloop.channels`` entry-point group.

Built-in channels register there exactly as a third-party package would (see
``pyproject.toml``), so a clinic can add its own fax vendor by installing a package that
declares ``[project.entry-points."refloop.channels"] myfax = "myfax:Channel"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, cast

from pydantic import ValidationError

from channels.base import Channel, ChannelConfigError, ChannelContext, ChannelPlugin

GROUP = "refloop.channels"


def available() -> dict[str, str]:
    """``{type: "module:Class"}`` of every installed channel plugin."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def plugin(type_name: str) -> type[ChannelPlugin]:
    """The plugin class for ``type``; :class:`ChannelConfigError` if none is installed."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == type_name]
    if not found:
        known = ", ".join(sorted(available())) or "none"
        raise ChannelConfigError([f"type: unknown channel type {type_name!r} (installed: {known})"])
    try:
        return cast(type[ChannelPlugin], found[0].load())
    except Exception as exc:  # a broken plugin is an operator's problem, said plainly
        raise ChannelConfigError(
            [f"type: channel plugin {type_name!r} ({found[0].value}) failed to load: {exc}"]
        ) from None


def validate(raw: Mapping[str, Any]) -> Any:
    """Validate one ``[channels.<name>]`` table into its plugin's settings object."""
    type_name = raw.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise ChannelConfigError(["type: missing; name the channel type (mllp, fhir, ...)"])
    cls = plugin(type_name)
    try:
        return cls.Settings.model_validate(dict(raw))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(table)"
            problems.append(f"{key}: {err['msg']}")
        raise ChannelConfigError(problems) from None


def build(name: str, raw: Mapping[str, Any], context: ChannelContext) -> Channel:
    """A ready channel from its TOML table (validated first)."""
    settings = validate(raw)
    cls = plugin(settings.type)
    return cast(Channel, cls(name, settings, context))
