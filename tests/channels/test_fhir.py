"""The fhir channel against a real FHIR R4 server (SEKMET) and, for the answers SEKMET
cannot be made to give (5xx, 429, odd bundles), pytest-httpserver on a real socket."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from channels import registry
from channels.base import (
    FHIR_JSON,
    HL7V2,
    Channel,
    ChannelConfigError,
    ChannelContext,
    PermanentError,
    Receipt,
    RetryableError,
)
from channels.fhir import (
    FhirRequest,
    issues_summary,
    outcome,
    parse_payload,
    plan,
    relative_reference,
)
from tests.channels.contract import SECRET_MARKER, ChannelContract, Received, envelope
from tests.helpers import free_port, wait_for
from tests.peers.sekmet import Sekmet, SekmetHandle

MARKER_SYSTEM = "urn:refloop:test"
NOW = 1_800_000_000.0  # the injected clock of the httpserver tests


def canonical(resource: Any) -> bytes:
    return json.dumps(resource, sort_keys=True, separators=(",", ":")).encode()


def as_sent(stored: dict[str, Any]) -> bytes:
    """What SEKMET stored, without what it adds (id, meta), in the payload's form."""
    return canonical({k: v for k, v in stored.items() if k not in ("id", "meta")})


def task(marker: str, description: str = "Referral to cardiology", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "description": description,
        "identifier": [{"system": MARKER_SYSTEM, "value": marker}],
        **extra,
    }


def fhir_envelope(resource: Any, **kw: Any) -> Any:
    return envelope(canonical(resource), FHIR_JSON, **kw)


@pytest.fixture(scope="module")
def sekmet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SekmetHandle]:
    # One server per module (about a second to start); tests keep apart by identifier.
    with Sekmet.start(tmp_path_factory.mktemp("sekmet")) as handle:
        yield handle


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def make_channel(tmp_path: Path) -> AsyncIterator[Callable[..., Channel]]:
    built: list[Channel] = []

    def make(base_url: str, *, clock: Callable[[], float] | None = None, **keys: Any) -> Channel:
        context = ChannelContext(base_dir=tmp_path, clock=clock or (lambda: NOW))
        channel = registry.build(
            "fhir-test", {"type": "fhir", "base_url": base_url, **keys}, context
        )
        built.append(channel)
        return channel

    yield make
    for channel in built:
        await channel.aclose()


# --- the contract ---------------------------------------------------------------------


class TestFhirContract(ChannelContract):
    type_name = "fhir"

    @pytest.fixture
    def contract_payload(self, marker: str) -> tuple[bytes, str]:
        # Canonical JSON (sorted keys, compact), so the stored copy compares byte for byte.
        return canonical(task(marker)), FHIR_JSON

    @pytest.fixture
    def contract_channel(
        self, sekmet: SekmetHandle, make_channel: Callable[..., Channel]
    ) -> Channel:
        return make_channel(sekmet.base_url)

    @pytest.fixture
    def contract_down_channel(self, make_channel: Callable[..., Channel]) -> Channel:
        return make_channel(f"http://127.0.0.1:{free_port()}/fhir", timeout_seconds=5)

    @pytest.fixture
    def contract_received(self, sekmet: SekmetHandle, marker: str) -> Received:
        async def received(n: int) -> list[bytes]:
            found = await wait_for(
                lambda: (
                    r
                    if len(r := sekmet.search("Task", {"identifier": f"{MARKER_SYSTEM}|{marker}"}))
                    >= n
                    else None
                )
            )
            return [as_sent(r) for r in found]

        return received


# --- what the payload becomes on the wire (pure) --------------------------------------


TASK: dict[str, Any] = {"resourceType": "Task"}
BUNDLE_TX: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction", "entry": []}


