"""The policy language (referral-policy/v1): every kind of bad file refused at its
line:column, durations, precedence, the committed JSON Schema, and the fixture runner."""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta
from pathlib import Path

import pytest

from engine.domain.referral import Event, State
from engine.policy.cases import PolicyCaseResult, policy_case_files, run_policy_cases
from engine.policy.language import (
    Ladder,
    Policy,
    PolicyError,
    Window,
    compile_policy,
    format_duration,
    load_policy,
    parse_duration,
    policy_files,
)
from engine.policy.schema import SCHEMAS, render

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"

HEAD = "schema: referral-policy/v1\n"
WINDOW = "windows:\n  - id: w1\n    states: sent\n    within: 14d\n"
LADDER = (
    "ladders:\n  - id: l1\n    states: sent\n    steps:\n"
    "      - {after: 3d, do: outreach, template: remind}\n"
)


def compile_text(text: str, known_routes: Collection[str] | None = None) -> Policy:
    return compile_policy([("p.yaml", text.encode())], known_routes=known_routes)


def errors_of(text: str, known_routes: Collection[str] | None = None) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        compile_text(text, known_routes)
    return caught.value.errors


# ---- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("14d", timedelta(days=14)),
        ("72h", timedelta(hours=72)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("0h", timedelta(0)),
        ("0d", timedelta(0)),
        ("", None),
        ("14", None),
        ("d", None),
        ("14D", None),
        ("P14D", None),
        ("12h1d", None),
        ("1.5d", None),
        ("-3d", None),
        ("3 d", None),
        ("2w", None),
    ],
)
def test_durations(text: str, want: timedelta | None) -> None:
    assert parse_duration(text) == want


@pytest.mark.parametrize("text", ["14d", "72h", "1d12h", "0d", "3650d"])
def test_duration_round_trip(text: str) -> None:
    found = parse_duration(text)
    assert found is not None
    assert parse_duration(format_duration(found)) == found
    assert format_duration(found) == {"72h": "3d"}.get(text, text)


# ---- bad files -------------------------------------------------------------------------

