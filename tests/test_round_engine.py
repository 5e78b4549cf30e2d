"""The one round engine in both modes: rounds that bring nothing usable back off and fail the run after
--max-failed-rounds (federated: one cohort; swarm: one cohort per stage), and a stage whose round raises is a
failure of that epoch while the other stages are averaged and committed.

In-process: the real RoundDriver / SwarmDriver, SessionGrid, SwarmRegistry, Store and Flower strategies, with
a real (tiny) model for the swarm's evaluation; the test plays the nodes (take_task / deliver_reply)."""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedswarm.coordinator.aggregate import task_round
from fedswarm.coordinator.config import CoordinatorTimeouts
from fedswarm.run_config import RunConfig
from fedswarm.coordinator.driver import RoundDriver, RunFailed, RunProgress
from fedswarm.coordinator.grid import SessionGrid
from fedswarm.coordinator.store import Store
from fedswarm.coordinator.strategies import build_strategy
from fedswarm.coordinator.swarm_driver import SwarmDriver
from fedswarm.coordinator.swarm_registry import SwarmRegistry
from fedswarm.proto.run_state import RunState
from fedswarm.workers import run_each

pytestmark = pytest.mark.usefixtures("task_identity")   # tests/conftest.py
FAST_FAIL = dict(round_timeout_s=0.3, max_failed_rounds=3, failed_round_backoff_s=0.01,
                 failed_round_backoff_max_s=0.01)


