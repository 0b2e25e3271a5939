"""Referral policy: target windows and escalation ladders as analysts' YAML, and the
pure timer decisions made with them (see :mod:`engine.policy.language` and
:mod:`engine.policy.timers`)."""