BAD = [
    pytest.param(
        "windows: []\n", "p.yaml:1:1: expected `schema: referral-policy/v1`", id="no-schema"
    ),
    pytest.param(
        "schema: referral-policy/v2\n",
        "p.yaml:1:9: expected `schema: referral-policy/v1`",
        id="wrong-schema",
    ),
    pytest.param(HEAD + "windows: [\n", "p.yaml:3:1: YAML syntax:", id="yaml-syntax"),
    pytest.param(
        HEAD + "windwos: []\n",
        "p.yaml:2:1: unknown key 'windwos' (did you mean 'windows'?); expected one of schema,",
        id="unknown-top-key",
    ),
    pytest.param(HEAD + "windows: {a: b}\n", "p.yaml:2:10: windows must be a list", id="not-list"),
    pytest.param(
        HEAD + "windows:\n  - id: w1\n    states: sent\n",
        "p.yaml:3:5: a window needs within",
        id="window-without-within",
    ),
    pytest.param(
        HEAD + WINDOW + "    whitin: 3d\n",
        "p.yaml:6:5: unknown key 'whitin' (did you mean 'within'?)",
        id="unknown-window-key",
    ),
    pytest.param(
        HEAD + "windows:\n  - id: W1\n    states: sent\n    within: 14d\n",
        "p.yaml:3:9: id is a code: lower-case letters, digits",
        id="bad-id",
    ),
    pytest.param(
        HEAD + "windows:\n  - id: w1\n    states: [sent, schedueld]\n    within: 14d\n",
        "p.yaml:4:20: unknown state 'schedueld' (did you mean 'scheduled'?); expected one of",
        id="unknown-state",
    ),
    pytest.param(
        HEAD + "windows:\n  - id: w1\n    states: []\n    within: 14d\n",
        "p.yaml:4:13: state must be text or a non-empty list of text",
        id="empty-states",
    ),
    pytest.param(
        HEAD + "windows:\n  - id: w1\n    states: sent\n    within: P14D\n",
        "p.yaml:5:13: within is written like 14d or 72h: for 'P14D' write 14d",
        id="iso-duration-hint",
    ),
    pytest.param(
        HEAD + "windows:\n  - id: w1\n    states: sent\n    within: PT72H\n",
        "p.yaml:5:13: within is written like 14d or 72h: for 'PT72H' write 3d",
        id="iso-hours-hint",
    ),
    pytest.param(
        HEAD + "windows:\n  - id: w1\n    states: sent\n    within: two weeks\n",
        "p.yaml:5:13: within must be a duration like 14d, 72h or 1d12h (calendar time)",
        id="bad-duration",
    ),
    pytest.param(
        HEAD + "windows:\n  - id: w1\n    states: sent\n    within: 0h\n",
        "p.yaml:5:13: within must be longer than 0h",
        id="zero-window",
    ),
    pytest.param(
        HEAD + "windows:\n  - id: w1\n    states: sent\n    within: 4000d\n",
        "p.yaml:5:13: within must be at most 3650d",
        id="too-long",
    ),
    pytest.param(
        HEAD + WINDOW + "    level: 0\n",
        "p.yaml:6:12: level must be a whole number from 1 to 9",
        id="bad-level",
    ),
    pytest.param(
        HEAD + WINDOW + "    reason: Not Scheduled!\n",
        "p.yaml:6:13: reason is a code",
        id="free-text-reason",
    ),
    pytest.param(
        HEAD + WINDOW + "    restart_on: appointment.reschduled\n",
        "p.yaml:6:17: unknown event 'appointment.reschduled' (did you mean "
        "'appointment.rescheduled'?)",
        id="unknown-event",
    ),
    pytest.param(
        HEAD + WINDOW + "  - id: w1\n    states: accepted\n    within: 3d\n",
        "p.yaml:6:9: rule id 'w1' is also used at p.yaml:3:9",
        id="duplicate-id",
    ),
    pytest.param(
        HEAD + WINDOW + "    within: 3d\n",
        "p.yaml:6:5: duplicate key 'within' (first at line 5)",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        HEAD + "ladders:\n  - id: l1\n    states: sent\n    steps: []\n",
        "p.yaml:5:12: a ladder needs at least one step",
        id="empty-ladder",
    ),
    pytest.param(
        HEAD + LADDER + "      - {after: 3d, do: remind}\n",
        "p.yaml:7:25: do must be one of outreach, worklist, escalate, notify",
        id="unknown-action",
    ),
    pytest.param(
        HEAD + LADDER + "      - {after: 3d, do: outreach}\n",
        "p.yaml:7:9: a outreach step needs template",
        id="outreach-without-template",
    ),
    pytest.param(
        HEAD + LADDER + "      - {after: 3d, do: notify, to: referrer}\n",
        "p.yaml:7:9: a notify step needs route",
        id="notify-without-route",
    ),
    pytest.param(
        HEAD + LADDER + "      - {after: 3d, do: notify, to: patient, route: r}\n",
        "p.yaml:7:37: to must be one of referrer, specialist",
        id="notify-to-patient",
    ),
    pytest.param(
        HEAD + LADDER + "      - {after: 3d, do: escalate, reason: late, template: t}\n",
        "p.yaml:7:49: unknown key 'template'; expected one of after, do, reason, level",
        id="key-of-another-action",
    ),
    pytest.param(
        HEAD + LADDER + "      - {after: 4d, do: outreach, template: t, prefer: [sms, fax]}\n",
        "p.yaml:7:62: unknown contact method 'fax'; expected one of sms, email, voice,",
        id="unknown-contact-method",
    ),
    pytest.param(
        HEAD + LADDER + "      - {after: 2d, do: outreach, template: again}\n",
        "p.yaml:7:17: steps run in order: 2d comes before the previous step's 3d",
        id="steps-out-of-order",
    ),
    pytest.param(
        HEAD + LADDER + "      - {do: outreach, template: again}\n",
        "p.yaml:7:9: a step needs after",
        id="step-without-after",
    ),
    pytest.param(
        HEAD + WINDOW + "  - id: w2\n    states: [accepted, sent]\n    within: 3d\n",
        "p.yaml:6:9: 'w2' and 'w1' (p.yaml:3:9) both apply to sent with the same "
        "specificity: narrow one by specialty or priority, or give them different states",
        id="ambiguous-windows",
    ),
    pytest.param(
        HEAD
        + "windows:\n"
        + "  - {id: w1, states: sent, priority: [urgent, stat], within: 3d}\n"
        + "  - {id: w2, states: sent, priority: stat, within: 1d}\n",
        "p.yaml:4:10: 'w2' and 'w1' (p.yaml:3:10) both apply to sent",
        id="ambiguous-overlapping-priorities",
    ),
    pytest.param(
        HEAD + LADDER + "  - id: l2\n    ladder: l1\n    states: sent\n    steps: [{after: 1d, do: "
        "outreach, template: t}]\n",
        "p.yaml:7:9: 'l2' and 'l1' (p.yaml:3:9) both apply to sent with the same specificity",
        id="ambiguous-ladders-of-one-family",
    ),
]