class Nodes:
    """Plays nodes on a SessionGrid until stopped: `answer(node, msg)` gives a reply's content, or None to
    take the task and never answer it. `seen` lists (node, message type, round) of every task taken."""

    def __init__(self, grid: SessionGrid, nodes: list[int], answer=lambda node, msg: None):
        self.grid, self.nodes, self.answer = grid, nodes, answer
        self.seen: list[tuple[int, str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._play, daemon=True)
        self.thread.start()

    def _play(self) -> None:
        while not self.stop.is_set():
            for node in self.nodes:
                msg = self.grid.take_task(node, wait_s=0.02)
                if msg is None:
                    continue
                self.seen.append((node, msg.metadata.message_type, task_round(msg)))
                content = self.answer(node, msg)
                if content is not None:
                    assert self.grid.deliver_reply(msg.metadata.message_id, node, content)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def trained(self) -> list[tuple[int, int]]:
        return [(node, rnd) for node, kind, rnd in self.seen if kind == MessageType.TRAIN]


@pytest.fixture(scope="module")
def tiny():
    """A real gpt2-tiny cut in two stages, its trainable state and a few eval windows."""
    from fedswarm.models import trainable_state
    from fedswarm.stages import build_untied_model, stage_param_names

    cfg = RunConfig(mode="swarm", stages=2)
    model = build_untied_model(cfg.model, seed=cfg.seed)
    names = [stage_param_names(cfg.model, s, 2) for s in range(2)]
    windows = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    return model, names, trainable_state(model), windows


def swarm_driver(tmp_path, tiny, timeouts: CoordinatorTimeouts, sync_timeout_s: float, rounds: int = 2,
                 peers: int = 2, **cfg):
    """A SwarmDriver over a SessionGrid whose peers 1, 2, 3 ... serve stages 0, 1, 0 ..."""
    model, names, _, windows = tiny
    cfg = RunConfig(mode="swarm", stages=2, rounds=rounds, average_every=1, **cfg)
    registry = SwarmRegistry(2)
    assert [registry.assign(p, f"p{p}") for p in range(1, peers + 1)] == [(p - 1) % 2 for p in range(1, peers + 1)]
    grid = SessionGrid(7, live_nodes=lambda: list(range(1, peers + 1)))
    driver = SwarmDriver(cfg, grid, registry, Store(tmp_path / "state"), names, model, windows,
                         RunProgress(cfg, []), sync_timeout_s=sync_timeout_s, epoch_max_s=0.05, timeouts=timeouts)
    return driver, grid


@pytest.mark.timeout(60)
def test_a_federated_run_fails_after_max_failed_rounds(tmp_path):
    cfg = RunConfig(rounds=2, min_clients=1, local_steps=1, evaluate="clients")
    grid, store, progress = SessionGrid(7, live_nodes=lambda: [1]), Store(tmp_path / "state"), RunProgress(cfg, [])
    driver = RoundDriver(cfg, grid, build_strategy(cfg), store, None, None, progress, round_timeout_s=0.3,
                         timeouts=CoordinatorTimeouts(**FAST_FAIL))
    mute = Nodes(grid, [1])   # takes every task, answers none
    try:
        with pytest.raises(RunFailed, match=r"round 1 brought no usable reply 3 times in a row"):
            driver.run({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
    finally:
        mute.close()
    assert progress.state == RunState.FAILED and not progress.done.is_set()
    assert mute.trained() == [(1, 1)] * 3
    assert store.last_round() == 0 and [r["round"] for r in progress.rounds] == [0]
    store.close()


@pytest.mark.timeout(60)
def test_a_swarm_run_fails_after_max_failed_rounds(tmp_path, tiny):
    driver, grid = swarm_driver(tmp_path, tiny, CoordinatorTimeouts(**FAST_FAIL), sync_timeout_s=0.3)
    mute = Nodes(grid, [1, 2])   # both stages' replicas take their sync tasks and never answer
    try:
        with pytest.raises(RunFailed, match=r"round 1 brought no usable reply 3 times in a row"):
            driver.run(dict(tiny[2]))
    finally:
        mute.close()
    assert driver.progress.state == RunState.FAILED and not driver.progress.done.is_set()
    assert sorted(mute.trained()) == [(1, 1)] * 3 + [(2, 1)] * 3
    assert driver.store.last_round() == 0 and [r["round"] for r in driver.progress.rounds] == [0]
    driver.store.close()


def progress_reply(node: int, msg: Message, num_examples: int | None = 64) -> RecordDict:
    """A replica's sync reply: its stage's average + 0.5 (without `num-examples` if None)."""
    arrays = ArrayRecord({k: Array(a.numpy() + 0.5) for k, a in msg.content["arrays"].items()})
    metrics = {"train_loss": 1.0, "bytes-up": 100, "bytes-up-raw": 400, "bytes-down": 50}
    if num_examples is not None:
        metrics["num-examples"] = num_examples
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "client": ConfigRecord({"name": f"p{node}"})})


@pytest.mark.timeout(60)
def test_a_stage_that_raises_is_a_failure_and_the_other_stage_is_averaged(tmp_path, tiny, caplog):
    def answer(node: int, msg: Message) -> RecordDict:
        """Stage 1's replica answers without `num-examples`, which Flower's FedAvg refuses to aggregate (it
        raises)."""
        return progress_reply(node, msg, 64 if node == 1 else None)

    driver, grid = swarm_driver(tmp_path, tiny, CoordinatorTimeouts(max_failed_rounds=3), sync_timeout_s=30,
                                rounds=1)
    initial = tiny[2]
    nodes = Nodes(grid, [1, 2], answer)
    try:
        with caplog.at_level(logging.ERROR, logger="fedswarm.workers"):
            driver.run(dict(initial))
    finally:
        nodes.close()
    assert driver.progress.state == RunState.DONE
    assert sorted(nodes.trained()) == [(1, 1), (2, 1)]   # one attempt: the epoch counted (stage 0 averaged)
    stage0, stage1 = (driver.stage_state(s) for s in (0, 1))
    assert all(np.allclose(stage0[k].numpy(), initial[k].numpy() + 0.5) for k in stage0)
    assert all(torch.equal(stage1[k], initial[k]) for k in stage1)   # stage 1 keeps its average
    record = driver.store.rounds()[-1]
    driver.store.close()
    assert record["round"] == 1 and record["failures"] == 1 and record["clients"] == ["p1"]
    assert record["bytes_up"] == 100 and record["bytes_down"] == 50 and record["tokens"] == 64
    (error,) = record["errors"]
    assert error.startswith("stage 1: InconsistentMessageReplies"), error
    assert any("round 1: stage 1 failed" in r.getMessage() and r.exc_info for r in caplog.records), caplog.text


@pytest.mark.timeout(60)
def test_a_swarm_resumes_its_stages_and_their_strategy_state_from_a_checkpoint(tmp_path, tiny):
    """A checkpoint as swarm mode writes it: the whole model plus each stage's FedAvgM momentum under
    strategy/stageN/."""
    model, names, initial, windows = tiny
    cfg = RunConfig(mode="swarm", stages=2, rounds=1, strategy="fedavgm")
    store = Store(tmp_path / "state")
    momentum = {f"strategy/stage{s}/momentum_vector/{k}": torch.full_like(initial[k], s + 1.0)
                for s in (0, 1) for k in names[s]}
    store.commit_round({"round": 1, "eval_loss": 1.0, "clients": []},
                       {**{k: v + 1 for k, v in initial.items()}, **momentum})
    driver = SwarmDriver(cfg, SessionGrid(7, live_nodes=list), SwarmRegistry(2), store, names, model, windows,
                         RunProgress(cfg, store.rounds()))
    driver.run(dict(initial))   # round 1 of 1 is committed: it loads, restores and is done
    assert driver.progress.state == RunState.DONE
    for s in (0, 1):
        restored = driver.cohorts[s].strategy.momentum_vector
        assert len(restored) == len(names[s]) and all(np.all(np.asarray(v) == s + 1.0) for v in restored)
        assert all(torch.equal(v, initial[k] + 1) for k, v in driver.stage_state(s).items())
    store.close()


@pytest.mark.timeout(60)
def test_each_stage_samples_its_replicas_alike_in_a_run_and_its_rerun(tmp_path, tiny):
    """Two of each stage's three replicas per epoch (--clients-per-round 2), drawn from a stream seeded by the
    run's seed, the epoch and the stage: the same draw however the stages' threads interleave."""
    draws = []
    for attempt in range(2):
        driver, grid = swarm_driver(tmp_path / str(attempt), tiny, CoordinatorTimeouts(), sync_timeout_s=30,
                                    rounds=1, peers=6, clients_per_round=2)
        nodes = Nodes(grid, list(range(1, 7)), progress_reply)
        try:
            driver.run(dict(tiny[2]))
        finally:
            nodes.close()
        driver.store.close()
        draws.append(sorted(nodes.trained()))
    assert len(draws[0]) == 4 and {node % 2 for node, _ in draws[0]} == {0, 1}   # two from each stage
    assert draws[0] == draws[1]


def test_run_each_keeps_each_jobs_outcome():
    def boom():
        raise ValueError("job 1 broke")

    first, second, third = run_each([lambda: 1, boom, lambda: 3], ["a", "b", "c"])
    assert (first.value, first.error, third.value) == (1, None, 3)
    assert isinstance(second.error, ValueError) and second.value is None