@pytest.mark.parametrize(
    ("resource", "metadata", "expected"),
    [
        (BUNDLE_TX, {}, FhirRequest("POST", "", bundle_type="transaction")),
        (
            BUNDLE_TX,
            {"fhir_method": "POST", "fhir_url": ""},
            FhirRequest("POST", "", bundle_type="transaction"),
        ),
        ({**BUNDLE_TX, "type": "batch"}, {}, FhirRequest("POST", "", bundle_type="batch")),
        ({**BUNDLE_TX, "type": "document"}, {}, FhirRequest("POST", "Bundle")),
        ({"resourceType": "Task"}, {}, FhirRequest("POST", "Task")),
        ({"resourceType": "Task", "id": "t1"}, {}, FhirRequest("PUT", "Task/t1")),
        (
            {"resourceType": "Task", "id": "t1"},
            {"if_match": "3"},
            FhirRequest("PUT", "Task/t1", if_match='W/"3"'),
        ),
        (
            {"resourceType": "Task"},
            {"fhir_url": "Task/abc", "if_match": 'W/"7"'},
            FhirRequest("PUT", "Task/abc", if_match='W/"7"'),
        ),
        (
            {"resourceType": "ServiceRequest"},
            {"fhir_url": "/ServiceRequest", "if_none_exist": "identifier=urn:p|R1"},
            FhirRequest("POST", "ServiceRequest", if_none_exist="identifier=urn:p|R1"),
        ),
        (
            {"resourceType": "ServiceRequest"},
            {"if_none_exist": "ServiceRequest?identifier=urn:p|R1"},
            FhirRequest("POST", "ServiceRequest", if_none_exist="identifier=urn:p|R1"),
        ),
        (
            {"resourceType": "Task", "id": "t1"},
            {"fhir_method": "put", "fhir_url": "Task?identifier=urn:p|R1"},
            FhirRequest("PUT", "Task?identifier=urn:p|R1"),
        ),
        (
            {"resourceType": "Task", "id": "t1"},
            {"fhir_method": "POST"},
            FhirRequest("POST", "Task"),
        ),
    ],
)
def test_plan_picks_method_url_and_conditional_headers(
    resource: dict[str, Any], metadata: dict[str, str], expected: FhirRequest
) -> None:
    assert plan(resource, metadata) == expected


@pytest.mark.parametrize(
    ("resource", "metadata", "why"),
    [
        ({"resourceType": "Task"}, {"fhir_method": "DELETE"}, "fhir_method"),
        ({"resourceType": "Task"}, {"fhir_url": "https://elsewhere.example/Task"}, "relative"),
        ({"resourceType": "Task"}, {"fhir_url": "../admin/Task"}, "under"),
        ({"resourceType": "Task"}, {"if_match": "1"}, "if_match"),
        ({"resourceType": "Task", "id": "t1"}, {"if_none_exist": "identifier=x"}, "if_none_exist"),
        ({"resourceType": "Task"}, {"fhir_method": "PUT"}, "id"),
        ({"resourceType": "Task", "id": "t1"}, {"if_match": "1\r\nX-Evil: 1"}, "control"),
    ],
)
def test_plan_refuses_what_cannot_be_sent(
    resource: dict[str, Any], metadata: dict[str, str], why: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        plan(resource, metadata)
    assert why in caught.value.reason


@pytest.mark.parametrize(
    "payload", [b"{not json", b"[1, 2]", b'{"id": "x"}', b'{"resourceType": "task"}', b"\xff"]
)
def test_a_payload_that_is_not_a_fhir_resource_is_permanent(payload: bytes) -> None:
    with pytest.raises(PermanentError):
        parse_payload(payload)


def test_issue_summary_names_codes_and_paths_never_diagnostics() -> None:
    outcome_ = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "warning", "code": "informational", "diagnostics": "ignored"},
            {
                "severity": "error",
                "code": "required",
                "diagnostics": f"status missing for {SECRET_MARKER}",
                "expression": ["Task.status"],
            },
            {
                "severity": "error",
                "code": "value",
                "details": {"text": SECRET_MARKER},
                "expression": [f"Patient.name.where(family='{SECRET_MARKER}')", "Patient.name[0]"],
                "location": ["/f:Patient/f:name"],
            },
        ],
    }
    summary = issues_summary(outcome_)
    assert summary == "required at Task.status; value at Patient.name[0], /f:Patient/f:name"
    assert SECRET_MARKER not in summary
    assert issues_summary({"resourceType": "Task"}) == ""


