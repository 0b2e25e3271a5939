"""What the FHIR read facade reads: a referral's projection, a stored message's FHIR id."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from engine.store.schema import messages, referrals

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class ReferralView:
    """A referral as the projection holds it now."""

    id: str
    state: str
    sequence: int  # the last event's sequence: the facade's version id
    created_at: datetime
    updated_at: datetime
    data: dict[str, dict[str, Any]]


def referral_view(conn: Connection, referral_id: str) -> ReferralView | None:
    """The referral with refloop's id ``referral_id`` (a uuid), else None."""
    if not _UUID.fullmatch(referral_id):
        return None
    row = conn.execute(
        select(
            referrals.c.id,
            referrals.c.state,
            referrals.c.last_sequence,
            referrals.c.created_at,
            referrals.c.updated_at,
            referrals.c.data,
        ).where(referrals.c.id == referral_id)
    ).first()
    if row is None:
        return None
    return ReferralView(
        id=row.id,
        state=row.state,
        sequence=int(row.last_sequence),
        created_at=row.created_at,
        updated_at=row.updated_at,
        data=json.loads(row.data),
    )


def message_control_id(conn: Connection, message_id: int) -> str | None:
    """A stored message's control id (for FHIR: ``Type/id[/_history/v]``)."""
    value = conn.execute(
        select(messages.c.control_id).where(messages.c.id == message_id)
    ).scalar_one_or_none()
    return str(value) if value is not None else None