@pytest.mark.parametrize(("text", "want"), BAD)
def test_bad_file_is_refused_at_its_line_and_column(text: str, want: str) -> None:
    errors = errors_of(text)
    assert len(errors) == 1, errors
    assert errors[0].startswith(want), errors[0]


def test_every_error_is_collected_not_only_the_first() -> None:
    text = (
        HEAD
        + "windows:\n"
        + "  - {id: a, states: sent, within: 2x}\n"
        + "  - {id: b, states: nowhere, within: 3d}\n"
        + "ladders:\n"
        + "  - {id: c, states: sent, steps: [{after: 1d, do: call}]}\n"
    )
    assert [e.split(": ", 1)[0] for e in errors_of(text)] == [
        "p.yaml:3:35",
        "p.yaml:4:21",
        "p.yaml:6:51",
    ]


def test_not_utf8_is_an_error_at_the_file() -> None:
    with pytest.raises(PolicyError) as caught:
        compile_policy([("p.yaml", HEAD.encode() + b"description: caf\xe9\n")])
    assert caught.value.errors == ["p.yaml:1:1: not UTF-8 text (byte 43)"]


def test_a_route_the_outbound_set_does_not_have_is_refused_when_the_routes_are_known() -> None:
    text = HEAD + LADDER + "      - {after: 7d, do: notify, to: referrer, route: no_show_notce}\n"
    assert errors_of(text, known_routes={"no_show_notice"}) == [
        "p.yaml:7:54: no outbound route 'no_show_notce' (did you mean 'no_show_notice'?)"
    ]
    policy = compile_text(text)  # routes unknown to the caller: not checked here
    assert policy.routes() == {"no_show_notce"}


def test_ids_and_ambiguities_are_checked_across_files(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "a.yaml").write_text(HEAD + WINDOW, encoding="utf-8")
    (folder / "b.yaml").write_text(
        HEAD + "windows:\n  - {id: w1, states: accepted, within: 3d}\n", encoding="utf-8"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path)
    assert caught.value.errors == [
        f"{folder / 'b.yaml'}:3:10: rule id 'w1' is also used at {folder / 'a.yaml'}:3:9"
    ]
    (folder / "b.yaml").write_text(
        HEAD + "windows:\n  - {id: w2, states: sent, within: 3d}\n", encoding="utf-8"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path)
    assert caught.value.errors[0].startswith(
        f"{folder / 'b.yaml'}:3:10: 'w2' and 'w1' ({folder / 'a.yaml'}:3:9)"
    )