@pytest.mark.parametrize(
    ("location", "reference"),
    [
        ("http://h/fhir/Task/a1/_history/2", "Task/a1/_history/2"),
        ("https://other.example/r4/Task/a1/_history/2", "Task/a1/_history/2"),
        ("Task/a1", "Task/a1"),
        ("http://h/fhir/queue?job=1", ""),
    ],
)
def test_location_becomes_a_relative_reference(location: str, reference: str) -> None:
    assert relative_reference(location) == reference


def test_an_update_without_location_is_referenced_by_url_and_etag() -> None:
    receipt = outcome(200, {"ETag": 'W/"4"'}, b"", FhirRequest("PUT", "Task/t1"), now=NOW)
    assert receipt == Receipt(peer_reference="Task/t1/_history/4", detail="HTTP 200")


# --- against SEKMET -------------------------------------------------------------------


async def test_a_create_returns_the_location_as_peer_reference(
    sekmet: SekmetHandle, make_channel: Callable[..., Channel], marker: str
) -> None:
    receipt = await make_channel(sekmet.base_url).send(fhir_envelope(task(marker)))
    assert receipt.detail == "HTTP 201"
    [stored] = sekmet.search("Task", {"identifier": f"{MARKER_SYSTEM}|{marker}"})
    assert receipt.peer_reference == f"Task/{stored['id']}/_history/1"


async def test_a_transaction_with_a_urn_uuid_reference_is_one_receipt_with_locations(
    sekmet: SekmetHandle, make_channel: Callable[..., Channel], marker: str
) -> None:
    sr_urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": sr_urn,
                "resource": {
                    "resourceType": "ServiceRequest",
                    "status": "active",
                    "intent": "order",
                    "subject": {"display": "test patient"},
                    "identifier": [{"system": MARKER_SYSTEM, "value": marker}],
                },
                "request": {"method": "POST", "url": "ServiceRequest"},
            },
            {
                "resource": task(marker, focus={"reference": sr_urn}),
                "request": {"method": "POST", "url": "Task"},
            },
        ],
    }
    receipt = await make_channel(sekmet.base_url).send(fhir_envelope(bundle))

    assert receipt.detail == "HTTP 200 transaction-response, 2 entries"
    sr_ref, task_ref = receipt.peer_reference.split(" ")
    assert sr_ref.startswith("ServiceRequest/")
    assert task_ref.startswith("Task/")
    stored_task = sekmet.read(task_ref)
    # The server resolved the urn:uuid to the ServiceRequest it created in the same call.
    assert stored_task["focus"]["reference"] == sr_ref.split("/_history")[0]


async def test_conditional_create_twice_leaves_one_resource(
    sekmet: SekmetHandle, make_channel: Callable[..., Channel], marker: str
) -> None:
    channel = make_channel(sekmet.base_url)
    meta = {"if_none_exist": f"identifier={MARKER_SYSTEM}|{marker}"}
    first = await channel.send(fhir_envelope(task(marker), metadata=meta, key="k-1"))
    second = await channel.send(fhir_envelope(task(marker), metadata=meta, key="k-1", attempt=2))

    assert first.detail == "HTTP 201"
    assert second.detail == "HTTP 200"  # found, not created again
    assert second.peer_reference == first.peer_reference
    assert len(sekmet.search("Task", {"identifier": f"{MARKER_SYSTEM}|{marker}"})) == 1


async def test_conditional_create_matching_several_is_permanent(
    sekmet: SekmetHandle, make_channel: Callable[..., Channel], marker: str
) -> None:
    channel = make_channel(sekmet.base_url)
    await channel.send(fhir_envelope(task(marker)))
    await channel.send(fhir_envelope(task(marker)))
    meta = {"if_none_exist": f"identifier={MARKER_SYSTEM}|{marker}"}
    with pytest.raises(PermanentError) as caught:
        await channel.send(fhir_envelope(task(marker), metadata=meta))
    assert caught.value.reason.startswith("HTTP 412")
    assert "multiple-matches" in caught.value.reason


