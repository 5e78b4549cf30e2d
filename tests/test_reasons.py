"""Refusal reasons are one vocabulary: every reason is a `Reason`, spelled nowhere else as a literal, and
every refusal type takes only those."""
from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from fedswarm.client.swarm.tensors import BadStageInput
from fedswarm.coordinator.auth import AuthError
from fedswarm.coordinator.integrity import Inadmissible
from fedswarm.p2p import Refusals
from fedswarm.proto.refusals import FINAL, REJOIN, REPLACED, RETRY_JOIN, RETRY_SOON, Reason, Refused

ROOT = Path(__file__).resolve().parents[1] / "src" / "fedswarm"
SCANNED = ["."]   # the whole package
# the same word meaning something else: the rebalancer's count of windows with missing readings
OTHER_MEANING = {("coordinator/rebalance.py", "incomplete")}


def test_every_reason_is_one_snake_case_name():
    values = [r.value for r in Reason]
    assert len(values) == len(set(values)) and len(values) > 60
    assert all(v.replace("_", "").isalpha() and v.islower() and r.name == v.upper() for r, v in zip(Reason, values))
    assert REJOIN | RETRY_JOIN | RETRY_SOON | FINAL | {REPLACED} <= set(Reason)


def test_no_reason_is_spelled_outside_its_enum():
    spelled = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == "proto/refusals.py" or "_pb2" in path.name:
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in set(Reason)
                        and (rel, node.value) not in OTHER_MEANING):
                    spelled.append(f"{rel}:{node.lineno} {node.value!r}: use Reason.{node.value.upper()}")
    assert not spelled, "\n".join(spelled)


@pytest.mark.parametrize("make", [
    lambda r: Refused(grpc.StatusCode.INVALID_ARGUMENT, r, "detail"),
    lambda r: AuthError(r, "detail"),
    lambda r: Inadmissible(r, "detail"),
    lambda r: BadStageInput("detail", r),
    lambda r: Refusals().add(r),
])
def test_a_refusal_takes_only_a_reason(make):
    make(Reason.NON_FINITE)
    make("non_finite")   # the wire's spelling of the same reason
    with pytest.raises(ValueError):
        make("not_a_reason")


def test_counts_keep_the_wire_names():
    counts = Refusals()
    counts.add(Reason.NOT_MEMBER, 2)
    assert counts.snapshot() == {"not_member": 2} and type(next(iter(counts.snapshot()))) is str


def test_no_run_state_is_spelled_outside_its_enum():
    """Outside tests (which read the wire's spelling), a run state is a RunState."""
    from fedswarm.proto.run_state import RunState

    spelled = [f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
               for package in SCANNED for path in sorted((ROOT / package).rglob("*.py"))
               if path.name != "run_state.py" and "_pb2" not in path.name
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in set(RunState)]
    assert not spelled, "\n".join(spelled)
