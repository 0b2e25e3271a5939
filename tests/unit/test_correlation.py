"""Correlation: ranked identifier rules, assigners respected, the heuristic kept honest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.domain.correlation import (
    HEURISTIC_CONFIDENCE,
    Clues,
    Key,
    KeyKind,
    OpenReferral,
    correlate,
    index_keys,
)

K = KeyKind
T0 = datetime(2026, 11, 1, tzinfo=UTC)
INDEX = index_keys(
    {
        "R1": [Key(K.REFERRAL_ID, "RF-1"), Key(K.PLACER_ORDER, "889342", "1.2.3")],
        "R2": [Key(K.PLACER_ORDER, "889342", "9.9.9"), Key(K.FILLER_ORDER, "F-77", "SPEC")],
        "R3": [Key(K.APPOINTMENT, "APPT-5", "SCHED"), Key(K.PLACER_ORDER, "555", "1.2.3")],
    }
)
OPEN = [
    OpenReferral("R4", "12345^HOSP", "cardiology", T0),
    OpenReferral("R5", "12345^HOSP", "dermatology", T0),
    OpenReferral("R6", "777^HOSP", "cardiology", T0),
    OpenReferral("R7", "777^HOSP", "Cardiology", T0 + timedelta(days=2)),
]


@pytest.mark.parametrize(
    ("keys", "referral", "method"),
    [
        ([Key(K.REFERRAL_ID, "RF-1")], "R1", "referral_id"),
        ([Key(K.PLACER_ORDER, "889342", "1.2.3")], "R1", "placer_order"),
        ([Key(K.PLACER_ORDER, "889342", "9.9.9")], "R2", "placer_order"),
        ([Key(K.PLACER_ORDER, " 555 ", "1.2.3")], "R3", "placer_order"),  # padded feed
        ([Key(K.PLACER_ORDER, "555")], "R3", "placer_order"),  # one assigner uses it
        ([Key(K.FILLER_ORDER, "F-77", "spec")], "R2", "filler_order"),  # assigner case
        ([Key(K.APPOINTMENT, "APPT-5", "SCHED")], "R3", "appointment"),
        # precedence: the referral id beats a placer number naming another referral
        ([Key(K.PLACER_ORDER, "555", "1.2.3"), Key(K.REFERRAL_ID, "RF-1")], "R1", "referral_id"),
    ],
)
def test_identifier_rules(keys, referral, method):
    match = correlate(Clues(keys=tuple(keys)), INDEX)
    assert (match.referral_id, match.method) == (referral, method)
    assert not match.needs_review


def test_same_number_from_two_assigners_is_never_guessed():
    match = correlate(Clues(keys=(Key(K.PLACER_ORDER, "889342"),)), INDEX)
    assert match.referral_id is None
    assert match.method == "none"


def test_keys_naming_two_referrals_are_a_conflict():
    keys = (Key(K.PLACER_ORDER, "889342", "1.2.3"), Key(K.PLACER_ORDER, "889342", "9.9.9"))
    match = correlate(Clues(keys=keys), INDEX)
    assert (match.referral_id, match.method, match.candidates) == (None, "conflict", ("R1", "R2"))


def test_an_assigner_that_was_sent_must_match():
    assert correlate(Clues(keys=(Key(K.PLACER_ORDER, "555", "OTHER"),)), INDEX).referral_id is None


def test_heuristic_links_only_a_single_candidate_and_flags_it_for_review():
    one = correlate(
        Clues(patient="12345^HOSP", specialty="Cardiology", occurred_at=T0 + timedelta(days=9)),
        INDEX,
        OPEN,
    )
    assert (one.referral_id, one.method, one.confidence) == (
        "R4",
        "heuristic",
        HEURISTIC_CONFIDENCE,
    )
    assert one.needs_review
    two = correlate(
        Clues(patient="777^HOSP", specialty="cardiology", occurred_at=T0 + timedelta(days=9)),
        INDEX,
        OPEN,
    )
    assert (two.referral_id, two.method, two.candidates) == (None, "conflict", ("R6", "R7"))
    before = correlate(
        Clues(patient="12345^HOSP", specialty="cardiology", occurred_at=T0 - timedelta(days=1)),
        INDEX,
        OPEN,
    )
    assert before.referral_id is None  # a referral cannot be booked before it existed


_KEY = st.builds(
    Key,
    st.sampled_from(list(KeyKind)),
    st.text("AB12", min_size=1, max_size=3),
    st.sampled_from(["", "X", "Y"]),
)


@given(
    st.dictionaries(st.text("RS", min_size=1, max_size=2), st.lists(_KEY, max_size=3)),
    st.lists(_KEY, max_size=4),
)
def test_a_match_is_always_a_referral_that_holds_one_of_the_keys(referrals, keys):
    match = correlate(Clues(keys=tuple(keys)), index_keys(referrals))
    if match.referral_id is not None:
        held = {k.normalised() for k in referrals[match.referral_id]}
        assert any(k.normalised() in held or not k.assigner for k in keys)
    else:
        assert match.confidence == 0.0
