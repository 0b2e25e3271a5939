"""Routing by network: the named specialist, else by specialty, in network for the plan,
nearest first, file order the tie-break; a decline goes to the next untried candidate."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.domain.referral import Event, State
from engine.outbound.directory import (
    DECLINED_NO_ALTERNATIVE,
    NO_IN_NETWORK,
    NO_SPECIALIST,
    Choice,
    load_directory,
)
from engine.outbound.model import ReferralView, Trigger, TriggerEvent
from engine.outbound.packets.registry import FORMATS
from engine.outbound.routing import Outbound, Unrouted, load_outbound, unrouted_code

T0 = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)

DIRECTORY = """\
schema: referral-directory/v1
specialists:
  - id: ortho-north
    name: North Bones (FAKE)
    npi: "1234567893"
    specialties: [orthopedics]
    accepted_plans: [PLAN-PPO]
    locations: [North]
    targets: [{channel: specialist, format: hl7v2.ref_i12, endpoint: "127.0.0.1:1"}]
  - id: ortho-south
    name: South Bones (FAKE)
    specialties: [orthopedics]
    accepted_plans: [PLAN-HMO, plan-ppo]
    locations: [South]
    targets: [{channel: specialist, format: hl7v2.ref_i12, endpoint: "127.0.0.1:2"}]
  - id: ortho-any
    name: Any Plan Bones (FAKE)
    specialties: [orthopedics]
    locations: [North]
    targets: [{channel: specialist, format: hl7v2.ref_i12, endpoint: "127.0.0.1:3"}]
  - id: ortho-retired
    name: Retired Bones (FAKE)
    specialties: [orthopedics]
    active: false
    targets: [{channel: specialist, format: hl7v2.ref_i12, endpoint: "127.0.0.1:4"}]
  - id: derm-ppo
    name: PPO Skin (FAKE)
    specialties: [dermatology]
    accepted_plans: [PLAN-PPO]
    targets: [{channel: specialist, format: hl7v2.ref_i12, endpoint: "127.0.0.1:5"}]
"""

ROUTES = """\
schema: referral-routes/v1
routes:
  - id: packet_to_specialist
    on: referral.created
    when: {state_before: new, state: created}
    send: packet
  - id: packet_after_authorization
    on: authorization.approved
    when: {state_before: auth_pending}
    send: packet
  - id: packet_after_decline
    on: referral.declined
    send: packet
  - id: note_request
    on: referral.escalated
    send: notification
    to: recipient
    format: document.html