async def test_an_update_with_a_stale_if_match_is_retryable(
    sekmet: SekmetHandle, make_channel: Callable[..., Channel], marker: str
) -> None:
    channel = make_channel(sekmet.base_url)
    rid = f"t-{marker[:12]}"
    created = await channel.send(fhir_envelope(task(marker, id=rid)))  # PUT creates with our id
    assert created.peer_reference == f"Task/{rid}/_history/1"

    accepted = task(marker, id=rid, status="accepted")
    updated = await channel.send(fhir_envelope(accepted, metadata={"if_match": 'W/"1"'}))
    assert updated.peer_reference == f"Task/{rid}/_history/2"

    completed = task(marker, id=rid, status="completed")
    with pytest.raises(RetryableError) as caught:
        await channel.send(fhir_envelope(completed, metadata={"if_match": 'W/"1"'}))
    assert caught.value.reason.startswith("HTTP 412")
    assert sekmet.read(f"Task/{rid}")["status"] == "accepted"  # the stale write did nothing


async def test_an_invalid_resource_is_permanent_naming_codes_and_paths_only(
    sekmet: SekmetHandle, make_channel: Callable[..., Channel], marker: str
) -> None:
    invalid = task(marker, description=f"Referral for {SECRET_MARKER}")
    del invalid["status"]
    with pytest.raises(PermanentError) as caught:
        await make_channel(sekmet.base_url).send(fhir_envelope(invalid))
    assert caught.value.reason == "HTTP 400 OperationOutcome: structure at Task.status"
    assert sekmet.search("Task", {"identifier": f"{MARKER_SYSTEM}|{marker}"}) == []


async def test_a_batch_with_a_refused_entry_names_the_entry(
    sekmet: SekmetHandle, make_channel: Callable[..., Channel], marker: str
) -> None:
    invalid = task(marker, description=SECRET_MARKER)
    del invalid["intent"]
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": task(marker), "request": {"method": "POST", "url": "Task"}},
            {"resource": invalid, "request": {"method": "POST", "url": "Task"}},
        ],
    }
    with pytest.raises(PermanentError) as caught:
        await make_channel(sekmet.base_url).send(fhir_envelope(bundle))
    assert caught.value.reason == "batch failed: entry 1 HTTP 400 (structure at Task.intent)"


async def test_an_unknown_resource_type_is_permanent(
    sekmet: SekmetHandle, make_channel: Callable[..., Channel], marker: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        await make_channel(sekmet.base_url).send(
            fhir_envelope(task(marker), metadata={"fhir_url": "NoSuchType"})
        )
    assert caught.value.reason.startswith("HTTP 404")


async def test_bearer_auth_reaches_a_protected_server(
    tmp_path: Path, make_channel: Callable[..., Channel], marker: str
) -> None:
    (tmp_path / "fhir.token").write_text("s3cret-token\n")
    (tmp_path / "wrong.token").write_text("not-it\n")
    with Sekmet.start(tmp_path, bearer_tokens=["s3cret-token"]) as protected:
        good = make_channel(protected.base_url, auth="bearer", token={"file": "fhir.token"})
        wrong = make_channel(protected.base_url, auth="bearer", token={"file": "wrong.token"})
        anonymous = make_channel(protected.base_url)

        receipt = await good.send(fhir_envelope(task(marker)))
        assert receipt.detail == "HTTP 201"
        for channel in (wrong, anonymous):
            with pytest.raises(PermanentError) as caught:
                await channel.send(fhir_envelope(task(marker)))
            assert caught.value.reason.startswith("HTTP 401")
        assert len(protected.search("Task", {"identifier": f"{MARKER_SYSTEM}|{marker}"})) == 1


async def test_a_missing_bearer_secret_is_permanent_before_sending(
    httpserver: HTTPServer, make_channel: Callable[..., Channel]
) -> None:
    channel = make_channel(httpserver.url_for("/fhir"), auth="bearer", token={"file": "absent"})
    with pytest.raises(PermanentError) as caught:
        await channel.send(fhir_envelope({"resourceType": "Task"}))
    assert "secret" in caught.value.reason
    assert httpserver.log == []


# --- answers SEKMET cannot be made to give: pytest-httpserver -------------------------


async def test_the_request_carries_fhir_headers_and_the_idempotency_key(
    httpserver: HTTPServer, make_channel: Callable[..., Channel]
) -> None:
    payload = canonical({"resourceType": "Task", "id": "t1", "status": "requested"})
    httpserver.expect_oneshot_request(
        "/fhir/Task/t1",
        method="PUT",
        data=payload,
        headers={
            "Content-Type": "application/fhir+json",
            "Accept": "application/fhir+json",
            "Prefer": "return=minimal",
            "X-Request-Id": "key-42",
            "Idempotency-Key": "key-42",
            "If-Match": 'W/"2"',
        },
    ).respond_with_data(
        "", status=200, headers={"Location": httpserver.url_for("/fhir/Task/t1/_history/3")}
    )
    channel = make_channel(httpserver.url_for("/fhir"))
    receipt = await channel.send(
        envelope(payload, FHIR_JSON, key="key-42", metadata={"if_match": "2"})
    )
    httpserver.check_assertions()
    assert receipt == Receipt(peer_reference="Task/t1/_history/3", detail="HTTP 200")


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (503, "7", 7.0),
        (429, format_datetime(datetime.fromtimestamp(NOW + 120, UTC), usegmt=True), 120.0),
        (500, None, None),
        (502, None, None),
        (409, None, None),
    ],
)
async def test_server_trouble_is_retryable_with_its_retry_after(
    httpserver: HTTPServer,
    make_channel: Callable[..., Channel],
    status: int,
    retry_after: str | None,
    expected: float | None,
) -> None:
    headers = {"Retry-After": retry_after} if retry_after else {}
    httpserver.expect_request("/fhir/Task", method="POST").respond_with_data(
        f"busy {SECRET_MARKER}", status=status, headers=headers
    )
    with pytest.raises(RetryableError) as caught:
        await make_channel(httpserver.url_for("/fhir")).send(
            fhir_envelope({"resourceType": "Task"})
        )
    assert caught.value.reason.startswith(f"HTTP {status}")
    assert caught.value.retry_after == expected
    assert SECRET_MARKER not in str(caught.value)


