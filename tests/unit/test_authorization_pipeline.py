"""The pre-authorization gate and routing exceptions in the pipeline (pure planning, the
real routes and directory): held orders send nothing, approval sends the packet once, an
out-of-network or declined referral goes to the next candidate, none left is a worklist
item."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.domain.events import CanonicalEvent, Normalised, Outcome, event_id
from engine.domain.projection import Referral
from engine.domain.referral import Event, State
from engine.outbound.packets.registry import FORMATS
from engine.outbound.routing import load_outbound
from engine.policy.authorization import compile_table, requires
from engine.services.mappings import router_of
from engine.services.pipeline import Inbound, Known, Plan, Route, pending_id_for, plan
from tests.unit.test_routing_network import write_network

E = Event
T0 = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
PATIENT = {"value": "100001", "namespace": "ACME"}
AUTHORIZED: dict[str, Any] = {"authorization.identifier": {"value": "A-9", "namespace": "HMO"}}
TABLE = compile_table(
    "auth.yaml",
    b"schema: referral-authorization/v1\nrules:\n"
    b"  - {id: hmo_ortho, payer: EXAMPLE-HMO, specialty: orthopedics, required: true}\n",
)


def needs_auth(r: Referral) -> str | None:
    return requires(TABLE, r)


@pytest.fixture(scope="module")
def route(tmp_path_factory: pytest.TempPathFactory) -> Route:
    root = write_network(tmp_path_factory.mktemp("net"))
    outbound = load_outbound(root, known_formats=FORMATS, known_channels={"specialist"})
    router = router_of(outbound, {"specialist"})
    assert router is not None
    return router


def placer(value: str) -> dict[str, str]:
    return {"value": value, "namespace": "ACME"}


def message(mid: int, *events: CanonicalEvent) -> Inbound:
    return Inbound(
        mid,
        T0 + timedelta(minutes=mid),
        Normalised(Outcome.PROCESSED, events, mapping_id="m"),
        source="epic",
    )


def order(mid: int, number: str = "P1", **more: Any) -> Inbound:
    fields = {
        "correlate.placer_order": placer(number),
        "patient.identifier": PATIENT,
        "specialty": "orthopedics",
        "insurance.payer": "EXAMPLE-HMO",
        "insurance.plan": "PLAN-HMO",
        **more,
    }
    return message(mid, CanonicalEvent(E.REFERRAL_CREATED, fields, "new_referral"))


def follow(mid: int, kind: Event, number: str = "P1", **more: Any) -> Inbound:
    fields = {"correlate.placer_order": placer(number), **more}
    return message(mid, CanonicalEvent(kind, fields, f"rule_{kind.value}"))


def created_id(mid: int) -> str:
    return event_id(mid, CanonicalEvent(E.REFERRAL_CREATED, {}, "", 0))


def test_an_order_that_needs_authorization_parks_in_auth_pending(route: Route) -> None:
    p = plan([order(1)], Known(), NOW, route, needs_auth=needs_auth)
    (referral,) = p.changes.referrals
    assert referral.state is State.AUTH_PENDING
    assert p.changes.deliveries == []
    created, pending = p.changes.events
    assert (created.type, created.state_after, created.sequence) == (
        E.REFERRAL_CREATED,
        State.CREATED,
        1,
    )
    assert (pending.type, pending.state_before, pending.state_after, pending.sequence) == (
        E.AUTHORIZATION_PENDING,
        State.CREATED,
        State.AUTH_PENDING,
        2,
    )
    assert (
        pending.id
        == pending_id_for(created.id)
        == str(uuid.uuid5(uuid.UUID("3c8d2a51-7e0f-4b6a-9d14-5a2e8f61c7b3"), created.id))
    )
    assert (pending.rule_id, pending.message_id) == ("auth:hmo_ortho", 1)
    assert json.loads(pending.fields) == {"authorization.status": "pending"}
    assert referral.data["authorization"] == {"authorization.status": "pending"}
    (report,) = p.reports
    assert report.new_events == ("referral.created", "authorization.pending")
    assert report.diagnostics == ()  # held, not unrouted


def test_without_the_gate_or_when_not_required_the_packet_leaves(route: Route) -> None:
    for p in (
        plan([order(1)], Known(), NOW, route),
        plan(
            [order(1, **{"insurance.payer": "EXAMPLE-PPO"})],
            Known(),
            NOW,
            route,
            needs_auth=needs_auth,
        ),
        plan(
            [order(1, **AUTHORIZED)],
            Known(),
            NOW,
            route,
            needs_auth=needs_auth,
        ),
    ):
        assert [r.state for r in p.changes.referrals] == [State.CREATED]
        assert [(d.route_id, d.recipient_id) for d in p.changes.deliveries] == [
            ("packet_to_specialist", "ortho-south")
        ]


def test_approval_releases_exactly_one_packet(route: Route) -> None:
    approved = follow(
        2,
        E.AUTHORIZATION_APPROVED,
        **AUTHORIZED,
    )
    p = plan([order(1), approved], Known(), NOW, route, needs_auth=needs_auth)
    (referral,) = p.changes.referrals
    assert referral.state is State.CREATED
    assert [(d.route_id, d.recipient_id, d.event_id) for d in p.changes.deliveries] == [
        ("packet_after_authorization", "ortho-south", p.changes.events[-1].id)
    ]
    # A second approval (a resent message) sends nothing more.
    again = follow(3, E.AUTHORIZATION_APPROVED)
    second = plan(
        [again],
        Known(
            index={k: frozenset({referral.id}) for k, _ in p.changes.keys},
            referrals={referral.id: referral},
        ),
        NOW,
        route,
        needs_auth=needs_auth,
    )
    assert second.changes.deliveries == []


def test_a_replayed_held_order_stages_nothing_twice(route: Route) -> None:
    first = plan([order(1)], Known(), NOW, route, needs_auth=needs_auth)
    (referral,) = first.changes.referrals
    known = Known(
        index={k: frozenset({referral.id}) for k, _ in first.changes.keys},
        referrals={referral.id: referral},
        events={row.id: referral.id for row in first.changes.events},
    )
    replay = plan([order(1)], known, NOW, route, needs_auth=needs_auth)
    assert replay.changes.events == []
    assert replay.changes.deliveries == []


def test_a_named_specialist_out_of_network_gives_way_to_the_next(route: Route) -> None:
    more: dict[str, Any] = {
        "insurance.payer": "EXAMPLE-PPO",
        "recipient.identifier": {"value": "1234567893", "namespace": "NPI"},
    }
    named = order(1, **more)
    p = plan([named], Known(), NOW, route, needs_auth=needs_auth)
    assert [d.recipient_id for d in p.changes.deliveries] == ["ortho-south"]
    (report,) = p.reports
    assert [(d.code, d.severity) for d in report.diagnostics] == [("unrouted", "warning")]
    assert "ortho-north does not accept the referral's plan" in report.diagnostics[0].message
    assert p.changes.worklist == []


@pytest.mark.parametrize(
    ("more", "code"),
    [
        ({"specialty": "neurology"}, "no_specialist"),
        ({"specialty": "dermatology"}, "no_in_network_specialist"),
    ],
)
def test_nobody_to_send_it_to_is_a_worklist_item(
    route: Route, more: dict[str, Any], code: str
) -> None:
    p = plan([order(1, **{"insurance.payer": "EXAMPLE-PPO", **more})], Known(), NOW, route)
    assert p.changes.deliveries == []
    (item,) = p.changes.worklist
    created = p.changes.events[0]
    assert (item.key, item.reason, item.referral_id, item.state) == (
        str(uuid.uuid5(uuid.UUID(created.id), code)),
        code,
        created.referral_id,
        "created",
    )
    assert "100001" not in item.detail
    (report,) = p.reports
    assert report.diagnostics[0].message.endswith(f"[{code}]")


def _sent(route: Route, recipient: str, tried: list[str] | None = None) -> tuple[Plan, Known]:
    first = plan([order(1, **{"insurance.payer": "EXAMPLE-PPO"})], Known(), NOW, route)
    (referral,) = first.changes.referrals
    data = {g: dict(v) for g, v in referral.data.items()}
    data["referral"]["delivery.recipient"] = recipient
    if tried is not None:
        data["referral"]["routing.tried"] = tried
    sent = Referral(referral.id, State.SENT, 2, referral.created_at, NOW, data=data)
    known = Known(
        index={k: frozenset({referral.id}) for k, _ in first.changes.keys},
        referrals={referral.id: sent},
    )
    return first, known


def test_a_decline_sends_the_packet_to_the_next_candidate(route: Route) -> None:
    _, known = _sent(route, "ortho-south")
    p = plan([follow(5, E.REFERRAL_DECLINED)], known, NOW, route)
    assert [(d.route_id, d.recipient_id) for d in p.changes.deliveries] == [
        ("packet_after_decline", "ortho-any")
    ]
    (row,) = p.changes.events
    assert json.loads(row.fields)["routing.tried"] == ["ortho-south"]
    (referral,) = p.changes.referrals
    assert referral.data["referral"]["routing.tried"] == ["ortho-south"]


def test_a_decline_with_nobody_left_is_a_worklist_item(route: Route) -> None:
    _, known = _sent(route, "ortho-any", tried=["ortho-south"])
    p = plan([follow(5, E.REFERRAL_DECLINED)], known, NOW, route)
    assert p.changes.deliveries == []
    (item,) = p.changes.worklist
    assert (item.reason, item.state) == ("declined_no_alternative", "declined")
    (row,) = p.changes.events
    assert json.loads(row.fields)["routing.tried"] == ["ortho-south", "ortho-any"]


def test_the_real_router_signature_is_what_plan_takes(tmp_path: Path) -> None:
    """No routes: no router, and the gate still holds (nothing would be sent anyway)."""
    p = plan([order(1)], Known(), NOW, None, needs_auth=needs_auth)
    assert [r.state for r in p.changes.referrals] == [State.AUTH_PENDING]
    assert p.changes.worklist == []
    assert created_id(1) == p.changes.events[0].id
