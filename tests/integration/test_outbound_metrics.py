"""The outbound side as ops see it: /metrics of a real daemon that sends the closed-loop
example's referral packet to a real MLLP peer; the shipped alert rules (promtool), the
dashboard's queries, and the deploy configs' commented channel examples.

The daemon runs the example's outbound set (deploy/examples/closed-loop: an ORM^O01 on
listener "ehr" becomes a REF^I12 on channel "specialist"); both of the example's channels
point at python-hl7 MLLP peers on loopback. Each test scrapes /metrics over HTTP, waiting
on a condition of the page rather than sleeping: the counters move once the attempt is
recorded, the outbox gauges when the dispatcher next refreshes them (every 5 s).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from channels.base import Secret
from engine.config import parse_config
from engine.edges.daemon import Daemon
from engine.metrics import DELIVERY_OUTCOMES
from tests.conftest import migrated, running
from tests.helpers import REPO, RawMllp, make_config, segments
from tests.loop_messages import orm
from tests.peers.mllp_peer import MllpPeer, Reply

EXAMPLE = REPO / "deploy" / "examples" / "closed-loop"
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "refloop-dashboard.json"
CHANNELS = ("specialist", "ehr")
# What the ORM carries that must never become a label value: MRN, patient name, placer
# order number, control id, facility.
MRN, PLACER, CONTROL = "100001", "OM100", "OM-1"
IDENTIFYING = (MRN, "TESTPATIENT", "ALPHA", PLACER, CONTROL, "ACME")
# The outbound families and the label keys each sample may carry.
OUTBOUND_LABELS = {
    "refloop_deliveries_total": {"channel", "outcome"},
    "refloop_delivery_seconds_bucket": {"channel", "le"},
    "refloop_delivery_seconds_count": {"channel"},
    "refloop_delivery_seconds_sum": {"channel"},
    "refloop_outbox_pending": {"channel"},
    "refloop_outbox_dead": {"channel"},
}


@dataclass(frozen=True)
class Page:
    """One scrape of /metrics."""

    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Page:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        return cls(text, samples)

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


async def scrape(daemon: Daemon) -> Page:
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"http://127.0.0.1:{daemon.http_port}/metrics")
    assert resp.status_code == 200
    return Page.parse(resp.text)


async def page_when(
    daemon: Daemon, condition: Callable[[Page], bool], timeout: float = 15.0
) -> Page:
    """The first scrape for which ``condition`` holds (AssertionError after ``timeout``)."""
    page = await scrape(daemon)
    try:
        async with asyncio.timeout(timeout):
            while not condition(page):
                await asyncio.sleep(0.05)
                page = await scrape(daemon)
    except TimeoutError:
        raise AssertionError(f"/metrics did not get there within {timeout}s") from None
    return page


@asynccontextmanager
async def sending(url: str, specialist_reply: Reply | None = None) -> AsyncIterator[Daemon]:
    """A daemon running the closed-loop example's outbound set, both channels to real
    MLLP peers; one ORM sent and its REF^I12 received by the specialist's peer."""
    async with MllpPeer(default=specialist_reply) as specialist, MllpPeer() as ehr:
        config = make_config(
            url,
            listeners=[{"name": "ehr", "host": "127.0.0.1", "port": 0}],
            outbound={"dir": str(EXAMPLE)},
            channels={
                "specialist": {"type": "mllp", "host": "127.0.0.1", "port": specialist.port},
                "ehr": {"type": "mllp", "host": "127.0.0.1", "port": ehr.port},
            },
        )
        async with running(config) as daemon:
            feed = await RawMllp.connect(daemon.listeners[0].port)
            try:
                ack = await feed.send(orm(CONTROL, PLACER, mrn=MRN))
            finally:
                await feed.close()
            assert segments(ack)["MSA"][1] == "AA"
            [packet] = await specialist.wait_for(1, timeout=20)
            assert b"REF^I12" in packet
            yield daemon


def delivered(page: Page) -> bool:
    return page.value("refloop_deliveries_total", channel="specialist", outcome="delivered") == 1


async def delivered_page(url: str) -> Page:
    async with sending(url) as daemon:
        return await page_when(daemon, delivered)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: promtool is required (Debian package 'prometheus')")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


@pytest.fixture
def sqlite_upgraded(sqlite_url: str) -> str:
    """For what does not depend on the database (the page's shape): SQLite only."""
    return migrated(sqlite_url)


# -- a delivered packet ------------------------------------------------------------------


