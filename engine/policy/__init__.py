"""Referral policy: target windows and escalation ladders as analysts' YAML, and the
pure timer decisions made with them (see :mod:`engine.policy.language` and
:mod:`engine.policy.timers`)."""

from engine.policy.cases import PolicyCaseResult, policy_case_files, run_policy_cases
from engine.policy.language import (
    Ladder,
    Policy,
    PolicyError,
    Scope,
    Step,
    Window,
    compile_policy,
    load_policy,
)
from engine.policy.timers import Armed, Effect, Timer, on_due, on_transition

__all__ = [
    "Armed",
    "Effect",
    "Ladder",
    "Policy",
    "PolicyCaseResult",
    "PolicyError",
    "Scope",
    "Step",
    "Timer",
    "Window",
    "compile_policy",
    "load_policy",
    "on_due",
    "on_transition",
    "policy_case_files",
    "run_policy_cases",
]
