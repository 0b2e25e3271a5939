"""Every shipped fixture (``mappings/**/*.cases.yaml``) runs as its own test, and the
committed JSON Schemas match what the engine generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.mapping.fixtures import CaseResult, case_files, run_cases
from engine.mapping.mapset import load_mapping_set
from engine.mapping.schema import SCHEMAS, render

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
MAPSET = load_mapping_set(MAPPINGS)
RUN = run_cases(MAPSET, case_files(MAPPINGS))


def _id(result: CaseResult) -> str:
    return f"{Path(result.file).relative_to(MAPPINGS)}:{result.line}"


@pytest.mark.parametrize("result", RUN.results, ids=_id)
def test_fixture(result: CaseResult) -> None:
    assert result.ok, result.report()


def test_every_rule_is_exercised_by_a_fixture() -> None:
    unfired = {
        m.id: sorted(r.id for r in m.rules if r.id not in RUN.fired.get(m.id, set()))
        for m in MAPSET.mappings
    }
    assert {k: v for k, v in unfired.items() if v} == {}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_is_current(name: str) -> None:
    committed = (MAPPINGS / "_schema" / name).read_text(encoding="utf-8")
    assert committed == render(name), "run `refloop mappings schema` and commit the result"
