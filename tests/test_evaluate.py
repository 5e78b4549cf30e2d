"""Federated evaluation through Flower's configure_evaluate / aggregate_evaluate, evaluators that never train,
and the evaluation and commit of round N running while round N+1 trains.

In-process: the real RoundDriver, SessionGrid, Store, Flower strategies and CoordinatorService; the test plays
the client nodes (take_task / deliver_reply, or the service's PushEval handler). tests/test_e2e.py runs
--evaluate both with real processes."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedswarm.client import work
from fedswarm.client.identity import Identity
from fedswarm.coordinator.aggregate import task_round
from fedswarm.coordinator.auth import Authenticator
from fedswarm.coordinator.config import CoordinatorTimeouts
from fedswarm.run_config import RunConfig
from fedswarm.coordinator.driver import EVALUATOR, RoundDriver, RunProgress
from fedswarm.coordinator.grid import ERROR_REJECTED, SessionGrid
from fedswarm.coordinator.membership import Membership
from fedswarm.coordinator.service import CoordinatorService
from fedswarm.proto.refusals import Refused
from fedswarm.coordinator.store import Store
from fedswarm.coordinator.strategies import build_strategy, evaluation_strategy
from fedswarm.proto import fedswarm_pb2 as pb

SHAPES = {"w": (3, 4), "b": (4,)}
LOSS = {1: 2.0, 2: 4.0, 3: 3.0}          # what each node reports
TOKENS = {1: 100, 2: 300, 3: 50}         # ... over this many tokens


pytestmark = pytest.mark.usefixtures("task_identity")   # tests/conftest.py


def initial() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def answer(grid: SessionGrid, node: int, msg: Message) -> None:
    """What a client sends back: a loss over its tokens, or its arrays (the base + node/10)."""
    if msg.metadata.message_type == MessageType.EVALUATE:
        content = RecordDict({"metrics": MetricRecord({"eval_loss": LOSS[node], "num-examples": TOKENS[node]}),
                              "client": ConfigRecord({"name": f"n{node}"})})
    else:
        arrays = ArrayRecord({k: Array(a.numpy() + node / 10) for k, a in msg.content["arrays"].items()})
        content = RecordDict({"arrays": arrays, "client": ConfigRecord({"name": f"n{node}"}), "metrics": MetricRecord(
            {"num-examples": 10, "train_loss": 1.0, "bytes-up": 1, "bytes-up-raw": 4, "train-seconds": 0.5})})
    assert grid.deliver_reply(msg.metadata.message_id, node, content)


class Run:
    """A RoundDriver on its own thread over a SessionGrid of `nodes` (roles as given), state in tmp_path."""

    def __init__(self, tmp_path, nodes: list[int], roles: dict[int, str] | None = None, rounds: int = 2,
                 store: Store | None = None, **cfg):
        self.cfg = RunConfig(rounds=rounds, min_clients=len([n for n in nodes if (roles or {}).get(n) != EVALUATOR]),
                             local_steps=1, **cfg)
        self.grid = SessionGrid(7, live_nodes=lambda: list(nodes))
        self.store = store or Store(tmp_path / "state")
        self.progress = RunProgress(self.cfg, [])
        self.driver = RoundDriver(self.cfg, self.grid, build_strategy(self.cfg), self.store, None, None,
                                  self.progress, round_timeout_s=30, roles=lambda: dict(roles or {}))
        self.error: BaseException | None = None
        self.seen: dict[int, list[tuple[str, int]]] = {n: [] for n in nodes}   # (message type, round) per node
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.driver.run(initial())
        except BaseException as err:  # noqa: BLE001 - surfaced by finish()
            self.error = err

    def take(self, node: int) -> Message:
        msg = self.grid.take_task(node, wait_s=10)
        assert msg is not None, f"node {node} got no task"
        self.seen[node].append((msg.metadata.message_type, task_round(msg)))
        return msg

    def play_until_done(self, nodes: list[int]) -> None:
        while not self.progress.done.is_set() and self.thread.is_alive():
            for node in nodes:
                msg = self.grid.take_task(node, wait_s=0.05)
                if msg is not None:
                    self.seen[node].append((msg.metadata.message_type, task_round(msg)))
                    answer(self.grid, node, msg)

    def finish(self) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the driver did not finish"
        self.store.close()
        if self.error is not None:
            raise self.error


def test_clients_evaluate_each_round_weighted_by_tokens_and_recorded(tmp_path):
    run = Run(tmp_path, [1, 2], evaluate="clients")
    run.play_until_done([1, 2])
    run.finish()
    expected = (LOSS[1] * TOKENS[1] + LOSS[2] * TOKENS[2]) / (TOKENS[1] + TOKENS[2])   # 3.5, not the plain mean 3
    rounds = run.progress.rounds
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:   # round 0 too: the initial model is scored by the clients
        assert r["eval_source"] == "clients" and r["eval_loss"] == pytest.approx(expected)
        (ev,) = r["evals"]
        assert ev["source"] == "clients" and ev["tokens"] == 400 and ev["clients"] == ["n1", "n2"], ev
    stored = Store(tmp_path / "state").rounds()
    assert [r["evals"][0]["loss"] for r in stored] == pytest.approx([expected] * 3)
    assert stored[-1]["eval_source"] == "clients"
    for node in (1, 2):   # each round: scored, then trained on; the last one scored after the last training
        assert run.seen[node] == [("evaluate", 0), ("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2)]


def test_the_next_round_trains_while_the_last_one_is_evaluated_and_committed(tmp_path):
    run = Run(tmp_path, [1, 2], evaluate="clients", rounds=2)
    for node in (1, 2):
        answer(run.grid, node, run.take(node))       # round 0's evaluation
    for node in (1, 2):
        answer(run.grid, node, run.take(node))       # round 1's training
    held = {node: run.take(node) for node in (1, 2)}   # round 1's evaluation: not answered yet
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in held.values())
    nxt = {node: run.take(node) for node in (1, 2)}    # ... yet round 2's training is already out
    assert {(m.metadata.message_type, task_round(m)) for m in nxt.values()} == {("train", 2)}
    assert run.store.last_round() == 0 and run.progress.committed_round == 0, "round 1 committed before its eval"
    for node in (1, 2):
        answer(run.grid, node, held[node])
        answer(run.grid, node, nxt[node])
    run.play_until_done([1, 2])
    run.finish()
    r1, r2 = run.progress.rounds[1], run.progress.rounds[2]
    assert r2["configured_at"] < r1["committed_at"]      # what the e2e test reads from status too
    assert r1["aggregated_at"] <= r2["started_at"]


def test_evaluators_take_the_evaluations_and_never_train(tmp_path):
    run = Run(tmp_path, [1, 2, 3], roles={1: "client", 2: "client", 3: EVALUATOR}, evaluate="clients")
    run.play_until_done([1, 2, 3])
    run.finish()
    assert run.seen[3] == [("evaluate", 0), ("evaluate", 1), ("evaluate", 2)]
    for node in (1, 2):
        assert run.seen[node] == [("train", 1), ("train", 2)]
    for r in run.progress.rounds:
        assert r["eval_loss"] == LOSS[3] and r["evals"][0]["clients"] == ["n3"] and r["evals"][0]["tokens"] == 50
    assert all(r["clients"] == ["n1", "n2"] for r in run.progress.rounds[1:])


def test_a_failed_commit_stops_the_driver(tmp_path):
    class Failing(Store):
        def commit_round(self, record, state):
            if record["round"] == 1:
                raise OSError("disk full")
            super().commit_round(record, state)

    run = Run(tmp_path, [1], store=Failing(tmp_path / "state"), evaluate="clients", rounds=3)
    run.play_until_done([1])
    with pytest.raises(OSError, match="disk full"):
        run.finish()
    assert [r["round"] for r in run.progress.rounds] == [0]
    assert not run.progress.done.is_set()


def test_evaluation_sampling_follows_fraction_and_minimum():
    class Nodes:
        def __init__(self, n):
            self.n = n

        def get_node_ids(self):
            return list(range(1, self.n + 1))

    arrays = ArrayRecord({"w": Array(np.zeros(2))})
    cfg = RunConfig(evaluate="clients", fraction_evaluate=0.5, min_evaluate_nodes=2)
    assert len(list(evaluation_strategy(cfg).configure_evaluate(1, arrays, ConfigRecord({}), Nodes(10)))) == 5
    assert len(list(evaluation_strategy(cfg).configure_evaluate(1, arrays, ConfigRecord({}), Nodes(3)))) == 2
    for bad, match in [(dict(evaluate="nope"), "--evaluate"), (dict(fraction_evaluate=0.0), "--fraction-evaluate"),
                       (dict(min_evaluate_nodes=0), "--min-evaluate-nodes"),
                       (dict(mode="swarm", evaluate="both"), "federated")]:
        with pytest.raises(ValueError, match=match):
            RunConfig(**bad).check()


# -- the wire: PushEval ----------------------------------------------------------------------------------------

def _service(tmp_path, identity: Identity | None = None):
    cfg = RunConfig(min_clients=1, evaluate="clients", eval_windows=4, seq_len=8)
    membership = Membership(60.0, on_lost=lambda cid, why: None)
    grid = SessionGrid(7, membership.live_ids)
    auth = Authenticator({identity.public_key: "c0"} if identity else None)
    service = CoordinatorService(cfg, "run", grid, membership, RunProgress(cfg, [{"round": 0}]),
                                 CoordinatorTimeouts(), auth=auth, state_dir=tmp_path)
    member, _ = membership.join("c0", "cpu", "fp32", public_key=identity.public_key if identity else b"")
    return service, grid, member, membership


def _task(service, grid, member, kind: str) -> tuple[list[str], pb.Task]:
    arrays = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})
    if kind == "evaluate":
        messages = evaluation_strategy(service.cfg).configure_evaluate(3, arrays, ConfigRecord({}), grid)
    else:
        messages = build_strategy(service.cfg).configure_train(3, arrays, ConfigRecord({}), grid)
    ids = list(grid.push_messages(messages))

    class Ctx:
        def cancelled(self):
            return False

    task = asyncio.run(service.pull_task(pb.PullTaskRequest(client_id=member.client_id, session_token=member.token,
                                                            wait_s=1), Ctx()))
    return ids, task


def _refused(service, req) -> str:
    with pytest.raises(Refused) as err:
        service.push_eval(req, None)
    return err.value.reason


def test_push_eval_is_bounded_checked_and_delivered_once(tmp_path):
    service, grid, member, membership = _service(tmp_path)
    try:
        ids, task = _task(service, grid, member, "evaluate")
        assert task.kind == pb.TASK_EVALUATE and task.round == 3
        ok = dict(client_id=member.client_id, session_token=member.token, task_id=task.task_id, round=3)
        for bad in [dict(loss=float("nan"), tokens=8), dict(loss=-1.0, tokens=8), dict(loss=1e9, tokens=8),
                    dict(loss=2.0, tokens=0), dict(loss=2.0, tokens=4 * 8 + 1)]:   # > --eval-windows x --seq-len
            assert _refused(service, pb.EvalResult(**ok, **bad)) == "bad_eval", bad
        assert _refused(service, pb.EvalResult(**{**ok, "session_token": "x"}, loss=2.0, tokens=8)) == "bad_session"
        assert _refused(service, pb.EvalResult(**{**ok, "task_id": "nope"}, loss=2.0, tokens=8)) == "task_closed"
        assert service.push_eval(pb.EvalResult(**ok, loss=2.5, tokens=32), None).accepted
        assert _refused(service, pb.EvalResult(**ok, loss=0.1, tokens=32)) == "replayed_update"
        (reply,) = grid.receive(ids, timeout=1)
        assert dict(reply.content["metrics"]) == {"eval_loss": 2.5, "num-examples": 32}
        # a training task takes no evaluation, an evaluation task no update
        _, train = _task(service, grid, member, "train")
        assert train.kind == pb.TASK_TRAIN
        assert _refused(service, pb.EvalResult(**{**ok, "task_id": train.task_id}, loss=2.0, tokens=8)) \
            == "wrong_task_kind"
        ids, task = _task(service, grid, member, "evaluate")
        header = pb.UpdateHeader(client_id=member.client_id, session_token=member.token, task_id=task.task_id,
                                 round=3, num_examples=1, train_loss=1.0, num_parts=1)
        with pytest.raises(Refused) as err:
            service.push_update(iter([pb.UpdateChunk(header=header).SerializeToString()]), None)
        assert err.value.reason == "wrong_task_kind"
        # a client that cannot evaluate says so: an error reply, so the round does not wait for it
        assert service.push_eval(pb.EvalResult(**{**ok, "task_id": task.task_id}, error="no held-out split"),
                                 None).accepted
        (reply,) = grid.receive(ids, timeout=1)
        assert reply.has_error() and reply.error.code == ERROR_REJECTED and "no held-out split" in reply.error.reason
    finally:
        membership.close()


def test_push_eval_is_signed_in_an_authenticated_run(tmp_path):
    ident = Identity(ed25519.Ed25519PrivateKey.generate())
    service, grid, member, membership = _service(tmp_path, ident)
    try:
        ids, task = _task(service, grid, member, "evaluate")
        outcome = work.EvalOutcome(2.0, 16, 0.1)
        args = dict(client_id=member.client_id, token=member.token, run_id="run", task=task)
        assert _refused(service, work.eval_result(outcome, **args)) == "bad_signature"   # unsigned
        forged = work.eval_result(outcome, **args, identity=ident)
        forged.loss = 0.5                                                             # altered after signing
        assert _refused(service, forged) == "bad_signature"
        other = Identity(ed25519.Ed25519PrivateKey.generate())
        assert _refused(service, work.eval_result(outcome, **args, identity=other)) == "bad_signature"
        assert service.push_eval(work.eval_result(outcome, **args, identity=ident), None).accepted
        (reply,) = grid.receive(ids, timeout=1)
        assert reply.content["metrics"]["eval_loss"] == 2.0
    finally:
        membership.close()


def test_metrics_carry_each_sources_loss_and_tokens(tmp_path):
    from prometheus_client import generate_latest

    from fedswarm.metrics import coordinator_registry

    service, grid, member, membership = _service(tmp_path)
    try:
        evals = [{"source": "central", "loss": 2.5, "tokens": 4096, "seconds": 0.2},
                 {"source": "clients", "loss": 2.25, "tokens": 8192, "clients": ["c0", "c1"], "failures": 0}]
        with service.progress.lock:
            service.progress.rounds = [{"round": 0, "eval_loss": 2.5, "train_loss": None, "clients": [], "bytes_up": 0,
                                        "bytes_up_raw": 0, "seconds": 0.0, "tokens": 0, "eval_source": "central",
                                        "evals": evals}]
        text = generate_latest(coordinator_registry(service.status_dict)).decode()
    finally:
        membership.close()
    assert 'fedswarm_round_eval_loss{source="clients"} 2.25' in text
    assert 'fedswarm_round_eval_tokens{source="central"} 4096.0' in text


def test_an_evaluator_is_refused_by_a_run_that_evaluates_centrally(tmp_path):
    cfg = RunConfig(min_clients=1)   # --evaluate central
    membership = Membership(60.0, on_lost=lambda cid, why: None)
    service = CoordinatorService(cfg, "run", SessionGrid(7, membership.live_ids), membership,
                                 RunProgress(cfg, []), CoordinatorTimeouts(), state_dir=tmp_path)
    try:
        with pytest.raises(Refused) as err:
            service.join(pb.JoinRequest(name="judge", device="cpu", precision="fp32", role="evaluator"), None)
        assert err.value.reason == "bad_role" and "--evaluate clients" in err.value.detail
        assert membership.snapshot() == []
    finally:
        membership.close()