async def test_a_delivered_packet_is_counted_and_timed_once(upgraded_url: str) -> None:
    page = await delivered_page(upgraded_url)
    counts = {
        o: page.value("refloop_deliveries_total", channel="specialist", outcome=o)
        for o in DELIVERY_OUTCOMES
    }
    assert counts == {"delivered": 1, "sent": 0, "retry": 0, "dead": 0}
    assert page.value("refloop_delivery_seconds_count", channel="specialist") == 1


async def test_every_configured_channel_has_its_series_from_the_start(upgraded_url: str) -> None:
    page = await delivered_page(upgraded_url)
    for channel in CHANNELS:
        assert page.value("refloop_outbox_pending", channel=channel) is not None, channel
        assert page.value("refloop_outbox_dead", channel=channel) is not None, channel
        assert page.value("refloop_delivery_seconds_count", channel=channel) is not None
        for outcome in DELIVERY_OUTCOMES:
            assert (
                page.value("refloop_deliveries_total", channel=channel, outcome=outcome) is not None
            )
    # Nothing was ever queued for the EHR (no write-back on a new referral): zero, not absent.
    assert page.value("refloop_outbox_pending", channel="ehr") == 0
    assert page.value("refloop_outbox_dead", channel="ehr") == 0
    assert page.value("refloop_outbox_dead", channel="specialist") == 0


async def test_outbound_labels_are_channels_and_outcomes_only(sqlite_upgraded: str) -> None:
    page = await delivered_page(sqlite_upgraded)
    seen = 0
    for (name, labels), _ in page.samples.items():
        if name not in OUTBOUND_LABELS:
            continue
        seen += 1
        values = dict(labels)
        assert set(values) == OUTBOUND_LABELS[name], name
        assert values["channel"] in CHANNELS, (name, values)
        if "outcome" in values:
            assert values["outcome"] in DELIVERY_OUTCOMES, (name, values)
        if "le" in values:
            assert not math.isnan(float(values["le"])), (name, values)
    assert seen >= len(CHANNELS) * len(OUTBOUND_LABELS)


async def test_no_label_value_could_be_a_patient_or_free_text(sqlite_upgraded: str) -> None:
    page = await delivered_page(sqlite_upgraded)
    for name, labels in page.samples:
        for key, value in labels:
            assert not any(x in value for x in IDENTIFYING), (name, key, value)
            # Names, enums, numbers, versions, table 0076 types: no spaces, no free text.
            assert re.fullmatch(r"[A-Za-z0-9_.:+^\-]*", value), (name, key, value)


