"""Reading FHIR subscription notifications, gap detection and Subscription resources (pure).

The notification samples are the real ones in the shared corpus (Inferno's R4 Backport
fixtures, the pre-standard Argonaut draft with an R5-style SubscriptionStatus, a
``$status`` answer); the R4 rest-hook shapes are the ones SEKMET sends (PEERS.md §1).
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.subscription import Subscription
from hypothesis import given
from hypothesis import strategies as st

from engine.protocol.fhir_notify import (
    EXT_CONTENT,
    EXT_FILTER,
    EXT_HEARTBEAT,
    MAX_LISTED_GAP,
    SUBSCRIPTION_PROFILE,
    TAG_SYSTEM,
    Notification,
    NotificationError,
    NotificationEvent,
    Reference,
    classify,
    instant,
    missing_events,
    next_last_seen,
    next_link,
    parse_reference,
    ping,
    reconcile_request,
    search_matches,
    search_of,
    status_results,
    subscription_resource,
    subscription_status,
)

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "fhir" / "Bundle"
ENCOUNTER = Reference("Encounter", "86009987-eabe-42bf-8c02-b112b18cb616")
DRAFT_ENCOUNTER = Reference("Encounter", "551683b3-1477-41d1-b58e-32fe8b0047b0")


def sample(name: str) -> Any:
    return json.loads((CORPUS / name).read_text(encoding="utf-8"))


def notification_samples() -> list[str]:
    names = sorted(
        p.name
        for p in CORPUS.iterdir()
        if any(k in p.name for k in ("notification", "handshake", "heartbeat"))
    )
    assert len(names) == 7, names  # the corpus changed: add its rows to CORPUS_CASES
    return names


# file -> style, type, payload, subscription id, status, events since start,
#         event numbers, focus, carried resources, read-backs, needs a search
CORPUS_CASES: dict[str, tuple[Any, ...]] = {
    "argonaut-backport-draft__Bundle-notification-full-resource.json": (
        "backport-draft", "event-notification", "full-resource", "admission", "active", 2,
        (2,), (DRAFT_ENCOUNTER,), 1, (), False,
    ),
    "argonaut-backport-draft__Bundle-notification-handshake.json": (
        "backport-draft", "handshake", "empty", "admission", "active", 0, (), (), 0, (), False,
    ),
    "inferno-subscriptions__empty_notification_bundle_example.json": (
        "backport", "event-notification", "empty", "123", "active", 1, (1,), (None,), 0, (),
        True,
    ),
    "inferno-subscriptions__full_resource_notification_bundle_example.json": (
        "backport", "event-notification", "full-resource", "123", "active", 1, (1,),
        (ENCOUNTER,), 1, (), False,
    ),
    "inferno-subscriptions__handshake_bundle_example.json": (
        "backport", "handshake", "empty", "123", "requested", 0, (), (), 0, (), False,
    ),
    "inferno-subscriptions__heartbeat_bundle_example.json": (
        "backport", "heartbeat", "empty", "123", "active", 2, (), (), 0, (), False,
    ),
    "inferno-subscriptions__id_only_notification_bundle_example.json": (
        "backport", "event-notification", "id-only", "123", "active", 1, (1,), (ENCOUNTER,),
        0, (ENCOUNTER,), False,
    ),
}  # fmt: skip


def test_every_notification_sample_in_the_corpus_has_a_case() -> None:
    assert notification_samples() == sorted(CORPUS_CASES)


@pytest.mark.parametrize("name", sorted(CORPUS_CASES))
def test_corpus_notifications(name: str) -> None:
    (style, ntype, payload, sub_id, status, since, numbers, focus, carried, reads, search) = (
        CORPUS_CASES[name]
    )
    note = classify(sample(name))
    assert note.style == style
    assert note.type == ntype
    assert note.payload == payload
    assert note.subscription == Reference("Subscription", sub_id)
    assert note.status == status
    assert note.events_since_start == since
    assert tuple(e.number for e in note.events) == numbers
    assert tuple(e.focus for e in note.events) == focus
    assert len(note.resources) == carried
    assert note.read_backs == reads
    assert note.needs_search is search
    assert note.topic
    assert note.topic.startswith("http")


def test_a_full_resource_event_carries_the_focus_resource_itself() -> None:
    bundle = sample("inferno-subscriptions__full_resource_notification_bundle_example.json")
    note = classify(bundle)
    assert note.events[0].resource is bundle["entry"][1]["resource"]
    assert note.resources == (bundle["entry"][1]["resource"],)
    draft = classify(sample("argonaut-backport-draft__Bundle-notification-full-resource.json"))
    assert draft.events[0].resource is not None
    assert draft.events[0].resource["resourceType"] == "Encounter"


def test_the_focus_matches_an_entry_by_type_and_id_when_full_urls_differ() -> None:
    bundle = sample("inferno-subscriptions__full_resource_notification_bundle_example.json")
    bundle["entry"][1]["fullUrl"] = "urn:uuid:0f0e2f3e-1111-4222-8333-944455556666"
    note = classify(bundle)
    assert note.payload == "full-resource"
    assert note.events[0].resource is bundle["entry"][1]["resource"]


def test_the_status_answer_in_the_corpus() -> None:
    (report,) = status_results(sample("inferno-subscriptions__subscription_status_example.json"))
    assert report.type == "query-status"  # a report, not a delivery
    assert report.status == "active"
    assert report.events_since_start == 2
    assert report.subscription == Reference("Subscription", "123")
    assert report.events == ()


def test_a_status_answer_as_sekmet_gives_it() -> None:
    answer = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}},
            {
                "resource": {
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "subscription", "valueReference": {"reference": "Subscription/s"}},
                        {"name": "status", "valueCode": "error"},
                        {"name": "type", "valueCode": "query-status"},
                        {"name": "events-since-subscription-start", "valueString": "7"},
                    ],
                }
            },
        ],
    }
    (report,) = status_results(answer)
    assert (report.status, report.events_since_start) == ("error", 7)
    with pytest.raises(NotificationError):
        status_results({"resourceType": "Parameters"})


# -- the R4 core rest-hook shapes ---------------------------------------------------------

TASK = {"resourceType": "Task", "id": "t1", "meta": {"versionId": "2"}, "status": "completed"}


def test_an_update_style_rest_hook_carries_the_resource() -> None:
    note = classify(TASK, path_type="Task", path_id="t1")
    assert (note.style, note.type, note.payload) == (
        "rest-hook",
        "event-notification",
        "full-resource",
    )
    assert note.resources == (TASK,)
    assert note.events == (NotificationEvent(None, None, Reference("Task", "t1"), TASK),)
    assert note.read_backs == ()
    assert not note.needs_search


def test_an_update_style_rest_hook_without_a_body_is_read_back() -> None:
    note = classify(None, path_type="Task", path_id="t1")
    assert note.payload == "id-only"
    assert note.read_backs == (Reference("Task", "t1"),)
    assert note.resources == ()


def test_a_post_of_a_resource_and_an_empty_ping() -> None:
    posted = classify(TASK)
    assert posted.payload == "full-resource"
    assert posted.resources == (TASK,)
    empty = classify(None)
    assert empty == ping()
    assert empty.payload == "empty"
    assert empty.needs_search  # a ping names nothing: only a search can find the change
    assert empty.read_backs == ()


@pytest.mark.parametrize(
    ("body", "path", "expression"),
    [
        (TASK, ("ServiceRequest", "t1"), "resourceType"),
        (TASK, ("Task", "other"), "Task.id"),
        ({**TASK, "id": None}, ("Task", "t1"), "Task.id"),
        (TASK, ("task", "t1"), "$this"),
        (TASK, ("Task", "bad id"), "$this"),
        ([TASK], ("Task", "t1"), "$this"),
        ([TASK], (None, None), "$this"),
        ({"status": "completed"}, (None, None), "resourceType"),
        ({"resourceType": "Parameters", "parameter": []}, (None, None), "Parameters"),
    ],
)
def test_bodies_that_are_no_notification(
    body: Any, path: tuple[str | None, str | None], expression: str
) -> None:
    with pytest.raises(NotificationError) as caught:
        classify(body, path_type=path[0], path_id=path[1])
    assert caught.value.expression == expression
    assert "completed" not in caught.value.reason  # never a value from the body


# -- Backport variants --------------------------------------------------------------------


def camel_case(bundle: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(bundle)
    names = {
        "events-since-subscription-start": "eventsSinceSubscriptionStart",
        "notification-event": "notificationEvent",
        "event-number": "eventNumber",
    }
    for param in out["entry"][0]["resource"]["parameter"]:
        param["name"] = names.get(param["name"], param["name"])
        for part in param.get("part", []):
            part["name"] = names.get(part["name"], part["name"])
    return out


def test_camel_case_parameter_names_of_early_servers_read_the_same() -> None:
    bundle = sample("inferno-subscriptions__id_only_notification_bundle_example.json")
    assert classify(camel_case(bundle)) == classify(bundle)


def test_integer_event_numbers_and_additional_context() -> None:
    bundle = sample("inferno-subscriptions__id_only_notification_bundle_example.json")
    params = bundle["entry"][0]["resource"]["parameter"]
    params[4] = {"name": "events-since-subscription-start", "valueInteger64": 12}
    params[5]["part"][0] = {"name": "event-number", "valueInteger": 12}
    params[5]["part"].append(
        {"name": "additional-context", "valueReference": {"reference": "Patient/p9"}}
    )
    note = classify(bundle)
    assert note.events_since_start == 12
    assert note.events[0].number == 12
    assert note.events[0].context == (Reference("Patient", "p9"),)


@pytest.mark.parametrize("bad", ["-1", "twelve", "1.5", True, None, ""])
def test_an_event_number_that_is_no_number_is_unknown(bad: Any) -> None:
    bundle = sample("inferno-subscriptions__id_only_notification_bundle_example.json")
    bundle["entry"][0]["resource"]["parameter"][5]["part"][0]["valueString"] = bad
    assert classify(bundle).events[0].number is None


def test_a_status_without_a_type_is_refused_naming_where() -> None:
    bundle = sample("inferno-subscriptions__heartbeat_bundle_example.json")
    params = bundle["entry"][0]["resource"]["parameter"]
    params[:] = [p for p in params if p["name"] != "type"]
    with pytest.raises(NotificationError) as caught:
        classify(bundle)
    assert caught.value.expression == "Bundle.entry[0].resource.parameter.type"
    draft = sample("argonaut-backport-draft__Bundle-notification-handshake.json")
    draft["entry"][0]["resource"]["type"] = "bogus"
    with pytest.raises(NotificationError) as caught:
        classify(draft)
    assert caught.value.expression == "Bundle.entry[0].resource.type"
    assert "bogus" not in caught.value.reason


def test_a_history_bundle_that_is_no_notification_is_a_resource() -> None:
    bundle = {"resourceType": "Bundle", "type": "history", "entry": [{"resource": TASK}]}
    note = classify(bundle)
    assert note.style == "rest-hook"
    assert note.resources == (bundle,)


def test_parameters_first_but_no_subscription_status() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [{"resource": {"resourceType": "Parameters", "parameter": [{"name": "x"}]}}],
    }
    with pytest.raises(NotificationError) as caught:
        classify(bundle)
    assert caught.value.expression == "Bundle.entry[0].resource"


# -- references ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Task/t1", Reference("Task", "t1")),
        ("https://ehr.example.org/fhir/r4/Task/t1", Reference("Task", "t1")),
        ("https://ehr.example.org/fhir/Task/t1/_history/3", Reference("Task", "t1")),
        ("Task/t1/", Reference("Task", "t1")),
        ("urn:uuid:0f0e2f3e-1111-4222-8333-944455556666", None),
        ("#contained", None),
        ("Task?status=completed", None),
        ("https://api.example.com/v1/appointments/123", None),  # a proprietary endpoint
        ("Task/bad id", None),
        (42, None),
        (None, None),
    ],
)
def test_parse_reference(value: Any, expected: Reference | None) -> None:
    assert parse_reference(value) == expected


# -- gaps ---------------------------------------------------------------------------------


def event_note(
    numbers: list[int | None], since: int | None = None, ntype: str = "event-notification"
) -> Notification:
    return Notification(
        style="backport",
        type=ntype,  # type: ignore[arg-type]
        payload="id-only",
        events_since_start=since,
        events=tuple(NotificationEvent(n, None, Reference("Task", f"t{n}"), None) for n in numbers),
    )


@pytest.mark.parametrize(
    ("last_seen", "numbers", "since", "ntype", "missing", "after"),
    [
        (None, [5], 5, "event-notification", (), 5),  # first contact sets the baseline
        (4, [5], 5, "event-notification", (), 5),
        (4, [7], 7, "event-notification", (5, 6), 7),
        (4, [6, 8], 8, "event-notification", (5, 7), 8),
        (4, [5, 6], 6, "event-notification", (), 6),
        (7, [5], 5, "event-notification", (), 7),  # a redelivery of an older event
        (7, [7], 7, "event-notification", (), 7),  # the same notification again
        (4, [], 6, "heartbeat", (5, 6), 6),  # the heartbeat says two events never came
        (6, [], 6, "heartbeat", (), 6),
        (0, [], 0, "handshake", (), 0),
        (3, [], 5, "handshake", (4, 5), 5),  # re-activated after events it never sent
        (9, [], 0, "handshake", (), 0),  # a new count: the baseline starts again
        (4, [None], None, "event-notification", (), 4),  # no number: nothing to say
        (None, [], None, "heartbeat", (), None),
    ],
)
def test_missing_events_and_what_to_remember(
    last_seen: int | None,
    numbers: list[int | None],
    since: int | None,
    ntype: str,
    missing: tuple[int, ...],
    after: int | None,
) -> None:
    note = event_note(numbers, since, ntype)
    assert missing_events(last_seen, note) == missing
    assert next_last_seen(last_seen, note) == after


def test_a_huge_gap_is_listed_only_so_far() -> None:
    note = event_note([10_000_000], 10_000_000)
    missing = missing_events(0, note)
    assert len(missing) == MAX_LISTED_GAP
    assert missing[:2] == (1, 2)


def test_the_corpus_heartbeat_after_event_one_shows_event_two_missing() -> None:
    heartbeat = classify(sample("inferno-subscriptions__heartbeat_bundle_example.json"))
    assert missing_events(1, heartbeat) == (2,)
    assert missing_events(2, heartbeat) == ()


@given(
    last_seen=st.integers(min_value=0, max_value=200),
    numbers=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
)
def test_missing_and_present_numbers_cover_the_range_without_overlap(
    last_seen: int, numbers: list[int]
) -> None:
    note = event_note(list(numbers), max(numbers) if numbers else None)
    missing = missing_events(last_seen, note)
    high = max([last_seen, *numbers])
    assert set(missing).isdisjoint(numbers)
    assert set(missing) | {n for n in numbers if n > last_seen} == set(
        range(last_seen + 1, high + 1)
    )
    assert list(missing) == sorted(missing)
    assert next_last_seen(last_seen, note) == high


# -- searches -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "criteria", "filter_", "expected"),
    [
        ("Task", "Task?status=completed", None, "Task?status=completed"),
        (
            "ServiceRequest",
            None,
            "ServiceRequest?patient=Patient/p9",
            "ServiceRequest?patient=Patient/p9",
        ),
        ("ServiceRequest", None, "patient=Patient/p9", "ServiceRequest?patient=Patient/p9"),
        ("ServiceRequest", None, "?patient=Patient/p9", "ServiceRequest?patient=Patient/p9"),
        ("Appointment", None, None, "Appointment?"),
        ("Appointment", None, "Appointment", "Appointment?"),
    ],
)
def test_search_of(resource: str, criteria: str | None, filter_: str | None, expected: str) -> None:
    assert search_of(resource, criteria, filter_) == expected


def test_the_reconciliation_request() -> None:
    since = datetime(2026, 12, 1, 9, 30, 15, 999_000, tzinfo=timezone(timedelta(hours=-5)))
    path, params = reconcile_request("Task?status=completed&_count=5&_lastUpdated=gt2020", since)
    assert path == "Task"
    assert params == [
        ("status", "completed"),
        ("_lastUpdated", "ge2026-12-01T14:30:15Z"),  # UTC, rounded down: ge loses nothing
        ("_sort", "_lastUpdated"),
    ]
    path, params = reconcile_request("Appointment?", since)
    assert (path, params[0][0]) == ("Appointment", "_lastUpdated")
    with pytest.raises(ValueError, match="resource type"):
        reconcile_request("http://elsewhere/x?y=1", since)
    with pytest.raises(ValueError, match="naive"):
        instant(datetime(2026, 1, 1))


def test_search_pages() -> None:
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [
            {"relation": "self", "url": "http://x/fhir/Task?_offset=0"},
            {"relation": "next", "url": "http://x/fhir/Task?_offset=100"},
        ],
        "entry": [
            {"resource": TASK, "search": {"mode": "match"}},
            {"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}},
            {"resource": {"resourceType": "Task", "id": "t2"}},
            {"fullUrl": "http://x/fhir/Task/t3"},
        ],
    }
    assert next_link(page) == "http://x/fhir/Task?_offset=100"
    assert [r["id"] for r in search_matches(page)] == ["t1", "t2"]
    assert next_link({**page, "link": page["link"][:1]}) is None
    assert search_matches(None) == []


# -- Subscriptions we ask for ----------------------------------------------------------------

HEADERS = ["Authorization: Bearer s3cret", "X-Refloop-Subscription: cfg-1"]
ENDPOINT = "https://refloop.example.org/fhir/r4/_notify/ehr-fhir"


def test_an_r4_criteria_subscription_with_full_resource_payload() -> None:
    sub = subscription_resource(
        key="cfg-1",
        resource="Task",
        endpoint=ENDPOINT,
        headers=HEADERS,
        criteria="Task?status=completed",
    )
    Subscription.model_validate(sub)  # a valid R4(B) Subscription
    assert sub["criteria"] == "Task?status=completed"
    assert sub["status"] == "requested"
    assert sub["channel"] == {
        "type": "rest-hook",
        "endpoint": ENDPOINT,
        "header": HEADERS,
        "payload": "application/fhir+json",
    }
    assert sub["meta"] == {"tag": [{"system": TAG_SYSTEM, "code": "cfg-1"}]}


@pytest.mark.parametrize("payload", ["empty", "id-only"])
def test_an_r4_criteria_subscription_without_full_resource_is_a_ping(payload: Any) -> None:
    sub = subscription_resource(
        key="cfg-1", resource="Task", endpoint=ENDPOINT, headers=[], payload=payload
    )
    Subscription.model_validate(sub)
    assert sub["criteria"] == "Task?"
    assert "payload" not in sub["channel"]
    assert "header" not in sub["channel"]


def test_a_backport_topic_subscription() -> None:
    topic = "http://sekmet.dev/fhir/SubscriptionTopic/servicerequest-new"
    sub = subscription_resource(
        key="cfg-2",
        resource="ServiceRequest",
        endpoint=ENDPOINT,
        headers=HEADERS,
        topic=topic,
        filter="ServiceRequest?patient=Patient/p9",
        payload="id-only",
        heartbeat_seconds=150,
    )
    Subscription.model_validate(sub)
    assert sub["criteria"] == topic
    assert sub["meta"]["profile"] == [SUBSCRIPTION_PROFILE]
    assert sub["_criteria"] == {
        "extension": [{"url": EXT_FILTER, "valueString": "ServiceRequest?patient=Patient/p9"}]
    }
    channel = sub["channel"]
    assert channel["payload"] == "application/fhir+json"
    assert channel["_payload"] == {"extension": [{"url": EXT_CONTENT, "valueCode": "id-only"}]}
    assert channel["extension"] == [{"url": EXT_HEARTBEAT, "valueUnsignedInt": 150}]
    assert subscription_status({**sub, "status": "active"}) == "active"
    assert subscription_status({"resourceType": "Task", "status": "active"}) is None


def test_instant_is_utc_seconds() -> None:
    assert instant(datetime(2026, 12, 2, 1, 2, 3, 456_789, tzinfo=UTC)) == "2026-12-02T01:02:03Z"
