"""The referral policy in a running daemon: refused with file:line at start, a broken
edit keeps the running policy, a good one replaces it; the scheduler runs."""

from __future__ import annotations

import shutil

import pytest

from engine.edges.daemon import Daemon, StartupError
from tests.conftest import running
from tests.helpers import MAPPINGS, wait_for

BROKEN = ("within: 14d", "within: two weeks")


async def test_a_broken_policy_refuses_the_start_with_file_line_column(tmp_path, config_for):
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    policy = root / "policies" / "default.yaml"
    policy.write_text(policy.read_text().replace(*BROKEN))
    with pytest.raises(StartupError, match=r"policies/default\.yaml:\d+:\d+: within must be"):
        await Daemon(config_for(mappings={"dir": str(root)}), install_signals=False).run()


async def test_a_broken_policy_edit_keeps_the_running_policy(tmp_path, config_for):
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    policy = root / "policies" / "default.yaml"
    good = policy.read_text()
    cfg = config_for(mappings={"dir": str(root), "reload_seconds": 0.05})
    async with running(cfg) as d:
        assert d.mappings is not None
        assert d.scheduler is not None
        first = d.mappings.policy.digest
        assert d.mappings.policy.rules()
        policy.write_text(good.replace(*BROKEN))
        await wait_for(lambda: d.metrics.mapping_reloads.labels("error")._value.get() == 1)
        assert d.mappings.policy.digest == first  # still the running one
        policy.write_text(good.replace("within: 14d", "within: 10d"))
        await wait_for(lambda: d.mappings is not None and d.mappings.policy.digest != first)
        window = d.mappings.policy.rule("unscheduled")
        assert window is not None
        assert window.within.days == 10  # type: ignore[union-attr]


async def test_policy_off_runs_no_scheduler(config_for):
    async with running(config_for(policy={"enabled": False})) as d:
        assert d.scheduler is None
        assert d.mappings is not None
        assert not d.mappings.policy.rules()