@pytest.mark.parametrize("status", [401, 403, 404, 405, 410, 302])
async def test_refusals_are_permanent(
    httpserver: HTTPServer, make_channel: Callable[..., Channel], status: int
) -> None:
    httpserver.expect_request("/fhir/Task", method="POST").respond_with_data(
        "", status=status, headers={"Location": "http://elsewhere.example/"}
    )
    with pytest.raises(PermanentError) as caught:
        await make_channel(httpserver.url_for("/fhir")).send(
            fhir_envelope({"resourceType": "Task"})
        )
    assert caught.value.reason.startswith(f"HTTP {status}")


async def test_an_operation_outcome_that_echoes_the_payload_is_not_quoted(
    httpserver: HTTPServer, make_channel: Callable[..., Channel]
) -> None:
    echo = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "business-rule",
                "diagnostics": f"Patient {SECRET_MARKER} is not known here",
                "expression": ["Task.for"],
            }
        ],
    }
    httpserver.expect_request("/fhir/Task", method="POST").respond_with_json(echo, status=422)
    with pytest.raises(PermanentError) as caught:
        await make_channel(httpserver.url_for("/fhir")).send(
            fhir_envelope({"resourceType": "Task"})
        )
    assert caught.value.reason == "HTTP 422 OperationOutcome: business-rule at Task.for"


@pytest.mark.parametrize(
    ("statuses", "error", "reason"),
    [
        (["201 Created", "404 Not Found"], PermanentError, "transaction failed: entry 1 HTTP 404"),
        (["201 Created", "503"], RetryableError, "transaction failed: entry 1 HTTP 503"),
    ],
)
async def test_a_bundle_response_with_a_failed_entry_is_not_a_receipt(
    httpserver: HTTPServer,
    make_channel: Callable[..., Channel],
    statuses: list[str],
    error: type[Exception],
    reason: str,
) -> None:
    response = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"response": {"status": s, "location": "Task/x/_history/1"}} for s in statuses],
    }
    httpserver.expect_request("/fhir", method="POST").respond_with_json(response)
    with pytest.raises(error) as caught:
        await make_channel(httpserver.url_for("/fhir")).send(fhir_envelope(BUNDLE_TX))
    assert str(caught.value) == reason