def test_the_folder_holds_policies_and_fixtures_apart(tmp_path: Path) -> None:
    assert load_policy(tmp_path).rules() == ()  # no policies/ folder: no timers at all
    folder = tmp_path / "policies"
    (folder / "tests").mkdir(parents=True)
    (folder / "main.yaml").write_text(HEAD + WINDOW, encoding="utf-8")
    (folder / "x.cases.yaml").write_text("not: a policy\n", encoding="utf-8")
    (folder / ".hidden.yaml").write_text("not: a policy\n", encoding="utf-8")
    (folder / "notes.txt").write_text("not yaml\n", encoding="utf-8")
    (folder / "tests" / "main.cases.yaml").write_text("cases: []\n", encoding="utf-8")
    assert policy_files(tmp_path) == [folder / "main.yaml"]
    assert policy_case_files(tmp_path) == [folder / "tests" / "main.cases.yaml"]
    first = load_policy(tmp_path)
    assert [r.id for r in first.rules()] == ["w1"]
    (folder / "main.yaml").write_text(HEAD + WINDOW.replace("14d", "13d"), encoding="utf-8")
    assert load_policy(tmp_path).digest != first.digest
    with pytest.raises(PolicyError, match="no such mappings directory"):
        load_policy(tmp_path / "missing")


# ---- what compiles -----------------------------------------------------------------------

FULL = (
    HEAD
    + "description: everything\n"
    + "windows:\n"
    + "  - id: unscheduled\n    states: [sent, accepted]\n    within: 14d\n    due: 2d\n"
    + "    restart_on: [referral.updated]\n"
    + "  - {id: urgent, states: [sent, accepted], priority: [urgent, asap], within: 3d,\n"
    + "     reason: urgent_late, level: 2, owner: triage}\n"
    + "ladders:\n"
    + "  - id: remind\n    states: sent\n    steps:\n"
    + "      - {after: 3d, do: outreach, template: t1, prefer: [sms, email]}\n"
    + "      - {after: 7d, do: worklist, reason: stalled, due: 1d12h}\n"
    + "      - {after: 21d, do: escalate, reason: late}\n"
    + "      - {after: 21d, do: notify, to: referrer, route: tell_referrer}\n"
    + "  - {id: remind_cardio, ladder: remind, states: sent, specialty: cardiology,\n"
    + "     steps: [{after: 1d, do: outreach, template: t2}]}\n"
)


def test_a_full_policy_compiles_to_frozen_rules() -> None:
    policy = compile_text(FULL)
    unscheduled, urgent = policy.windows
    assert unscheduled == Window(
        "unscheduled",
        unscheduled.scope,
        timedelta(days=14),
        "unscheduled_missed",
        level=1,
        owner="coordinator",
        due=timedelta(days=2),
        where="p.yaml:4:5",
    )
    assert unscheduled.scope.states == {State.SENT, State.ACCEPTED}
    assert unscheduled.scope.restart_on == {Event.REFERRAL_UPDATED}
    assert (urgent.reason, urgent.level, urgent.owner) == ("urgent_late", 2, "triage")
    assert urgent.scope.priority == {"urgent", "asap"}
    remind, cardio = policy.ladders
    assert isinstance(remind, Ladder)
    assert [(s.after.days, s.do) for s in remind.steps] == [
        (3, "outreach"),
        (7, "worklist"),
        (21, "escalate"),
        (21, "notify"),
    ]
    outreach, worklist, escalate, notify = remind.steps
    assert (outreach.template, outreach.prefer) == ("t1", ("sms", "email"))
    assert (worklist.reason, worklist.owner, worklist.due) == (
        "stalled",
        "coordinator",
        timedelta(days=1, hours=12),
    )
    assert (escalate.reason, escalate.level) == ("late", 1)
    assert (notify.to, notify.route) == ("referrer", "tell_referrer")
    assert (remind.family, cardio.family) == ("ladder:remind", "ladder:remind")
    assert policy.rule("remind_cardio") is cardio
    assert policy.rule("nope") is None
    with pytest.raises(AttributeError):
        unscheduled.within = timedelta(0)  # type: ignore[misc]


