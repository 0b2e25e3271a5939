"""The pre-authorization table: which rule holds a referral, and bad tables refused at
their line:column."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.domain.projection import Referral
from engine.domain.referral import State
from engine.policy.authorization import (
    AUTHORIZATION_FILE,
    EMPTY,
    SCHEMA_NAME,
    AuthorizationError,
    compile_table,
    load_authorization,
    render,
    requires,
)

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)

TABLE = """\
schema: referral-authorization/v1
rules:
  - id: hmo_ortho
    payer: EXAMPLE-HMO
    specialty: orthopedics
    required: true
  - id: hmo_gold_ortho
    payer: EXAMPLE-HMO
    plan: HMO-GOLD
    specialty: orthopedics
    required: false
  - id: hmo_ortho_knee
    payer: EXAMPLE-HMO
    specialty: orthopedics
    diagnosis: M17.*
    required: false
  - id: hmo_cardio_imaging
    payer: EXAMPLE-HMO
    specialty: cardiology
    diagnosis: [R07.*, I20.9]
    required: true
  - id: by_payer_id
    payer_id: HMO0001
    specialty: orthopedics
    required: true
  - id: ppo_everything
    payer: EXAMPLE-PPO
    required: true
"""


def ref(
    specialty: str | None = "orthopedics",
    payer: str | None = "EXAMPLE-HMO",
    plan: str | None = None,
    diagnosis: str | None = None,
    payer_id: str | None = None,
    **extra: Any,
) -> Referral:
    data: dict[str, Any] = {}
    if specialty:
        data["specialty"] = specialty
    if payer:
        data["insurance.payer"] = payer
    if plan:
        data["insurance.plan"] = plan
    if payer_id:
        data["insurance.payer_id"] = {"value": payer_id, "namespace": "PAYERS"}
    if diagnosis:
        data["diagnosis"] = {"code": diagnosis, "system": "I10"}
    data.update(extra)
    groups: dict[str, dict[str, Any]] = {"referral": data}
    return Referral("r1", State.CREATED, 1, T0, T0, data=groups)


@pytest.fixture(scope="module")
def table() -> Any:
    return compile_table("auth.yaml", TABLE.encode())


@pytest.mark.parametrize(
    ("referral_", "expected"),
    [
        (ref(), "hmo_ortho"),
        (ref(payer="example-hmo "), "hmo_ortho"),  # case and spaces do not matter
        (ref(plan="HMO-GOLD"), None),  # the plan-level exception is more specific
        (ref(diagnosis="M17.11"), None),  # a diagnosis exception, dots or not
        (ref(diagnosis="M1711"), None),
        (ref(diagnosis="M16.0"), "hmo_ortho"),  # another code: the specialty rule
        (ref(specialty="cardiology"), None),  # no diagnosis: no imaging rule
        (ref(specialty="cardiology", diagnosis="R07.9"), "hmo_cardio_imaging"),
        (ref(specialty="cardiology", diagnosis="I20.9"), "hmo_cardio_imaging"),
        (ref(specialty="cardiology", diagnosis="I20.8"), None),  # a code, not a prefix
        (ref(specialty="dermatology"), None),  # nothing matches: no authorization
        (ref(payer=None, payer_id="HMO0001"), "by_payer_id"),
        (ref(payer="EXAMPLE-PPO", specialty="dermatology"), "ppo_everything"),
        (ref(payer="EXAMPLE-PPO", specialty=None), "ppo_everything"),
        (ref(payer=None), None),  # no insurance known: nothing to ask
        # The reason code counts as a diagnosis too (ORM OBR-31)
        (
            ref(specialty="cardiology", reason_code={"code": "R07.1", "system": "I10"}),
            "hmo_cardio_imaging",
        ),
    ],
)
def test_the_most_specific_rule_decides(table: Any, referral_: Referral, expected: str) -> None:
    assert requires(table, referral_) == expected
    assert table.requires(referral_) == expected


def test_payer_id_outranks_payer_at_an_equal_count(table: Any) -> None:
    both = ref(payer="EXAMPLE-HMO", payer_id="HMO0001")
    assert table.rule(both).id == "by_payer_id"


@pytest.mark.parametrize(
    "authorization",
    [
        {"referral": {"authorization.identifier": {"value": "AUTH-1", "namespace": "HMO"}}},
        {"authorization": {"authorization.status": "approved"}},
    ],
)
def test_an_authorized_referral_needs_none(table: Any, authorization: dict[str, Any]) -> None:
    base = ref()
    data = {g: dict(v) for g, v in base.data.items()}
    for group, values in authorization.items():
        data.setdefault(group, {}).update(values)
    held = Referral("r1", State.CREATED, 1, T0, T0, data=data)
    assert requires(table, held) is None


def test_a_pending_or_denied_status_is_not_an_authorization(table: Any) -> None:
    base = ref()
    data = {**base.data, "authorization": {"authorization.status": "denied"}}
    assert requires(table, Referral("r1", State.CREATED, 1, T0, T0, data=data)) == "hmo_ortho"


def test_no_table_holds_nothing(tmp_path: Path) -> None:
    assert load_authorization(tmp_path) == EMPTY
    assert requires(EMPTY, ref()) is None


def test_the_table_is_read_from_policies(tmp_path: Path) -> None:
    path = tmp_path / AUTHORIZATION_FILE
    path.parent.mkdir()
    path.write_text(TABLE)
    loaded = load_authorization(tmp_path)
    assert [r.id for r in loaded.rules][:2] == ["hmo_ortho", "hmo_gold_ortho"]
    assert loaded.files == (path,)
    assert loaded.rules[0].where == f"{path}:3:9"
    path.write_text(TABLE.replace("EXAMPLE-PPO", "OTHER-PPO"))
    assert load_authorization(tmp_path).digest != loaded.digest


# ---- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        (
            "schema: referral-policy/v1\n",
            ["t.yaml:1:9: expected `schema: referral-authorization/v1` at the top"],
        ),
        (
            "schema: referral-authorization/v1\nrules:\n"
            "  - id: a\n    payor: X\n    required: true\n",
            [
                "t.yaml:4:5: unknown key 'payor' (did you mean 'payer'?); expected one of id, "
                "description, specialty, payer, payer_id, plan, diagnosis, required"
            ],
        ),
        (
            "schema: referral-authorization/v1\nrules:\n  - id: a\n    payer: X\n",
            ["t.yaml:3:5: a rule needs required"],
        ),
        (
            "schema: referral-authorization/v1\nrules:\n  - id: a\n    required: maybe\n",
            ["t.yaml:4:15: required must be true or false"],
        ),
        (
            "schema: referral-authorization/v1\nrules:\n"
            "  - {id: a, required: true, diagnosis: [M17.*, knee]}\n"
            "  - {id: B, required: true}\n",
            [
                "t.yaml:3:48: diagnosis 'knee' is not an ICD-10 code: a letter, a digit, then "
                "up to 5 letters or digits (M17.11), or a prefix ending in * (M17.*)",
                "t.yaml:4:10: a rule id is lower-case letters, digits, '_', '.' and '-'",
            ],
        ),
        (
            "schema: referral-authorization/v1\nrules:\n"
            "  - {id: a, required: true}\n  - {id: a, required: false, payer: X}\n",
            ["t.yaml:4:10: rule id 'a' is also used at t.yaml:3:10"],
        ),
    ],
)
def test_a_bad_table_is_refused_with_every_error(text: str, errors: list[str]) -> None:
    with pytest.raises(AuthorizationError) as caught:
        compile_table("t.yaml", text.encode())
    assert caught.value.errors == errors


@pytest.mark.parametrize(
    ("second", "ambiguous"),
    [
        ("{id: b, payer: [x, Y], specialty: ortho, required: false}", True),  # shares Y
        ("{id: b, payer: z, specialty: ortho, required: false}", False),  # disjoint payers
        ("{id: b, payer: y, specialty: cardio, required: true}", False),
        ("{id: b, payer: y, specialty: ortho, plan: P, required: false}", False),  # narrower
        ("{id: b, payer: y, required: true}", False),  # broader
    ],
)
def test_two_rules_that_could_both_win_are_refused(second: str, ambiguous: bool) -> None:
    text = (
        "schema: referral-authorization/v1\nrules:\n"
        "  - {id: a, payer: y, specialty: ortho, required: true}\n"
        f"  - {second}\n"
    )
    if not ambiguous:
        compile_table("t.yaml", text.encode())
        return
    with pytest.raises(AuthorizationError) as caught:
        compile_table("t.yaml", text.encode())
    assert caught.value.errors == [
        "t.yaml:4:10: rules 'b' and 'a' (t.yaml:3:10) can both match one referral with the same "
        "conditions (specialty, payer): make their values disjoint, or add a condition to the "
        "narrower one"
    ]


@pytest.mark.parametrize(
    ("first", "second", "ambiguous"),
    [
        ("M17.*", "M17.1*", True),  # one prefix inside the other
        ("M17.*", "M17.11", True),  # a code under the prefix
        ("M17.*", "M16.*", False),
        ("M17.11", "M17.12", False),
    ],
)
def test_diagnosis_overlap(first: str, second: str, ambiguous: bool) -> None:
    text = (
        "schema: referral-authorization/v1\nrules:\n"
        f"  - {{id: a, diagnosis: '{first}', required: true}}\n"
        f"  - {{id: b, diagnosis: '{second}', required: false}}\n"
    )
    if ambiguous:
        with pytest.raises(AuthorizationError):
            compile_table("t.yaml", text.encode())
    else:
        assert len(compile_table("t.yaml", text.encode()).rules) == 2


def test_the_shipped_example_table_holds_what_its_readme_says() -> None:
    """policies/authorization.yaml (policies/README.md "Pre-authorization")."""
    path = REPO / "mappings" / "policies" / "authorization.yaml"
    table = compile_table(str(path), path.read_bytes())
    assert requires(table, ref()) == "hmo_orthopedics"
    assert requires(table, ref(plan="EXAMPLE-HMO-GOLD")) is None
    assert requires(table, ref(payer=None, payer_id="HMO0001")) == "hmo_orthopedics_by_id"
    assert requires(table, ref(specialty="cardiology", diagnosis="R07.9")) == (
        "hmo_cardiology_imaging"
    )
    assert requires(table, ref(specialty="cardiology")) is None
    assert requires(table, ref(payer="EXAMPLE-PPO")) is None


def test_the_committed_schema_is_current() -> None:
    committed = REPO / "mappings" / "_schema" / SCHEMA_NAME
    assert committed.read_text(encoding="utf-8") == render()