async def test_promtool_accepts_the_page_with_deliveries(sqlite_upgraded: str) -> None:
    tool = promtool()
    page = await delivered_page(sqlite_upgraded)
    result = subprocess.run(
        [tool, "check", "metrics"], input=page.text.encode(), capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- a packet the peer rejects -----------------------------------------------------------


async def test_an_ar_answer_dead_letters_the_packet_and_the_gauge_shows_it(
    upgraded_url: str,
) -> None:
    # The peer's MSA-3 echoes the patient, as some do: it must stay out of /metrics.
    rejecting = Reply(code="AR", error_code="207", text="TESTPATIENT^ALPHA unknown ZQTEXT")
    async with sending(upgraded_url, rejecting) as daemon:
        page = await page_when(
            daemon, lambda p: p.value("refloop_outbox_dead", channel="specialist") == 1
        )
    counts = {
        o: page.value("refloop_deliveries_total", channel="specialist", outcome=o)
        for o in DELIVERY_OUTCOMES
    }
    assert counts == {"delivered": 0, "sent": 0, "retry": 0, "dead": 1}
    assert page.value("refloop_delivery_seconds_count", channel="specialist") == 1
    # The same refresh saw the row leave the pending set.
    assert page.value("refloop_outbox_pending", channel="specialist") == 0
    assert page.value("refloop_outbox_dead", channel="ehr") == 0
    assert "TESTPATIENT" not in page.text
    assert "ZQTEXT" not in page.text


# -- the shipped rules and dashboard -----------------------------------------------------


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [str(rule["expr"]) for group in groups for rule in group["rules"]]


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    tool = promtool()
    for args in (
        ["check", "rules", str(PROMETHEUS / "rules.yml")],
        ["test", "rules", str(PROMETHEUS / "rules.test.yml")],
    ):
        result = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_has_an_outbound_row_on_the_outbound_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert "Outbound" in rows
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Outbound")
    outbound = panels[start + 1 :]
    outbound = outbound[: next((i for i, p in enumerate(outbound) if p["type"] == "row"), None)]
    exprs = " ".join(t["expr"] for p in outbound for t in p["targets"])
    for name in (
        "refloop_deliveries_total",
        "refloop_delivery_seconds_bucket",
        "refloop_outbox_pending",
        "refloop_outbox_dead",
    ):
        assert name in exprs, name
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.99," in exprs
    # Same data source convention as every other panel; ids unique; no panel overlaps.
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [
        (x, y)
        for p in panels
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", " ".join(_dashboard_exprs()))) - {"__rate_interval"}
    assert used <= variables, used - variables


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    tool = promtool()
    # promtool has no query linter: check every panel query as a recording rule.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(_dashboard_exprs()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$", "")
        lines += [f"      - record: dashboard:q{i}", f"        expr: {json.dumps(concrete)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [tool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_dashboard_and_alerts_name_only_exported_series(sqlite_upgraded: str) -> None:
    page = await delivered_page(sqlite_upgraded)
    exported = page.names()
    queries = " ".join(_dashboard_exprs() + _rule_exprs())
    referenced = set(re.findall(r"\brefloop_[a-z_]+", queries))
    assert {"refloop_deliveries_total", "refloop_outbox_dead"} <= referenced
    assert not sorted(referenced - exported)


# -- the deploy configs' outbound examples ---------------------------------------------


def _uncommented(toml: str) -> str:
    """The config with its commented settings switched on: lines where "#" is directly
    followed by a key or a [table] (prose comments have a space after the "#")."""
    return "\n".join(
        line[1:] if re.match(r"#[\[a-z]", line) else line for line in toml.splitlines()
    )


def _deploy_configs() -> dict[str, str]:
    configmap = yaml.safe_load((REPO / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    return {
        "docker": (REPO / "deploy" / "docker" / "engine.toml").read_text(),
        "kubernetes": str(configmap["data"]["engine.toml"]),
    }


@pytest.mark.parametrize("where", ["docker", "kubernetes"])
def test_the_deploy_configs_commented_channels_validate(where: str) -> None:
    text = _deploy_configs()[where]
    assert "channels" not in tomllib.loads(text)  # shipped off: nothing is sent until edited
    config = parse_config(tomllib.loads(_uncommented(text)), Path("/etc/refloop/engine.toml"))
    kinds = {name: settings.type for name, settings in config.channels.items()}
    assert kinds == {"specialist": "mllp", "specialist-email": "smtp", "ehr-fhir": "fhir"}
    mllp, smtp, fhir = (config.channels[n] for n in ("specialist", "specialist-email", "ehr-fhir"))
    assert mllp.tls is not None
    assert mllp.tls.ca_file is not None
    assert smtp.security == "starttls"
    assert smtp.password.env == "REFLOOP_SMTP_PASSWORD"
    assert fhir.auth == "smart"
    assert fhir.smart.private_key.file is not None
    assert fhir.smart.private_key.file.is_absolute()
    assert (
        config.outbound.lease_seconds
        >= max(c.timeout_seconds for c in config.channels.values()) + 5
    )


def _secrets(model: BaseModel) -> list[Secret]:
    """Every :class:`Secret` a channel's settings name, however deep."""
    found: list[Secret] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Secret):
            found.append(value)
        elif isinstance(value, BaseModel):
            found += _secrets(value)
    return found


# Where operators find the names of the secrets each deployment's examples need.
SECRET_LISTS = {
    "docker": (".env.example", {"REFLOOP_SMTP_PASSWORD": "REFLOOP_SMTP_PASSWORD="}),
    "kubernetes": ("kubernetes/secret.example.yaml", {"REFLOOP_SMTP_PASSWORD": "smtp-password"}),
}


@pytest.mark.parametrize("where", ["docker", "kubernetes"])
def test_the_secrets_the_examples_name_are_listed_for_operators(where: str) -> None:
    config = parse_config(
        tomllib.loads(_uncommented(_deploy_configs()[where])), Path("/etc/refloop/engine.toml")
    )
    secrets = [x for settings in config.channels.values() for x in _secrets(settings)]
    envs = {x.env for x in secrets if x.env}
    files = {x.file.name for x in secrets if x.file}
    listing, names = SECRET_LISTS[where]
    text = (REPO / "deploy" / listing).read_text()
    assert envs == set(names)
    for env in envs:
        assert names[env] in text, env
    assert files
    for file in files:
        # The key file's name (compose secret / Secret key) is named for the operator.
        assert file in text, file
