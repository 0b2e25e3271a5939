"""Outbound routing: bad files refused at their line:column, and what an event sends where."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.domain.referral import Event, State
from engine.outbound.model import DeliveryRequest, Party, ReferralView, Trigger, TriggerEvent
from engine.outbound.packets.registry import FORMATS
from engine.outbound.routing import (
    EMPTY,
    NAMESPACE,
    Outbound,
    OutboundError,
    Routed,
    Unrouted,
    load_outbound,
)
from engine.outbound.schema import SCHEMAS, render

REPO = Path(__file__).resolve().parents[2]
MAPPINGS = REPO / "mappings"
NETWORK = REPO / "tests" / "data" / "outbound" / "network"
CHANNELS = frozenset({"specialist", "email", "fax", "ehr", "fhir-ehr", "fhir-specialist"})
T0 = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
# Patient data on every trigger: no reason may quote it.
PHI = {
    "patient.name": {"family": "Doe", "given": "Jane"},
    "patient.identifier": {"value": "MRN4242", "namespace": "HOSP"},
    "patient.birth_date": "1970-02-03",
}


def trigger(
    event: Event = Event.REFERRAL_CREATED,
    *,
    before: State | None = None,
    after: State = State.CREATED,
    specialty: str | dict[str, str] | None = "cardiology",
    priority: str | None = "routine",
    recipient: str | None = None,
    source: str = "epic",
    event_id: str = "evt-1",
) -> Trigger:
    referral: dict[str, Any] = dict(PHI)
    if specialty is not None:
        referral["specialty"] = specialty
    if priority is not None:
        referral["priority"] = priority
    if recipient is not None:
        referral["recipient.identifier"] = {"value": recipient, "namespace": "NPI"}
        referral["recipient.name"] = {"family": "Example", "given": "Ada"}
    return Trigger(
        event=TriggerEvent(
            id=event_id,
            type=event,
            fields={},
            occurred_at=T0,
            sequence=1 if before is None else 2,
            state_before=before,
            state_after=after,
        ),
        referral=ReferralView("ref-1", after, T0, T0, {"referral": referral}),
        source=source,
    )


@pytest.fixture(scope="module")
def network() -> Outbound:
    return load_outbound(NETWORK, known_formats=FORMATS, known_channels=CHANNELS)


def summary(routed: Routed) -> list[tuple[str, str, str, str, str, str]]:
    return [
        (d.route_id, d.kind, d.channel, d.format, d.endpoint, d.recipient_id)
        for d in routed.deliveries
    ]


def key(event_id: str, route_id: str, part: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{event_id}/{route_id}/{part}"))


# ---- routing decisions ----------------------------------------------------------------------


def test_created_sends_a_packet_to_each_target_of_the_specialist(network: Outbound) -> None:
    routed = network.route(trigger())
    assert routed.unrouted == ()
    assert routed.deliveries == (
        DeliveryRequest(
            key=key("evt-1", "packet", "0"),
            route_id="packet",
            kind="packet",
            channel="specialist",
            format="hl7v2.ref_i12",
            endpoint="127.0.0.1:12576",
            recipient_id="heartwell",
            receiver=Party("HEARTWELL", "CARDIO"),
        ),
        DeliveryRequest(
            key=key("evt-1", "packet", "1"),
            route_id="packet",
            kind="packet",
            channel="email",
            format="document.pdf",
            endpoint="intake@heartwell.example",
            recipient_id="heartwell",
            receiver=Party("HEARTWELL", "CARDIO"),
        ),
    )


@pytest.mark.parametrize(
    ("recipient", "specialty", "expected"),
    [
        ("1000000004", "cardiology", "valley-heart"),  # NPI beats the specialty's first entry
        ("skinworks", "cardiology", "skinworks"),  # a directory id works too
        ("1666666668", "cardiology", "heartwell"),  # named but inactive: by specialty
        ("0000000000", "dermatology", "skinworks"),  # unknown recipient: by specialty
        (None, {"code": "mohs", "system": "local"}, "skinworks"),  # a coded specialty
    ],
)
def test_who_the_packet_goes_to(
    network: Outbound, recipient: str | None, specialty: Any, expected: str
) -> None:
    routed = network.route(trigger(recipient=recipient, specialty=specialty))
    assert {d.recipient_id for d in routed.deliveries} == {expected}
    assert routed.unrouted == ()


@pytest.mark.parametrize(
    ("specialty", "recipient", "reason"),
    [
        ("neurology", None, "no specialist in the directory for specialty neurology"),
        (
            "neurology",
            "1666666668",
            "no specialist in the directory for specialty neurology (the named recipient is "
            "not an active entry)",
        ),
        (None, None, "no specialist in the directory for this referral: it has no specialty"),
    ],
)
def test_no_specialist_is_unrouted_with_a_reason(
    network: Outbound, specialty: str | None, recipient: str | None, reason: str
) -> None:
    routed = network.route(trigger(specialty=specialty, recipient=recipient))
    assert routed.deliveries == ()
    # The worklist code rides at the end of the reason (the pipeline reads it there).
    assert routed.unrouted == (
        Unrouted("packet", f"{reason} [no_specialist]", code="no_specialist"),
    )
    for value in ("Doe", "Jane", "MRN4242", "1970", "1666666668", "Example"):
        assert value not in reason


WRITEBACKS = [
    (Event.APPOINTMENT_BOOKED, State.SCHEDULED, "status", "hl7v2.orm_status"),
    (Event.APPOINTMENT_CANCELLED, State.APPOINTMENT_CANCELLED, "status", "hl7v2.orm_status"),
    (Event.REFERRAL_CLOSED, State.CLOSED, "status", "hl7v2.orm_status"),
    (Event.CONSULT_NOTE_RECEIVED, State.NOTE_RECEIVED, "note", "hl7v2.mdm_note"),
    (Event.CONSULT_NOTE_AMENDED, State.NOTE_RECEIVED, "note", "hl7v2.mdm_note"),
]


@pytest.mark.parametrize(("event", "after", "route_id", "fmt"), WRITEBACKS)
def test_writeback_to_the_source(
    network: Outbound, event: Event, after: State, route_id: str, fmt: str
) -> None:
    routed = network.route(trigger(event, before=State.SCHEDULED, after=after))
    assert routed.unrouted == ()
    assert routed.deliveries == (
        DeliveryRequest(
            key=key("evt-1", route_id, "source"),
            route_id=route_id,
            kind="writeback",
            channel="ehr",
            format=fmt,
            endpoint="127.0.0.1:2575",
            receiver=Party("EPIC", "MAINCLINIC"),
        ),
    )


def test_writeback_events_subset_and_note_format_default(network: Outbound) -> None:
    booked = network.route(trigger(Event.APPOINTMENT_BOOKED, source="cerner"))
    assert booked == Routed((), ())  # cerner takes only consult_note.received back
    note = network.route(trigger(Event.CONSULT_NOTE_RECEIVED, source="cerner"))
    assert summary(note) == [("note", "writeback", "fhir-ehr", "fhir.status_update", "", "")]
    amended = network.route(trigger(Event.CONSULT_NOTE_AMENDED, source="cerner"))
    assert amended == Routed((), ())


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("meditech", "no write-back configured for source 'meditech'"),
        ("athena", "write-back for source 'athena' is disabled"),
    ],
)
def test_source_without_writeback_is_unrouted(network: Outbound, source: str, reason: str) -> None:
    routed = network.route(trigger(Event.APPOINTMENT_BOOKED, source=source))
    assert routed == Routed((), (Unrouted("status", reason),))


def test_when_specialty_and_priority_add_the_urgent_fax(network: Outbound) -> None:
    routed = network.route(trigger(priority="stat"))
    assert summary(routed) == [
        ("packet", "packet", "specialist", "hl7v2.ref_i12", "127.0.0.1:12576", "heartwell"),
        ("packet", "packet", "email", "document.pdf", "intake@heartwell.example", "heartwell"),
        # targets: first, and a route choosing its own channel keeps no target endpoint
        ("urgent_fax", "packet", "fax", "document.pdf", "", "heartwell"),
    ]
    assert routed.deliveries[2].key == key("evt-1", "urgent_fax", "0")
    dermatology = network.route(trigger(priority="stat", specialty="dermatology"))
    assert {d.route_id for d in dermatology.deliveries} == {"packet"}


@pytest.mark.parametrize(
    ("source", "recipient", "expected"),
    [
        ("epic", None, [("accepted_webhook", "notification", "ehr", "json.event")]),  # heartwell
        ("epic", "1000000004", [("accepted_webhook", "notification", "ehr", "json.event")]),
        ("epic", "skinworks", []),  # a recipient the route does not name
        ("cerner", None, []),  # another source
    ],
)
def test_when_source_and_recipient(
    network: Outbound, source: str, recipient: str | None, expected: list[tuple[str, ...]]
) -> None:
    routed = network.route(
        trigger(
            Event.REFERRAL_ACCEPTED,
            before=State.SENT,
            after=State.ACCEPTED,
            source=source,
            recipient=recipient,
        )
    )
    assert [d[:4] for d in summary(routed)] == expected
    assert routed.unrouted == ()


@pytest.mark.parametrize(
    ("event", "before", "after", "routes"),
    [
        (Event.REFERRAL_CREATED, None, State.CREATED, {"packet"}),
        (Event.REFERRAL_CREATED, State.CREATED, State.CREATED, set()),  # a resent order
        (Event.AUTHORIZATION_APPROVED, State.AUTH_PENDING, State.CREATED, {"packet_after_auth"}),
        (Event.AUTHORIZATION_APPROVED, State.SENT, State.SENT, set()),  # never held
        (Event.REFERRAL_UPDATED, State.SENT, State.SENT, set()),  # no route for it
    ],
)
def test_when_state_before(
    network: Outbound, event: Event, before: State | None, after: State, routes: set[str]
) -> None:
    routed = network.route(trigger(event, before=before, after=after))
    assert {d.route_id for d in routed.deliveries} == routes


def test_keys_are_deterministic(network: Outbound) -> None:
    first = network.route(trigger(priority="stat"))
    again = network.route(trigger(priority="stat"))
    assert first == again
    keys = [d.key for d in first.deliveries]
    assert len(set(keys)) == len(keys) == 3
    other = network.route(trigger(priority="stat", event_id="evt-2"))
    assert not set(keys) & {d.key for d in other.deliveries}
    reloaded = load_outbound(NETWORK).route(trigger(priority="stat"))
    assert [d.key for d in reloaded.deliveries] == keys


def test_disabled_route_and_inactive_specialist_are_ignored(network: Outbound) -> None:
    assert "switched_off" in {r.id for r in network.routes}  # is loaded …
    # … but never fires, although it matches referral.created: it is a disabled route
    assert all(d.route_id != "switched_off" for d in network.route(trigger()).deliveries)
    assert "not-defined-anywhere" not in network.channels()
    assert all(d.recipient_id != "closed-cardio" for d in network.route(trigger()).deliveries)


def test_channels_formats_and_lookups(network: Outbound) -> None:
    assert network.channels() == CHANNELS
    assert network.formats() == {
        "hl7v2.ref_i12",
        "document.pdf",
        "document.html",
        "fhir.referral_bundle",
        "json.event",
        "hl7v2.orm_status",
        "hl7v2.mdm_note",
        "fhir.status_update",
    }
    found = network.specialist("closed-cardio")
    assert found is not None
    assert found.active is False
    assert network.specialist("nobody") is None
    epic = network.writeback.get("epic")
    assert epic is not None
    assert epic.receiver == Party("EPIC", "MAINCLINIC")
    athena = network.writeback.get("athena")
    assert athena is not None
    assert athena.enabled is False
    assert network.writeback.get("meditech") is None


def test_digest_follows_the_files(tmp_path: Path) -> None:
    for path in NETWORK.rglob("*"):
        if path.is_file():
            target = tmp_path / path.relative_to(NETWORK)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    first = load_outbound(tmp_path)
    assert len(first.digest) == 16
    assert first.digest == load_outbound(NETWORK).digest  # relative paths, not where it lives
    csv = tmp_path / "directory" / "b_others.csv"
    csv.write_text(csv.read_text(encoding="utf-8").replace("South", "East"), encoding="utf-8")
    assert load_outbound(tmp_path).digest != first.digest


def test_no_outbound_folders_route_nothing(tmp_path: Path) -> None:
    loaded = load_outbound(tmp_path, known_formats=FORMATS, known_channels=())
    assert loaded.route(trigger()) == Routed((), ())
    assert loaded.digest == EMPTY.digest
    assert EMPTY.route(trigger()) == Routed((), ())
    assert EMPTY.channels() == frozenset()
    assert EMPTY.formats() == frozenset()
    with pytest.raises(OutboundError) as caught:
        load_outbound(tmp_path / "missing")
    assert caught.value.errors == [f"{tmp_path}/missing:1:1: no such mappings directory"]


# ---- the shipped set ------------------------------------------------------------------------


def test_the_shipped_set_validates_and_sends_nothing() -> None:
    shipped = load_outbound(MAPPINGS, known_formats=FORMATS, known_channels=frozenset())
    assert shipped.channels() == frozenset()
    assert {r.id for r in shipped.routes} >= {"packet_to_specialist", "status_to_source"}
    created = shipped.route(trigger(source="default"))
    assert created == Routed(
        (),
        (
            Unrouted(
                "packet_to_specialist",
                "no specialist in the directory for specialty cardiology [no_specialist]",
                code="no_specialist",
            ),
        ),
    )
    for event in (
        Event.APPOINTMENT_BOOKED,
        Event.APPOINTMENT_RESCHEDULED,
        Event.APPOINTMENT_CANCELLED,
        Event.APPOINTMENT_NO_SHOW,
        Event.APPOINTMENT_COMPLETED,
        Event.CONSULT_NOTE_RECEIVED,
        Event.CONSULT_NOTE_AMENDED,
        Event.REFERRAL_CLOSED,
        Event.REFERRAL_CANCELLED,
        Event.REFERRAL_DECLINED,
    ):
        routed = shipped.route(trigger(event, before=State.SCHEDULED, source="default"))
        assert routed.deliveries == ()
        # A decline looks for the next specialist too: the shipped directory has none.
        alternative = (
            [
                "no other specialist in the directory for specialty cardiology: every "
                "candidate declined or was tried [declined_no_alternative]"
            ]
            if event is Event.REFERRAL_DECLINED
            else []
        )
        assert [u.reason for u in routed.unrouted] == [
            *alternative,
            "write-back for source 'default' is disabled",
        ]


def test_the_shipped_set_goes_live_with_its_channels(tmp_path: Path) -> None:
    """Turned on, the shipped example sends the packet and the write-backs it describes."""
    for path in MAPPINGS.joinpath("outbound").glob("*.yaml"):
        (tmp_path / "outbound").mkdir(exist_ok=True)
        (tmp_path / "outbound" / path.name).write_text(
            path.read_text(encoding="utf-8").replace("enabled: false", "enabled: true"),
            encoding="utf-8",
        )
    (tmp_path / "directory").mkdir()
    (tmp_path / "directory" / "specialists.yaml").write_text(
        (MAPPINGS / "directory" / "specialists.yaml")
        .read_text(encoding="utf-8")
        .replace("active: false", "active: true"),
        encoding="utf-8",
    )
    with pytest.raises(OutboundError) as caught:
        load_outbound(tmp_path, known_formats=FORMATS, known_channels=frozenset())
    assert [e.split(": ", 1)[1].split(" (")[0] for e in caught.value.errors] == [
        "unknown channel 'ehr'",
        "unknown channel 'specialist'",
    ]
    live = load_outbound(tmp_path, known_formats=FORMATS, known_channels={"ehr", "specialist"})
    packet = live.route(trigger(source="default"))
    assert summary(packet) == [
        (
            "packet_to_specialist",
            "packet",
            "specialist",
            "hl7v2.ref_i12",
            "127.0.0.1:12576",
            "example-cardiology",
        )
    ]
    held = live.route(
        trigger(Event.AUTHORIZATION_APPROVED, before=State.AUTH_PENDING, source="default")
    )
    assert [d.route_id for d in held.deliveries] == ["packet_after_authorization"]
    note = live.route(
        trigger(
            Event.CONSULT_NOTE_RECEIVED,
            before=State.COMPLETED,
            after=State.NOTE_RECEIVED,
            source="default",
        )
    )
    assert summary(note) == [("note_to_source", "writeback", "ehr", "hl7v2.oru_note", "", "")]
    assert note.deliveries[0].receiver == Party("EHR", "CLINIC")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_is_current(name: str) -> None:
    committed = (MAPPINGS / "_schema" / name).read_text(encoding="utf-8")
    assert committed == render(name), "run `refloop mappings schema` and commit the result"


# ---- bad files ------------------------------------------------------------------------------

SCHEMA = "schema: referral-routes/v1\nroutes:\n"
ROUTE = "  - id: r1\n    on: referral.created\n    send: packet\n"
WRITEBACK = "schema: referral-writeback/v1\nsources:\n  epic:\n    channel: ehr\n"
DIRECTORY = (
    "schema: referral-directory/v1\nspecialists:\n  - id: heartwell\n    name: H (FAKE)\n"
    "    targets: [{channel: specialist, format: hl7v2.ref_i12}]\n"
)


def routes(*lines: str) -> dict[str, str]:
    return {"outbound/routes.yaml": SCHEMA + "".join(lines)}


BAD = [
    pytest.param(
        routes(ROUTE, "    sned: writeback\n"),
        "outbound/routes.yaml:6:5: unknown key 'sned' (did you mean 'send'?); expected one of",
        id="unknown-key",
    ),
    pytest.param(
        routes("  - id: r1\n    on: referral.craeted\n    send: packet\n"),
        "outbound/routes.yaml:4:9: unknown event 'referral.craeted' (did you mean "
        "'referral.created'?)",
        id="unknown-event",
    ),
    pytest.param(
        routes("  - id: r1\n    on: [referral.created, appointment.boked]\n    send: packet\n"),
        "outbound/routes.yaml:4:28: unknown event 'appointment.boked' (did you mean "
        "'appointment.booked'?)",
        id="unknown-event-in-list",
    ),
    pytest.param(
        routes(ROUTE, "    when: {state: schedueld}\n"),
        "outbound/routes.yaml:6:19: unknown state 'schedueld' (did you mean 'scheduled'?)",
        id="unknown-state",
    ),
    pytest.param(
        routes(ROUTE, "    when:\n      state_before: [new, held]\n"),
        "outbound/routes.yaml:7:27: unknown state 'held'; states are new, created,",
        id="unknown-state-before",
    ),
    pytest.param(
        routes(ROUTE, "    when: {colour: red}\n"),
        "outbound/routes.yaml:6:12: unknown key 'colour'; expected one of state, state_before",
        id="unknown-when-key",
    ),
    pytest.param(
        routes(ROUTE, ROUTE),
        "outbound/routes.yaml:6:9: route id 'r1' is also used at outbound/routes.yaml:3:9",
        id="duplicate-route-id",
    ),
    pytest.param(
        routes(ROUTE, "    to: specialist\n"),
        "outbound/routes.yaml:6:9: to must be one of recipient, source",
        id="bad-to",
    ),
    pytest.param(
        routes(ROUTE, "    to: source\n"),
        "outbound/routes.yaml:6:9: a packet goes to the recipient (to: recipient)",
        id="packet-to-source",
    ),
    pytest.param(
        routes("  - id: r1\n    on: referral.closed\n    send: writeback\n    to: recipient\n"),
        "outbound/routes.yaml:6:9: a write-back goes to the source (to: source)",
        id="writeback-to-recipient",
    ),
    pytest.param(
        routes("  - id: r1\n    on: referral.closed\n    send: notification\n    to: source\n"),
        "outbound/routes.yaml:3:5: a notification names its format (e.g. format: json.event)",
        id="notification-without-format",
    ),
    pytest.param(
        routes(
            "  - id: r1\n    on: referral.closed\n    send: notification\n    format: json.event\n"
        ),
        "outbound/routes.yaml:3:5: a notification says who it goes to",
        id="notification-without-to",
    ),
    pytest.param(
        routes("  - id: r1\n    on: referral.closed\n    send: writeback\n    targets: first\n"),
        "outbound/routes.yaml:6:14: targets chooses among a specialist's targets",
        id="targets-to-source",
    ),
    pytest.param(
        routes(ROUTE, "    send: writeback\n"),
        "outbound/routes.yaml:6:5: duplicate key 'send' (first at line 5)",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        routes(ROUTE, "    format: hl7v2.ref_i13\n"),
        "outbound/routes.yaml:6:13: unknown format 'hl7v2.ref_i13' (did you mean "
        "'hl7v2.ref_i12'?) (the engine renders: document.html,",
        id="unknown-format",
    ),
    pytest.param(
        routes(ROUTE, "    channel: faxx\n"),
        "outbound/routes.yaml:6:14: unknown channel 'faxx' (did you mean 'fax'?) (engine.toml "
        "defines: ehr, email, fax, fhir-ehr, fhir-specialist, specialist)",
        id="unknown-channel",
    ),
    pytest.param(
        routes(ROUTE, "    enabled: yes\n"),
        "outbound/routes.yaml:6:14: enabled must be true or false",
        id="bad-flag",
    ),
    pytest.param(
        routes("  - id: R1\n    on: referral.created\n    send: packet\n"),
        "outbound/routes.yaml:3:9: a route id is lower-case letters",
        id="bad-route-id",
    ),
    pytest.param(
        routes("  - id: r1\n    send: packet\n"),
        "outbound/routes.yaml:3:5: a route needs on",
        id="missing-on",
    ),
    pytest.param(
        routes(ROUTE, "    when: {recipient: [heartwell, nobody]}\n"),
        "outbound/routes.yaml:6:35: no specialist 'nobody' in the directory",
        id="unknown-recipient",
    ),
    pytest.param(
        {"outbound/routes.yaml": "schema: referral-routes/v2\nroutes: []\n"},
        "outbound/routes.yaml:1:9: expected `schema: referral-routes/v1` or `schema: "
        "referral-writeback/v1` at the top",
        id="wrong-schema",
    ),
    pytest.param(
        {"outbound/routes.yaml": "routes: []\n"},
        "outbound/routes.yaml:1:1: expected `schema: referral-routes/v1`",
        id="no-schema",
    ),
    pytest.param(
        {"outbound/routes.yaml": SCHEMA + "  - id: r1\n    on: [referral.created\n"},
        "outbound/routes.yaml:5:1: YAML syntax:",
        id="yaml-syntax",
    ),
    pytest.param(
        {
            "outbound/writeback.yaml": WRITEBACK + "    status_format: hl7v2.orm_status\n"
            "    note_format: hl7v2.oru_nte\n"
        },
        "outbound/writeback.yaml:6:18: unknown format 'hl7v2.oru_nte' (did you mean "
        "'hl7v2.oru_note'?)",
        id="writeback-unknown-format",
    ),
    pytest.param(
        {
            "outbound/writeback.yaml": WRITEBACK.replace("channel: ehr", "channel: emr")
            + "    status_format: hl7v2.orm_status\n"
        },
        "outbound/writeback.yaml:4:14: unknown channel 'emr' (did you mean 'ehr'?)",
        id="writeback-unknown-channel",
    ),
    pytest.param(
        {"outbound/writeback.yaml": WRITEBACK},
        "outbound/writeback.yaml:4:5: a write-back needs status_format",
        id="writeback-missing-format",
    ),
    pytest.param(
        {
            "outbound/writeback.yaml": WRITEBACK + "    status_format: fhir.status_update\n"
            "    events: [referral.closed, referral.clsoed]\n"
        },
        "outbound/writeback.yaml:6:31: unknown event 'referral.clsoed'",
        id="writeback-unknown-event",
    ),
    pytest.param(
        {
            "outbound/writeback.yaml": WRITEBACK + "    status_format: fhir.status_update\n"
            "    receiver: {application: EPIC, faciltiy: MAIN}\n"
        },
        "outbound/writeback.yaml:6:35: unknown key 'faciltiy' (did you mean 'facility'?)",
        id="writeback-receiver-key",
    ),
    pytest.param(
        {
            "outbound/a.yaml": WRITEBACK + "    status_format: fhir.status_update\n",
            "outbound/b.yaml": WRITEBACK + "    status_format: fhir.status_update\n",
        },
        "outbound/b.yaml:3:3: source 'epic' already has a write-back at outbound/a.yaml:3:3",
        id="writeback-duplicate-source",
    ),
    pytest.param(
        {
            "outbound/routes.yaml": SCHEMA + ROUTE,
            "directory/x.csv": "id,name,channel,format\nh,H (FAKE),specialist\n",
        },
        "directory/x.csv:2:4: expected 4 columns (as the header), found 3",
        id="csv-bad-row",
    ),
    pytest.param(
        {"directory/x.yaml": DIRECTORY.replace("    name:", '    npi: "1234567894"\n    name:')},
        "directory/x.yaml:4:10: an NPI is 10 digits",
        id="directory-wrong-npi",
    ),
]


@pytest.mark.parametrize(("files", "expected"), BAD)
def test_bad_files_are_refused_at_their_place(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    files = {"directory/specialists.yaml": DIRECTORY, **files}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(OutboundError) as caught:
        load_outbound(tmp_path, known_formats=FORMATS, known_channels=CHANNELS)
    errors = [e.replace(f"{tmp_path}/", "") for e in caught.value.errors]
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]


def test_unknown_names_are_checked_only_when_known(tmp_path: Path) -> None:
    (tmp_path / "outbound").mkdir()
    (tmp_path / "outbound" / "routes.yaml").write_text(
        SCHEMA + ROUTE + "    channel: anything\n    format: whatever\n", encoding="utf-8"
    )
    loaded = load_outbound(tmp_path)
    assert loaded.channels() == {"anything"}
    assert loaded.formats() == {"whatever"}


def test_disabled_entries_do_not_need_their_channel(tmp_path: Path) -> None:
    (tmp_path / "outbound").mkdir()
    (tmp_path / "outbound" / "routes.yaml").write_text(
        SCHEMA + ROUTE + "    channel: later\n    enabled: false\n", encoding="utf-8"
    )
    (tmp_path / "outbound" / "writeback.yaml").write_text(
        WRITEBACK.replace("ehr", "later") + "    status_format: fhir.status_update\n"
        "    enabled: false\n",
        encoding="utf-8",
    )
    loaded = load_outbound(tmp_path, known_formats=FORMATS, known_channels=())
    assert loaded.channels() == frozenset()
    # A disabled route's format is still checked: formats do not depend on engine.toml.
    (tmp_path / "outbound" / "routes.yaml").write_text(
        SCHEMA + ROUTE + "    format: nope\n    enabled: false\n", encoding="utf-8"
    )
    with pytest.raises(OutboundError) as caught:
        load_outbound(tmp_path, known_formats=FORMATS, known_channels=())
    assert [e.replace(f"{tmp_path}/", "").split(": ")[0] for e in caught.value.errors] == [
        "outbound/routes.yaml:6:13"
    ]


def test_every_error_of_every_file_is_reported(tmp_path: Path) -> None:
    files = {
        "outbound/routes.yaml": SCHEMA
        + "  - id: r1\n    on: referral.craeted\n    send: packet\n"
        + "  - id: r2\n    on: referral.created\n    send: pakcet\n"
        + "  - id: r3\n    on: referral.created\n    send: packet\n    channel: nope\n",
        "outbound/writeback.yaml": WRITEBACK + "    status_format: nope\n",
        "directory/specialists.yaml": DIRECTORY.replace("specialist,", "nowhere,"),
        "directory/more.csv": "id,name,npi,channel,format\nx,X (FAKE),1,fax,document.pdf\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(OutboundError) as caught:
        load_outbound(tmp_path, known_formats=FORMATS, known_channels=CHANNELS)
    assert [e.replace(f"{tmp_path}/", "").split(": ")[0] for e in caught.value.errors] == [
        "outbound/routes.yaml:4:9",
        "outbound/routes.yaml:8:11",
        "outbound/routes.yaml:12:14",
        "outbound/writeback.yaml:5:20",
        "directory/more.csv:2:3",
        "directory/specialists.yaml:5:25",
    ]
    assert str(caught.value).count("\n") == 5
