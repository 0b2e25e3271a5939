"""The referral state machine: table tests and properties over arbitrary event streams."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.domain.referral import BSER, TERMINAL, Event, State, decide

E, S = Event, State


def run(*events: Event) -> tuple[State | None, list[str]]:
    state: State | None = None
    anomalies = []
    for event in events:
        d = decide(state, event)
        if d.anomaly:
            anomalies.append(d.anomaly)
        state = d.state
    return state, anomalies


@pytest.mark.parametrize(
    ("events", "final"),
    [
        ((E.REFERRAL_CREATED,), S.CREATED),
        ((E.REFERRAL_CREATED, E.AUTHORIZATION_PENDING), S.AUTH_PENDING),
        ((E.REFERRAL_CREATED, E.AUTHORIZATION_PENDING, E.AUTHORIZATION_APPROVED), S.CREATED),
        ((E.REFERRAL_CREATED, E.AUTHORIZATION_PENDING, E.AUTHORIZATION_DENIED), S.AUTH_PENDING),
        ((E.REFERRAL_CREATED, E.REFERRAL_SENT, E.REFERRAL_ACCEPTED), S.ACCEPTED),
        ((E.REFERRAL_CREATED, E.REFERRAL_SENT, E.REFERRAL_DECLINED), S.DECLINED),
        ((E.REFERRAL_CREATED, E.APPOINTMENT_BOOKED), S.SCHEDULED),  # skip forward
        ((E.REFERRAL_CREATED, E.APPOINTMENT_BOOKED, E.APPOINTMENT_NO_SHOW), S.NO_SHOW),
        (
            (
                E.REFERRAL_CREATED,
                E.APPOINTMENT_BOOKED,
                E.APPOINTMENT_NO_SHOW,
                E.APPOINTMENT_RESCHEDULED,
            ),
            S.SCHEDULED,
        ),
        (
            (E.REFERRAL_CREATED, E.APPOINTMENT_BOOKED, E.APPOINTMENT_CANCELLED),
            S.APPOINTMENT_CANCELLED,
        ),
        (
            (
                E.REFERRAL_CREATED,
                E.APPOINTMENT_BOOKED,
                E.APPOINTMENT_COMPLETED,
                E.CONSULT_NOTE_RECEIVED,
                E.REFERRAL_CLOSED,
            ),
            S.CLOSED,
        ),
        ((E.REFERRAL_CREATED, E.CONSULT_NOTE_RECEIVED), S.NOTE_RECEIVED),
        ((E.REFERRAL_CREATED, E.REFERRAL_CANCELLED), S.CANCELLED),
        ((E.REFERRAL_CREATED, E.REFERRAL_ACCEPTED, E.REFERRAL_SENT), S.ACCEPTED),  # late receipt
        # The booking arrives after the visit (late), or a follow-up is booked: no step back.
        ((E.REFERRAL_CREATED, E.APPOINTMENT_COMPLETED, E.APPOINTMENT_BOOKED), S.COMPLETED),
    ],
)
def test_paths_without_anomalies(events, final):
    state, anomalies = run(*events)
    assert state == final
    assert anomalies == []


@pytest.mark.parametrize(
    ("events", "final", "reason"),
    [
        ((E.APPOINTMENT_BOOKED,), None, "does not exist"),
        (
            (E.REFERRAL_CREATED, E.REFERRAL_CANCELLED, E.APPOINTMENT_BOOKED),
            S.CANCELLED,
            "cancelled",
        ),
        ((E.REFERRAL_CREATED, E.APPOINTMENT_NO_SHOW), S.CREATED, "no-show"),
        ((E.REFERRAL_CREATED, E.REFERRAL_CLOSED), S.CREATED, "cannot close"),
        (
            (E.REFERRAL_CREATED, E.APPOINTMENT_COMPLETED, E.APPOINTMENT_CANCELLED),
            S.COMPLETED,
            "appointment cancelled for a referral that is completed",
        ),
        (
            (E.REFERRAL_CREATED, E.CONSULT_NOTE_RECEIVED, E.REFERRAL_CANCELLED),
            S.NOTE_RECEIVED,
            "cannot move from note_received to cancelled",
        ),
        ((E.REFERRAL_CREATED, E.REFERRAL_DECLINED, E.REFERRAL_ACCEPTED), S.DECLINED, "declined"),
        ((E.REFERRAL_CREATED, E.CONSULT_NOTE_AMENDED), S.CREATED, "no note yet"),
    ],
)
def test_events_out_of_place_are_anomalies_and_change_nothing(events, final, reason):
    state, anomalies = run(*events)
    assert state == final
    assert len(anomalies) == 1
    assert reason in anomalies[0]


def test_every_state_has_a_bser_task_status_and_business_status():
    assert set(BSER) == set(State)
    assert BSER[S.SCHEDULED] == ("in-progress", "5.1.1")
    assert BSER[S.NO_SHOW] == ("in-progress", "5.1.2")
    assert BSER[S.DECLINED] == ("rejected", "4.0")


@given(st.lists(st.sampled_from(list(Event)), max_size=40))
def test_any_event_stream_is_decided_without_raising(events):
    state: State | None = None
    for event in events:
        d = decide(state, event)
        if d.anomaly:
            assert d.state == state  # anomalies never move a referral
            assert not d.changed
        # The only way out of a terminal state: a declined referral's packet re-sent to
        # the next specialist.
        resent = (state, event, d.state) == (S.DECLINED, Event.REFERRAL_SENT, S.SENT)
        if state in TERMINAL and d.state != state and not resent:
            raise AssertionError(f"{state} -> {d.state} on {event}")
        state = d.state


# Every state x every event, written out: the row is the state before, the column the
# event, the cell the state after ("=" unchanged without complaint, "!" an anomaly:
# recorded, state unchanged). Columns follow the Event enum order.
COLUMNS = (
    "created updated cancel sent deliv accept decline auth? auth+ auth- "
    "book resched apt-x noshow visit note note+ close escal hand-close wl-ack wl-asgn wl-snz "
    "wl-res reply plan skip dlv-ok dlv-x"
).split()
_ = "="
X = "!"
MATRIX: dict[State | None, tuple[str, ...]] = {
    None: ("created", X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X),
    S.CREATED: (_, _, "cancelled", "sent", _, "accepted", "declined", "auth_pending", _,
                "auth_pending", "scheduled", "scheduled", X, X, "completed", "note_received",
                X, X, _, _, _),
    S.AUTH_PENDING: (_, _, "cancelled", "sent", _, "accepted", "declined", _, "created", _,
                     "scheduled", "scheduled", X, X, "completed", "note_received", X, X, _, _, _),
    S.SENT: (_, _, "cancelled", _, _, "accepted", "declined", X, _, X, "scheduled",
             "scheduled", X, X, "completed", "note_received", X, X, _, _, _),
    S.ACCEPTED: (_, _, "cancelled", _, _, _, "declined", X, _, X, "scheduled", "scheduled",
                 X, X, "completed", "note_received", X, X, _, _, _),
    S.SCHEDULED: (_, _, "cancelled", _, _, _, "declined", X, _, X, _, _,
                  "appointment_cancelled", "no_show", "completed", "note_received", X, X, _, _, _),
    S.NO_SHOW: (_, _, "cancelled", _, _, _, "declined", X, _, X, "scheduled", "scheduled",
                "appointment_cancelled", _, "completed", "note_received", X, X, _, _, _),
    S.APPOINTMENT_CANCELLED: (_, _, "cancelled", _, _, _, X, X, _, X, "scheduled",
                              "scheduled", _, X, "completed", "note_received", X, X, _, _, _),
    S.COMPLETED: (_, _, "cancelled", _, _, _, "declined", X, _, X, _, _, X, X, _,
                  "note_received", X, X, _, _, _),
    S.NOTE_RECEIVED: (_, _, X, _, _, _, X, X, _, X, _, _, X, X, _, _, _, "closed", _, _, _),
    S.CLOSED: (_, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, _, _, X, _, _),
    S.DECLINED: (_, X, X, "sent", X, X, _, X, X, X, X, X, X, X, X, X, X, X, X, _, _),
    S.CANCELLED: (_, X, _, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, _, _),
}  # fmt: skip


# The policy's events (after `escal`): a hand close from any open state, the rest kept
# on the timeline whatever the state.
_OPEN_POLICY = ("closed", _, _, _, _, _, _, _)
_POLICY_COLUMNS = {
    None: (X,) * 8,
    S.CLOSED: (_,) * 8,
    S.DECLINED: (X, _, _, _, _, _, _, _),
    S.CANCELLED: (X, _, _, _, _, _, _, _),
}
MATRIX = {
    state: row[:19] + _POLICY_COLUMNS.get(state, _OPEN_POLICY) + row[19:]
    for state, row in MATRIX.items()
}


def test_the_matrix_covers_every_state_and_every_event() -> None:
    assert set(MATRIX) == {None, *State}
    assert all(len(row) == len(Event) == len(COLUMNS) for row in MATRIX.values())


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in MATRIX for e in Event],
    ids=lambda v: "none" if v is None else str(v.value) if hasattr(v, "value") else str(v),
)
def test_every_state_times_every_event(state: State | None, event: Event) -> None:
    want = MATRIX[state][list(Event).index(event)]
    d = decide(state, event)
    if want == X:
        assert d.anomaly, f"{state} + {event} should be an anomaly"
        assert d.state == state
        assert not d.changed
    elif want == _:
        assert (d.anomaly, d.state, d.changed) == (None, state, False)
    else:
        assert (d.anomaly, d.state, d.changed) == (None, State(want), True)
