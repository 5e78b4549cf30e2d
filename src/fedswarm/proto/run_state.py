"""The states a run reports in Status (`StatusReply.state`, the status JSON's "state"): one vocabulary for the
coordinator that sets it and the clients, tools and tests that read it."""
from __future__ import annotations

import enum


class RunState(enum.StrEnum):
    WAITING = "waiting"   # too few clients connected for the next round
    RUNNING = "running"   # a round is in progress
    DONE = "done"         # every round committed: clients exit
    FAILED = "failed"     # --max-failed-rounds rounds in a row failed: the coordinator stops


class EndReason(enum.StrEnum):
    """Why a run ended before its last round (status's "end_reason"; absent when every round ran)."""

    PRIVACY_BUDGET = "privacy_budget"   # the next round would have pushed epsilon past --dp-max-epsilon