async def test_accepted_for_later_is_an_unconfirmed_receipt(
    httpserver: HTTPServer, make_channel: Callable[..., Channel]
) -> None:
    httpserver.expect_request("/fhir/Task", method="POST").respond_with_data("", status=202)
    receipt = await make_channel(httpserver.url_for("/fhir")).send(
        fhir_envelope({"resourceType": "Task"})
    )
    assert receipt.confirmed is False


async def test_the_endpoint_of_the_envelope_overrides_the_base(
    httpserver: HTTPServer, make_channel: Callable[..., Channel]
) -> None:
    httpserver.expect_oneshot_request("/specialist/r4/Task", method="POST").respond_with_data(
        "", status=201, headers={"Location": "Task/s1/_history/1"}
    )
    channel = make_channel(f"http://127.0.0.1:{free_port()}/fhir")
    receipt = await channel.send(
        fhir_envelope({"resourceType": "Task"}, endpoint=httpserver.url_for("/specialist/r4/"))
    )
    assert receipt.peer_reference == "Task/s1/_history/1"


async def test_what_is_not_fhir_json_never_leaves(
    httpserver: HTTPServer, make_channel: Callable[..., Channel]
) -> None:
    channel = make_channel(httpserver.url_for("/fhir"))
    with pytest.raises(PermanentError):
        await channel.send(envelope(b'{"resourceType": "Task"', FHIR_JSON))
    with pytest.raises(PermanentError) as caught:
        await channel.send(envelope(b"MSH|^~\\&|Referral", HL7V2))
    assert "content type" in caught.value.reason
    assert httpserver.log == []


async def test_a_peer_that_never_answers_times_out_retryable(
    make_channel: Callable[..., Channel],
) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        channel = make_channel(f"http://127.0.0.1:{port}/fhir", timeout_seconds=0.3)
        with pytest.raises(RetryableError) as caught:
            await channel.send(fhir_envelope({"resourceType": "Task"}))
    assert "timeout" in caught.value.reason


# --- settings -------------------------------------------------------------------------


_SMART = {"token_url": "https://auth.example.org/token", "client_id": "c", "private_key": {}}


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"auth": "bearer"}, 'token: Value error, required when auth = "bearer" (token = {env'),
        ({"auth": "smart"}, 'smart: Value error, required when auth = "smart" ([channels.<name>'),
        ({"token": {"env": "X"}}, 'token: Value error, only used with auth = "bearer"'),
        ({"auth": "smart", "token": {"env": "X"}}, "token: Value error, only used with auth"),
        ({"smart": _SMART}, 'smart: Value error, only used with auth = "smart"'),
        ({"base_url": "http://ehr.example.org/fhir"}, "base_url"),
        ({"base_url": "ftp://127.0.0.1/fhir"}, "base_url"),
        ({"ca_file": "ca.pem", "verify": False}, "verify"),
        ({"auth": "smart", "smart": {**_SMART, "token_url": "http://auth.example.org/t"}}, "smart"),
    ],
)
def test_settings_problems_name_the_key(table: dict[str, Any], problem: str) -> None:
    raw = {"type": "fhir", "base_url": "http://127.0.0.1:1/fhir", **table}
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate(raw)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


async def test_an_unusable_ca_file_is_a_config_error_when_the_channel_is_built(
    make_channel: Callable[..., Channel], tmp_path: Path
) -> None:
    with pytest.raises(ChannelConfigError) as caught:
        make_channel("https://127.0.0.1:1/fhir", ca_file="missing.pem")
    assert caught.value.problems == [
        f"ca_file: {tmp_path / 'missing.pem'} unusable (FileNotFoundError)"
    ]


def test_settings_accept_https_and_plain_http_when_allowed() -> None:
    ok = registry.validate({"type": "fhir", "base_url": "https://ehr.example.org/fhir/"})
    assert ok.base_url == "https://ehr.example.org/fhir"
    plain = registry.validate(
        {"type": "fhir", "base_url": "http://ehr.example.org/fhir", "allow_plain_http": True}
    )
    assert plain.base_url == "http://ehr.example.org/fhir"
