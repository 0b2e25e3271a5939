"""What patients told us about contacting them: the ``patient_preferences`` table.

A row is keyed by the referral projection's ``patient_key`` (identifier ``value^assigner``),
so a STOP texted about one referral holds for every referral of that patient. It
overrides the order's consent and language fields (:class:`engine.policy.outreach.Contact`):
the patient's own latest word wins over what the EHR sent with the order.

:meth:`PreferenceQueries.upsert` runs in the caller's transaction (the SMS reply webhook
writes the consent and the ``patient.replied`` event together); a ``None`` argument
leaves that column as it was, so a STOP does not forget the patient's language.

:meth:`PreferenceQueries.open_by_phone` finds the open referrals whose patient has a
phone number, for matching an inbound text to its patient. The phone lives inside the
projection's JSON, so it is a scan of the open referrals (one clinic: tens of thousands
of rows at most, decoded in well under a second); an indexed ``patient_phone`` column
on ``referrals`` is the upgrade if a clinic outgrows it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from engine.domain.referral import TERMINAL
from engine.policy.outreach import Preferences, normalise_phone
from engine.store.driver import DriverQueries

__all__ = ["PreferenceQueries"]


class PreferenceQueries(DriverQueries):
    def __init__(self, dbapi_connection: Any, dialect: str) -> None:
        super().__init__(dbapi_connection, dialect)
        m = self.mark
        terminal = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL))
        self.sql = {
            # Built once from our own names; every value is a bound parameter.
            "get": "SELECT patient_key, sms_consent, email_consent, language "  # noqa: S608
            f"FROM patient_preferences WHERE {self.among('patient_key')}",
            "upsert": "INSERT INTO patient_preferences (patient_key, sms_consent, "  # noqa: S608
            f"email_consent, language, updated_at, updated_by) VALUES ({m}, {m}, {m}, {m}, "
            f"{m}, {m}) ON CONFLICT (patient_key) DO UPDATE SET "
            "sms_consent = COALESCE(excluded.sms_consent, patient_preferences.sms_consent), "
            "email_consent = COALESCE(excluded.email_consent, "
            "patient_preferences.email_consent), "
            "language = COALESCE(excluded.language, patient_preferences.language), "
            "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
            "open": "SELECT id, patient_key, data FROM referrals "  # noqa: S608
            f"WHERE state NOT IN ({terminal})",
        }

    def get(self, patient_keys: Iterable[str]) -> dict[str, Preferences]:
        """The rows of these patients (a patient with none is absent)."""
        keys = sorted({k for k in patient_keys if k})
        if not keys:
            return {}
        return {
            key: Preferences(_bool(sms), _bool(email), language or None)
            for key, sms, email, language in self._all("get", self._list(keys))
        }

    def upsert(
        self,
        cur: Any,
        patient_key: str,
        *,
        sms_consent: bool | None = None,
        email_consent: bool | None = None,
        language: str | None = None,
        now: datetime,
        by: str,
    ) -> None:
        """Set what is given, keep the rest (in the caller's transaction)."""
        cur.execute(
            self.sql["upsert"],
            (patient_key, sms_consent, email_consent, language, self._stamp(now), by[:64]),
        )

    def open_by_phone(self, phone: str) -> list[tuple[str, str | None]]:
        """``(referral id, patient_key)`` of the open referrals whose ``patient.phone`` is
        this number once both are normalised (see the module docstring)."""
        wanted = normalise_phone(phone)
        if wanted is None:
            return []
        out: list[tuple[str, str | None]] = []
        for rid, patient_key, data in self._all("open"):
            try:
                groups = json.loads(data)
            except ValueError:
                continue
            value = groups.get("referral", {}).get("patient.phone")
            if isinstance(value, str) and normalise_phone(value) == wanted:
                out.append((str(rid), patient_key))
        return out


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)
