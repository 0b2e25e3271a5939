"""Patient outreach in the scheduler's transaction: a due ``outreach`` step → a delivery.

The pure planner (:func:`engine.policy.outreach.plan_outreach`) decides the medium, the
address, the language and whether quiet hours defer it; this shell reads the patient's
own preferences (``patient_preferences``: a STOP wins over what the order said) on the
scheduler's connection and turns the plan into what the scheduler writes: an outbox row
of kind ``outreach`` (which a state change cancels while it waits), the fields of its
``outreach.planned`` trigger event, and a worklist note when the template was missing
in the patient's language.

Deliveries go by route id :data:`ROUTE`; the dispatcher's route options for it carry the
templates folder to the renderers (:func:`render_options`), because render processes
are spawned and share nothing else with the daemon.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from engine.config import Config
from engine.domain.projection import Referral
from engine.outbound.packets.outreach import TemplateError, Templates
from engine.policy.language import Policy
from engine.policy.outreach import (
    Contact,
    Defer,
    OutreachSettings,
    Skip,
    missing_templates,
    plan_outreach,
)
from engine.policy.timers import Effect
from engine.services.scheduler import OutreachDecision, OutreachPlanner
from engine.store.eventlog import EventLog
from engine.store.outbox import NewDelivery
from engine.store.preferences import PreferenceQueries

__all__ = ["ROUTE", "planner", "planner_for", "render_options"]

#: The route id of every outreach delivery (no analyst route: the policy decides).
ROUTE = "outreach"
_NAMESPACE = uuid.UUID("8f1c2a6e-3d4b-4e5f-9a0b-1c2d3e4f5a6b")


def planner(settings: OutreachSettings, templates: Templates) -> OutreachPlanner:
    def plan(
        el: EventLog, effect: Effect, referral: Referral, event_id: str, now: datetime
    ) -> OutreachDecision:
        key = referral.patient_key
        prefs = PreferenceQueries(el.conn, "sqlite" if el.sqlite else "postgresql")
        found = prefs.get([key]) if key else {}
        contact = Contact.of(referral, found.get(key) if key else None)
        decided = plan_outreach(effect, contact, settings, templates, now)
        if isinstance(decided, Defer):
            return OutreachDecision(defer_until=decided.until, channel=decided.medium)
        if isinstance(decided, Skip):
            return OutreachDecision(reason=decided.reason)
        delivery = NewDelivery(
            key=str(uuid.uuid5(_NAMESPACE, f"{event_id}/outreach")),
            referral_id=referral.id,
            event_id=event_id,  # the outreach.planned event: its id is the effect key
            route_id=ROUTE,
            kind="outreach",
            channel=decided.channel,
            format=decided.format,
            endpoint=decided.endpoint,
        )
        notes: tuple[tuple[str, str], ...] = ()
        if decided.fallback:
            notes = (
                (
                    "template_language_fallback",
                    f"template {decided.template} has no {decided.requested_language or '?'} "
                    f"{decided.medium} version: sent in {decided.language}",
                ),
            )
        return OutreachDecision(
            delivery=delivery,
            channel=decided.channel,
            fields={"outreach.channel": decided.medium, "outreach.language": decided.language},
            notes=notes,
        )

    return plan


def planner_for(config: Config, policy: Policy) -> OutreachPlanner | None:
    """The daemon's planner (None: ``[outreach] enabled = false``). Raises
    :class:`~engine.outbound.packets.outreach.TemplateError` with ``file:line`` problems
    when the templates do not load, or when a step of ``policy`` names a template with
    no version in the default language for a medium refloop can send."""
    if not config.outreach.enabled:
        return None
    templates = Templates.load(config.templates_dir())
    settings = OutreachSettings.of(config.outreach, config.channels.keys())
    missing = missing_templates(policy, templates, settings)
    if missing:
        raise TemplateError(missing)
    return planner(settings, templates)


def render_options(config: Config) -> Mapping[str, str]:
    """What the outreach renderers read from the delivery's route options."""
    return {
        "templates_dir": str(Path(config.templates_dir()).resolve()),
        "sender_name": config.outreach.sender_name,
        "default_timezone": config.outreach.default_timezone,
    }