PRECEDENCE = (
    HEAD
    + "windows:\n"
    + "  - {id: any, states: [sent, accepted], within: 14d}\n"
    + "  - {id: urgent, states: [sent, accepted], priority: urgent, within: 3d}\n"
    + "  - {id: cardio, states: sent, specialty: cardiology, within: 10d}\n"
    + "  - {id: cardio_urgent, states: sent, specialty: cardiology, priority: urgent,"
    + " within: 2d}\n"
    + "  - {id: derm_or_cardio, states: accepted, specialty: [dermatology, cardiology],"
    + " within: 20d}\n"
)


@pytest.mark.parametrize(
    ("state", "specialty", "priority", "want"),
    [
        (State.SENT, None, None, "any"),
        (State.SENT, "neurology", "routine", "any"),
        (State.SENT, None, "urgent", "urgent"),
        (State.SENT, "cardiology", None, "cardio"),
        (State.SENT, "cardiology", "routine", "cardio"),
        # specialty outranks priority
        (State.ACCEPTED, "cardiology", "urgent", "derm_or_cardio"),
        (State.SENT, "cardiology", "urgent", "cardio_urgent"),
        (State.ACCEPTED, "cardiology", None, "derm_or_cardio"),
        (State.ACCEPTED, "neurology", "urgent", "urgent"),
        (State.SCHEDULED, "cardiology", "urgent", None),
    ],
)
def test_the_most_specific_window_wins(
    state: State, specialty: str | None, priority: str | None, want: str | None
) -> None:
    policy = compile_text(PRECEDENCE)
    found = [r.id for r in policy.select(state, specialty, priority)]
    assert found == ([want] if want else [])


def test_each_family_contributes_one_rule() -> None:
    policy = compile_text(FULL)
    assert [r.id for r in policy.select(State.SENT, "cardiology", "urgent")] == [
        "urgent",
        "remind_cardio",
    ]
    assert [r.id for r in policy.select(State.SENT, None, None)] == ["unscheduled", "remind"]
    assert [r.id for r in policy.select(State.ACCEPTED, None, None)] == ["unscheduled"]


# ---- JSON Schema ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_is_current(name: str) -> None:
    committed = (MAPPINGS / "_schema" / name).read_text(encoding="utf-8")
    assert committed == render(name), "regenerate with engine.policy.schema.render and commit"


def test_schema_offers_what_the_loader_takes() -> None:
    schema = SCHEMAS["referral-policy.v1.json"]()
    window = schema["properties"]["windows"]["items"]
    assert set(window["properties"]) == {
        "id", "description", "states", "specialty", "priority", "restart_on",
        "within", "reason", "level", "owner", "due",
    }  # fmt: skip
    steps = schema["properties"]["ladders"]["items"]["properties"]["steps"]["items"]["oneOf"]
    assert [s["properties"]["do"]["const"] for s in steps] == [
        "outreach",
        "worklist",
        "escalate",
        "notify",
    ]
    assert steps[3]["required"] == ["after", "do", "to", "route"]


# ---- fixtures ----------------------------------------------------------------------------

CASES_HEAD = "schema: referral-policy-cases/v1\ncases:\n"
POLICY = (
    HEAD
    + "windows:\n  - {id: unscheduled, states: [sent, accepted], within: 14d, due: 1d}\n"
    + "ladders:\n  - id: remind\n    states: [sent, accepted]\n    steps:\n"
    + "      - {after: 3d, do: outreach, template: remind, prefer: sms}\n"
    + "      - {after: 21d, do: notify, to: referrer, route: tell}\n"
)
STORY = (
    "  - name: never booked\n"
    "    start: 2025-03-03T09:00:00-05:00\n"
    "    steps:\n"
    "      - {at: +0h, event: referral.created, fields: {specialty: cardiology}}\n"
    "      - at: +1h\n"
    "        event: referral.sent\n"
    "        expect:\n"
    "          state: sent\n"
    "          set:\n"
    "            - {rule: unscheduled, kind: window, due: +14d1h}\n"
    "            - {rule: remind, kind: outreach, step: 0, due: +3d1h}\n"
    "      - until: 2025-04-01T00:00:00Z\n"
    "        expect:\n"
    "          effects:\n"
    "            - {kind: outreach, at: +3d1h, template: remind, prefer: [sms]}\n"
    "            - {kind: escalate, rule: unscheduled, at: +14d1h, reason: unscheduled_missed}\n"
    "            - {kind: worklist, owner: coordinator, due: +15d1h}\n"
    "            - {kind: notify, to: referrer, route: tell, at: +21d1h}\n"
    "          pending: []\n"
)


