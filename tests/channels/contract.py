"""The contract every channel keeps, run against each one with a real peer on loopback.

A channel's test module subclasses :class:`ChannelContract` and provides four fixtures:

* ``contract_channel`` — the channel, built from its settings, talking to a real peer
  that accepts everything;
* ``contract_received`` — an async callable that waits (with a timeout) until the peer
  has received ``n`` deliveries and returns what it got, as a list of bytes: each the
  payload as the peer saw it (decoded from its wire format where the channel wraps it:
  the attachment of an e-mail, the form field of an SMS);
* ``contract_down_channel`` — the same channel pointed at a port nobody listens on;
* ``contract_payload`` — ``(payload bytes, content type)`` fit for the channel; the
  payload contains the word ``Referral`` (the suite varies it by replacing that word).

and sets ``type_name`` to its entry-point name. The suite then checks what the
dispatcher relies on: a receipt for a delivery that arrived, a retryable error (never a
receipt) when the peer is down, errors that never quote the payload, registration under
the ``refloop.channels`` group, and settings that refuse unknown keys.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest

from channels import registry
from channels.base import Channel, ChannelConfigError, Envelope, Receipt, RetryableError

Received = Callable[[int], Awaitable[list[bytes]]]

#: Text that must never appear in an error reason or a receipt (it stands for PHI).
SECRET_MARKER = "TESTPATIENT-SECRET-MARKER"


def envelope(
    payload: bytes,
    content_type: str,
    *,
    delivery_id: int = 1,
    attempt: int = 1,
    key: str = "d3b07384-d9a0-4c2b-8f9e-000000000001",
    endpoint: str = "",
    metadata: dict[str, str] | None = None,
) -> Envelope:
    return Envelope(
        idempotency_key=key,
        delivery_id=delivery_id,
        referral_id="0b7f8e36-0000-4000-8000-000000000001",
        kind="packet",
        payload=payload,
        content_type=content_type,
        attempt=attempt,
        endpoint=endpoint,
        metadata=metadata or {"control_id": f"RL{delivery_id:08d}", "subject": "Referral"},
    )


class ChannelContract:
    type_name: ClassVar[str]

    async def test_a_delivery_arrives_and_returns_a_receipt(
        self,
        contract_channel: Channel,
        contract_received: Received,
        contract_payload: tuple[bytes, str],
    ) -> None:
        payload, content_type = contract_payload
        receipt = await contract_channel.send(envelope(payload, content_type))
        assert isinstance(receipt, Receipt)
        got = await contract_received(1)
        assert len(got) == 1
        assert got[0] == payload

    async def test_two_deliveries_arrive_in_order(
        self,
        contract_channel: Channel,
        contract_received: Received,
        contract_payload: tuple[bytes, str],
    ) -> None:
        payload, content_type = contract_payload
        first = envelope(payload, content_type, delivery_id=1, key="k-1")
        second_payload = payload.replace(b"Referral", b"Referral 2", 1)
        second = envelope(second_payload, content_type, delivery_id=2, key="k-2")
        await contract_channel.send(first)
        await contract_channel.send(second)
        assert await contract_received(2) == [payload, second_payload]

    async def test_peer_down_is_retryable_and_never_a_receipt(
        self, contract_down_channel: Channel, contract_payload: tuple[bytes, str]
    ) -> None:
        payload, content_type = contract_payload
        with pytest.raises(RetryableError) as caught:
            await contract_down_channel.send(envelope(payload, content_type))
        assert caught.value.reason

    async def test_errors_never_quote_the_payload(
        self, contract_down_channel: Channel, contract_payload: tuple[bytes, str]
    ) -> None:
        payload, content_type = contract_payload
        marked = payload.replace(b"Referral", SECRET_MARKER.encode(), 1)
        assert SECRET_MARKER.encode() in marked
        with pytest.raises(RetryableError) as caught:
            await contract_down_channel.send(envelope(marked, content_type))
        assert SECRET_MARKER not in caught.value.reason
        assert SECRET_MARKER not in str(caught.value)

    def test_registered_under_the_entry_point_group(self) -> None:
        assert self.type_name in registry.available()
        cls: Any = registry.plugin(self.type_name)
        assert hasattr(cls, "Settings")
        assert hasattr(cls, "send")

    def test_settings_refuse_unknown_keys(self) -> None:
        with pytest.raises(ChannelConfigError) as caught:
            registry.validate({"type": self.type_name, "no_such_key": 1})
        assert any("no_such_key" in p for p in caught.value.problems)