"""


def write_network(root: Path, *, endpoint: str | None = None) -> Path:
    """A mappings root with the routes and directory above (``endpoint`` replaces every
    target's address: a real peer)."""
    (root / "outbound").mkdir(parents=True, exist_ok=True)
    (root / "directory").mkdir(parents=True, exist_ok=True)
    directory = DIRECTORY
    if endpoint is not None:
        directory = re.sub(r'"127\.0\.0\.1:\d"', f'"{endpoint}"', directory)
    (root / "outbound" / "routes.yaml").write_text(ROUTES, encoding="utf-8")
    (root / "directory" / "specialists.yaml").write_text(directory, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Outbound:
    root = write_network(tmp_path_factory.mktemp("network"))
    return load_outbound(root, known_formats=FORMATS, known_channels=frozenset({"specialist"}))


def trigger(
    event: Event = Event.REFERRAL_CREATED,
    *,
    specialty: str | None = "orthopedics",
    plan: str | None = None,
    location: str | None = None,
    recipient: str | None = None,
    before: State | None = None,
    after: State = State.CREATED,
    **more: Any,
) -> Trigger:
    referral: dict[str, Any] = {"patient.name": {"family": "Doe"}, **more}
    if specialty:
        referral["specialty"] = specialty
    if plan:
        referral["insurance.plan"] = plan
    if location:
        referral["location"] = location
    if recipient:
        referral["recipient.identifier"] = {"value": recipient, "namespace": "NPI"}
    return Trigger(
        event=TriggerEvent("evt-1", event, {}, T0, 1, before, after),
        referral=ReferralView("ref-1", after, T0, T0, {"referral": referral}),
        source="epic",
    )


def to(network: Outbound, t: Trigger) -> tuple[set[str], list[Unrouted]]:
    routed = network.route(t)
    return {d.recipient_id for d in routed.deliveries}, list(routed.unrouted)


@pytest.mark.parametrize(
    ("plan", "location", "expected"),
    [
        (None, None, "ortho-north"),  # no plan: not filtered; file order
        ("PLAN-PPO", None, "ortho-north"),
        ("plan-hmo", None, "ortho-south"),  # plans compare without case
        ("PLAN-HMO", "North", "ortho-any"),  # in network and near beats in network
        ("PLAN-PPO", "South", "ortho-south"),  # near first among the in-network
        ("PLAN-PPO", "Nowhere", "ortho-north"),  # location a preference, not a filter
        ("PLAN-OTHER", None, "ortho-any"),  # only the entry listing no plans takes it
    ],
)
def test_by_specialty_in_network_then_nearest(
    network: Outbound, plan: str | None, location: str | None, expected: str
) -> None:
    assert to(network, trigger(plan=plan, location=location)) == ({expected}, [])


def test_a_named_specialist_in_network_is_kept(network: Outbound) -> None:
    assert to(network, trigger(recipient="ortho-south", plan="PLAN-HMO", location="North")) == (
        {"ortho-south"},
        [],
    )
    # by NPI too
    assert to(network, trigger(recipient="1234567893", plan="PLAN-PPO")) == ({"ortho-north"}, [])


def test_a_named_specialist_out_of_network_gives_way_with_a_warning(network: Outbound) -> None:
    got, said = to(network, trigger(recipient="1234567893", plan="PLAN-HMO"))
    assert got == {"ortho-south"}
    assert said == [
        Unrouted(
            "packet_to_specialist",
            "the named recipient ortho-north does not accept the referral's plan: sent to "
            "ortho-south, the next in-network candidate",
            warning=True,
        )
    ]
    assert unrouted_code(said[0].reason) is None  # a warning, not a worklist item


def test_a_named_inactive_specialist_routes_by_specialty(network: Outbound) -> None:
    assert to(network, trigger(recipient="ortho-retired", plan="PLAN-HMO")) == (
        {"ortho-south"},
        [],
    )


def test_nobody_in_network_is_a_coded_unrouted(network: Outbound) -> None:
    got, said = to(network, trigger(specialty="dermatology", plan="PLAN-HMO"))
    assert got == set()
    (only,) = said
    assert only.code == NO_IN_NETWORK
    assert only.reason == (
        "no in-network specialist in the directory for specialty dermatology: none takes the "
        "referral's plan [no_in_network_specialist]"
    )
    assert unrouted_code(only.reason) == NO_IN_NETWORK
    assert "PLAN-HMO" not in only.reason
    assert "Doe" not in only.reason
    _, said = to(network, trigger(specialty="neurology"))
    assert [(u.code, unrouted_code(u.reason)) for u in said] == [(NO_SPECIALIST, NO_SPECIALIST)]


def test_a_decline_goes_to_the_next_untried_candidate(network: Outbound) -> None:
    declined = trigger(
        Event.REFERRAL_DECLINED,
        plan="PLAN-PPO",
        before=State.SENT,
        after=State.DECLINED,
        **{"delivery.recipient": "ortho-north"},
    )
    assert to(network, declined) == ({"ortho-south"}, [])
    again = trigger(
        Event.REFERRAL_DECLINED,
        plan="PLAN-PPO",
        before=State.SENT,
        after=State.DECLINED,
        **SECOND,
    )
    assert to(network, again) == ({"ortho-any"}, [])


SECOND: dict[str, Any] = {"delivery.recipient": "ortho-south", "routing.tried": ["ortho-north"]}
LAST: dict[str, Any] = {
    "delivery.recipient": "ortho-any",
    "routing.tried": ["ortho-north", "ortho-south"],
}


def test_a_decline_with_nobody_left_is_declined_no_alternative(network: Outbound) -> None:
    last = trigger(
        Event.REFERRAL_DECLINED,
        plan="PLAN-PPO",
        before=State.SENT,
        after=State.DECLINED,
        **LAST,
    )
    got, said = to(network, last)
    assert got == set()
    assert [u.code for u in said] == [DECLINED_NO_ALTERNATIVE]
    assert said[0].reason.endswith("[declined_no_alternative]")
    # out of network is no alternative either, after a decline
    derm = trigger(
        Event.REFERRAL_DECLINED,
        specialty="dermatology",
        plan="PLAN-HMO",
        before=State.SENT,
        after=State.DECLINED,
        **{"delivery.recipient": "derm-ppo"},
    )
    assert [u.code for u in to(network, derm)[1]] == [DECLINED_NO_ALTERNATIVE]


def test_a_named_specialist_who_declined_is_not_sent_it_again(network: Outbound) -> None:
    declined = trigger(
        Event.REFERRAL_DECLINED,
        recipient="ortho-south",
        plan="PLAN-HMO",
        before=State.SENT,
        after=State.DECLINED,
    )
    got, said = to(network, declined)
    assert got == {"ortho-any"}
    assert [u.warning for u in said] == [True]
    assert "ortho-south was already tried" in said[0].reason


def test_only_a_decline_routes_away_from_the_last_recipient(network: Outbound) -> None:
    """A note request after the visit goes to the specialist the referral is with."""
    escalated = trigger(
        Event.REFERRAL_ESCALATED,
        plan="PLAN-PPO",
        before=State.COMPLETED,
        after=State.COMPLETED,
        **{"delivery.recipient": "ortho-north"},
    )
    routed = network.route_named("note_request", escalated)
    assert [d.recipient_id for d in routed.deliveries] == ["ortho-north"]
    assert routed.unrouted == ()


def test_a_passed_over_named_recipient_is_no_exception_for_a_notice(network: Outbound) -> None:
    escalated = trigger(
        Event.REFERRAL_ESCALATED,
        recipient="ortho-north",
        plan="PLAN-HMO",
        before=State.COMPLETED,
        after=State.COMPLETED,
    )
    routed = network.route_named("note_request", escalated)
    assert [d.recipient_id for d in routed.deliveries] == ["ortho-south"]
    assert routed.unrouted == ()  # the scheduler would raise notice_not_sent for one


def test_choose_is_pure_directory_lookup(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(DIRECTORY, encoding="utf-8")
    directory = load_directory(tmp_path)
    assert directory.choose(None, "orthopedics", plan="PLAN-HMO").specialist.id == "ortho-south"  # type: ignore[union-attr]
    assert directory.choose(None, None) == Choice(None, NO_SPECIALIST)
    assert directory.choose(None, None, exclude=["x"]) == Choice(None, DECLINED_NO_ALTERNATIVE)
    assert directory.choose(
        None, "orthopedics", exclude=["ortho-north", "ortho-south", "ortho-any"]
    ) == Choice(None, DECLINED_NO_ALTERNATIVE)
    # the old lookup is unchanged: named, else the first for the specialty
    assert directory.select(None, "orthopedics").id == "ortho-north"  # type: ignore[union-attr]