def write_cases(tmp_path: Path, cases: str, policy: str = POLICY) -> Path:
    folder = tmp_path / "policies"
    (folder / "tests").mkdir(parents=True, exist_ok=True)
    (folder / "p.yaml").write_text(policy, encoding="utf-8")
    path = folder / "tests" / "p.cases.yaml"
    path.write_text(CASES_HEAD + cases, encoding="utf-8")
    return path


def test_a_passing_story(tmp_path: Path) -> None:
    results = run_policy_cases(write_cases(tmp_path, STORY))
    assert [(r.name, r.line, r.ok) for r in results] == [("never booked", 3, True)], [
        r.report() for r in results
    ]
    assert results[0].rules == {"unscheduled", "remind"}


def test_a_failing_story_says_what_differs_in_the_analysts_terms(tmp_path: Path) -> None:
    wrong = STORY.replace("due: +14d1h", "due: +14d").replace(
        "            - {kind: notify, to: referrer, route: tell, at: +21d1h}\n", ""
    )
    (result,) = run_policy_cases(write_cases(tmp_path, wrong))
    assert not result.ok
    assert result.problems == [
        "step 2 (referral.sent) set[0].due  -want +14d  +got +14d1h  "
        "(kind='window' rule='unscheduled' due=+14d1h)",
        "step 3 (until) effects  -want 3 item(s)  +got 4: also kind='notify' rule='remind' "
        "at=+21d1h",
    ]
    assert result.report().startswith(f"FAIL {result.file}:3 > never booked\n  step 2")


def test_a_story_is_run_against_a_given_policy(tmp_path: Path) -> None:
    path = write_cases(tmp_path, STORY)
    other = compile_text(POLICY.replace("within: 14d", "within: 10d"))
    (result,) = run_policy_cases(path, other)
    assert result.problems[0].startswith(
        "step 2 (referral.sent) set[0].due  -want +14d1h  +got +10d1h"
    )


def test_a_policy_that_does_not_load_fails_the_fixtures_with_its_errors(tmp_path: Path) -> None:
    path = write_cases(tmp_path, STORY, policy=HEAD + "windows: x\n")
    (result,) = run_policy_cases(path)
    assert (result.name, result.ok) == ("(policy)", False)
    assert result.problems == [
        f"{path.parent.parent / 'p.yaml'}:2:10: windows must be a list (one `- item` per line)"
    ]


def test_a_fixture_outside_a_policies_folder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.cases.yaml"
    path.write_text(CASES_HEAD + STORY, encoding="utf-8")
    (result,) = run_policy_cases(path)
    assert result.problems == [
        "a policy fixture lives under a policies/ folder (policies/tests/*.cases.yaml)"
    ]


