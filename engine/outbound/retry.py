"""Retry policy and delivery outcomes (pure): when to try again, when to give up, and
which referral events an outcome becomes.

Backoff is exponential with "equal jitter": attempt n waits between half and all of
``min(cap, initial * 2**(n-1))``. The jitter is derived from the delivery's idempotency
key and the attempt number instead of a random generator, so the decision is a pure
function (replayable in tests and in the simulator) while deliveries that failed
together still spread out instead of hammering a recovering peer in step. A peer's
``Retry-After`` is honoured when it asks for longer than the backoff.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from engine.domain.referral import Event


@dataclass(frozen=True, slots=True)
class Policy:
    max_attempts: int = 25
    max_age: timedelta = timedelta(days=7)
    initial: float = 5.0  # seconds
    cap: float = 3600.0  # seconds


@dataclass(frozen=True, slots=True)
class RetryAt:
    when: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


def _jitter(key: str, attempt: int) -> float:
    """A stable number in [0, 1) for this delivery and attempt."""
    digest = hashlib.sha256(f"{key}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def backoff(key: str, attempt: int, policy: Policy) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    ceiling = float(min(policy.cap, policy.initial * 2.0 ** min(max(attempt - 1, 0), 60)))
    return ceiling / 2 + ceiling / 2 * _jitter(key, attempt)


def after_failure(
    *,
    key: str,
    attempt: int,
    created_at: datetime,
    now: datetime,
    retryable: bool,
    reason: str,
    retry_after: float | None,
    policy: Policy,
) -> RetryAt | DeadLetter:
    """What to do after attempt ``attempt`` failed."""
    if not retryable:
        return DeadLetter(reason)
    if attempt >= policy.max_attempts:
        return DeadLetter(f"{reason}; gave up after {attempt} attempts")
    wait = backoff(key, attempt, policy)
    if retry_after is not None and retry_after > wait:
        wait = min(retry_after, max(policy.cap, wait))
    when = now + timedelta(seconds=wait)
    if when - created_at > policy.max_age:
        return DeadLetter(f"{reason}; gave up after {attempt} attempts (older than max age)")
    return RetryAt(when, reason)


def success_events(kind: str, *, confirmed: bool) -> tuple[Event, ...]:
    """The events a successful delivery becomes on the referral's timeline.

    A packet that reached the specialist sends the referral (``referral.sent``); when the
    peer confirmed it (an MLLP AA, an HTTP 2xx of the receiving system — not an SMTP relay
    that only queued it) it is also ``referral.delivered``. Anything else (a write-back
    to the referring EHR, a notification) is recorded without moving the state."""
    if kind == "packet":
        return (
            (Event.REFERRAL_SENT, Event.REFERRAL_DELIVERED) if confirmed else (Event.REFERRAL_SENT,)
        )
    return (Event.DELIVERY_SUCCEEDED,)