BAD_CASES = [
    pytest.param("cases: []\n", "1:1: expected `schema: referral-policy-cases/v1`", id="no-schema"),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00\n    steps: []\n",
        "4:12: a time is ISO 8601 with an offset",
        id="naive-start",
    ),
    pytest.param(
        CASES_HEAD
        + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        + "      - {at: +0h, event: referral.sent}\n",
        "6:7: a case starts with a referral.created step",
        id="first-not-created",
    ),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        "      - {at: +0h, event: referral.craeted}\n",
        "6:26: event must be one of referral.created,",
        id="unknown-event",
    ),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        "      - {at: 3 days, event: referral.created}\n",
        "6:14: a time is ISO 8601 with an offset",
        id="bad-time",
    ),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        "      - {at: +3x, event: referral.created}\n",
        "6:14: an offset from start is written like +3d, +72h or +1d12h",
        id="bad-offset",
    ),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        "      - {at: +1d, event: referral.created}\n      - {at: +0h, event: referral.sent}\n",
        "7:9: steps run in time order",
        id="time-goes-back",
    ),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        "      - {at: +0h, event: referral.created, fields: {priorty: urgent}}\n",
        "6:62: referral.created has no field 'priorty' (did you mean 'priority'?)",
        id="unknown-field",
    ),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        "      - {at: +0h, event: referral.created, until: +1d}\n",
        "6:9: a step is either `event:` (with `at:`) or `until:`",
        id="event-and-until",
    ),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        "      - {at: +0h, event: referral.created, expect: {sets: []}}\n",
        "6:53: unknown key 'sets' (did you mean 'set'?)",
        id="unknown-expect-key",
    ),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        "      - {at: +0h, event: referral.created, expect: {set: [{rule: a, when: +1d}]}}\n",
        "6:69: unknown key 'when'; expected one of rule, kind, step, due",
        id="unknown-timer-key",
    ),
    pytest.param(
        CASES_HEAD + "  - name: x\n    start: 2025-03-03T09:00:00Z\n    steps:\n"
        "      - {at: +0h, event: referral.created, expect: {state: sched}}\n",
        "6:60: state must be one of created,",
        id="unknown-state",
    ),
]


@pytest.mark.parametrize(("cases", "want"), BAD_CASES)
def test_bad_fixture_is_refused_at_its_line_and_column(
    tmp_path: Path, cases: str, want: str
) -> None:
    path = write_cases(tmp_path, "")
    path.write_text(cases, encoding="utf-8")
    (result,) = run_policy_cases(path)
    assert result.name == "(file)"
    assert len(result.problems) == 1, result.problems
    assert result.problems[0].startswith(f"{path}:{want}"), result.problems[0]


# ---- the shipped policy ------------------------------------------------------------------

SHIPPED = load_policy(MAPPINGS)
SHIPPED_RESULTS = [r for p in policy_case_files(MAPPINGS) for r in run_policy_cases(p)]


def test_the_shipped_policy_has_the_design_examples() -> None:
    days = {w.id: w.within.days for w in SHIPPED.windows}
    assert days["unscheduled"] == 14
    assert days["unscheduled_urgent"] == 3
    assert days["awaiting_note"] == 7
    reminders = SHIPPED.rule("schedule_reminders")
    assert isinstance(reminders, Ladder)
    assert [(s.after, s.do) for s in reminders.steps] == [
        (timedelta(hours=2), "outreach"),  # a text within 2 hours of sending
        (timedelta(hours=24), "outreach"),  # an e-mail at 24 hours if still unscheduled
        (timedelta(days=7), "outreach"),
        (timedelta(days=14), "outreach"),
        (timedelta(days=21), "escalate"),
        (timedelta(days=21), "notify"),
    ]
    assert [s.prefer[0] for s in reminders.steps[:2]] == ["sms", "email"]
    assert reminders.steps[-1].to == "referrer"
    notes = SHIPPED.rule("note_requests")
    assert isinstance(notes, Ladder)
    assert (notes.steps[0].after.days, notes.steps[0].to) == (7, "specialist")
    no_show = SHIPPED.rule("no_show_reengagement")
    assert isinstance(no_show, Ladder)
    assert [(s.after, s.do, s.to) for s in no_show.steps[:2]] == [
        (timedelta(0), "outreach", ""),
        (timedelta(0), "notify", "referrer"),
    ]
    assert SHIPPED.routes() == {"escalation_to_referrer", "no_show_notice", "note_request"}


def test_the_shipped_policy_has_fixtures() -> None:
    assert len(SHIPPED_RESULTS) >= 5
    exercised = set().union(*(r.rules for r in SHIPPED_RESULTS))
    assert {r.id for r in SHIPPED.rules()} - exercised == set(), "a fixture for every rule"


@pytest.mark.parametrize("result", SHIPPED_RESULTS, ids=lambda r: f"{Path(r.file).name}:{r.line}")
def test_shipped_fixture(result: PolicyCaseResult) -> None:
    assert result.ok, result.report()
