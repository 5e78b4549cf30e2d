"""Our SessionGrid drives real Flower strategies to the same aggregate as flwr's own functions.

The Grid is the class under test; the test plays the client nodes in-process
(take_task / deliver_reply are what the gRPC service calls). The networked path
is covered by the end-to-end tests.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from fedswarm.run_config import RunConfig
from fedswarm.coordinator.grid import ERROR_NODE_LOST, SessionGrid
from fedswarm.coordinator.strategies import STRATEGIES, build_strategy

RUN_ID = 0x5EED_F00D
NODES = [101, 202, 303]
NUM_EXAMPLES = {101: 10, 202: 30, 303: 60, 404: 20, 505: 40}
SHAPES = {"w": (3, 4), "b": (4,)}


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's Message reads the sender's identity from TaskIdentity (as coordinator/main.py sets it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# -- helpers ---------------------------------------------------------------------------------

def node_arrays(node: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Known float64 arrays for one node (distinct per node and seed)."""
    rng = np.random.default_rng([node, seed])
    return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def start_arrays() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s)) for k, s in SHAPES.items()})


def reply_content(arrays: dict[str, np.ndarray], node: int) -> RecordDict:
    """What a node answers: fresh records each call (some strategies pop from the replies)."""
    return RecordDict({
        "arrays": ArrayRecord({k: Array(np.array(v, dtype=np.float64)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": NUM_EXAMPLES[node], "train_loss": float(node) / 100}),
    })


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


class StrategyThread(threading.Thread):
    """The coordinator side: configure_train -> grid.send_and_receive -> aggregate_train, per round."""

    def __init__(self, strategy: Strategy, grid: SessionGrid, arrays: ArrayRecord, rounds: int = 1,
                 timeout: float = 30.0):
        super().__init__(daemon=True)
        self.strategy, self.grid, self.arrays, self.rounds, self.timeout = strategy, grid, arrays, rounds, timeout
        self.sent: list[list[Message]] = []
        self.replies: list[list[Message]] = []
        self.results: list[tuple[ArrayRecord | None, MetricRecord | None]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            arrays = self.arrays
            for rnd in range(1, self.rounds + 1):
                msgs = list(self.strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), self.grid))
                self.sent.append(msgs)
                replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
                self.replies.append(replies)
                result = self.strategy.aggregate_train(rnd, replies)
                self.results.append(result)
                arrays = result[0]
        except BaseException as err:  # surfaced in the main thread
            self.error = err

    def finish(self) -> None:
        self.join(timeout=60)
        assert not self.is_alive(), "strategy thread did not finish"
        if self.error is not None:
            raise self.error


def play_node(grid: SessionGrid, node: int, answer) -> Message:
    """Take this node's next instruction and answer it with answer(instruction_arrays)."""
    msg = grid.take_task(node, wait_s=10)
    assert msg is not None, f"node {node} got no instruction"
    assert msg.metadata.dst_node_id == node
    assert msg.metadata.message_type == MessageType.TRAIN
    ok = grid.deliver_reply(msg.metadata.message_id, node, reply_content(answer(as_numpy(msg.content["arrays"])), node))
    assert ok
    return msg


def run_through_grid(strategy: Strategy, answers, nodes=NODES, rounds: int = 1) -> StrategyThread:
    """answers(node, round, instruction_arrays) -> the node's arrays; every node answers every round."""
    grid = SessionGrid(RUN_ID, live_nodes=lambda: list(nodes))
    thread = StrategyThread(strategy, grid, start_arrays(), rounds=rounds)
    thread.start()
    for rnd in range(1, rounds + 1):
        for node in nodes:
            play_node(grid, node, lambda arrays, node=node, rnd=rnd: answers(node, rnd, arrays))
    thread.finish()
    grid.close()
    assert grid.open_count() == 0
    for sent, replies in zip(thread.sent, thread.replies):
        assert sorted(m.metadata.dst_node_id for m in sent) == sorted(nodes)
        assert len(replies) == len(nodes) and not any(r.has_error() for r in replies)
        assert {r.metadata.reply_to_message_id for r in replies} == {m.metadata.message_id for m in sent}
    return thread


def direct_replies(order: list[int], rnd_arrays: ArrayRecord, answers, rnd: int) -> list[Message]:
    """Replies built with plain Message(content, reply_to=instruction): no Grid involved."""
    replies = []
    for node in order:
        instruction = Message(RecordDict({"arrays": rnd_arrays, "config": ConfigRecord({"lr": 0.1})}),
                              dst_node_id=node, message_type=MessageType.TRAIN)
        content = reply_content(answers(node, rnd, as_numpy(rnd_arrays)), node)
        replies.append(Message(content, reply_to=instruction))
    return replies


def assert_records_close(a: ArrayRecord, b: ArrayRecord, rtol=1e-12, atol=1e-14) -> None:
    assert list(a.keys()) == list(b.keys())
    for k in a.keys():
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=rtol, atol=atol, err_msg=k)


def fixed(node, rnd, arrays):
    return node_arrays(node)


# -- FedAvg ----------------------------------------------------------------------------------

def test_fedavg_matches_flower_and_weighted_mean():
    thread = run_through_grid(build_strategy(RunConfig(strategy="fedavg", min_clients=3)), fixed)
    arrays, metrics = thread.results[0]

    # Flower's own aggregation on the same reply contents.
    flower = aggregate_arrayrecords([reply_content(node_arrays(n), n) for n in NODES], "num-examples")
    assert_records_close(arrays, flower, rtol=1e-12)

    # By hand: sum(n_i x_i) / sum(n_i).
    total = sum(NUM_EXAMPLES[n] for n in NODES)
    for k in SHAPES:
        expect = sum(NUM_EXAMPLES[n] * node_arrays(n)[k] for n in NODES) / total
        np.testing.assert_allclose(arrays[k].numpy(), expect, rtol=1e-12)
        # weighting matters: the plain mean is something else
        assert not np.allclose(arrays[k].numpy(), np.mean([node_arrays(n)[k] for n in NODES], axis=0))
    expect_loss = sum(NUM_EXAMPLES[n] * n / 100 for n in NODES) / total
    assert metrics["train_loss"] == pytest.approx(expect_loss, rel=1e-12)

    # every node was sent the start weights and the round number
    for msg in thread.sent[0]:
        assert msg.content["config"]["server-round"] == 1
        for k, v in as_numpy(msg.content["arrays"]).items():
            np.testing.assert_array_equal(v, np.zeros(SHAPES[k]))


# -- robust strategies: our Grid vs. a direct call, and the math -----------------------------

def _grid_vs_direct(name: str, nodes: list[int]):
    thread = run_through_grid(build_strategy(RunConfig(strategy=name, min_clients=len(nodes))), fixed, nodes=nodes)
    order = [r.metadata.src_node_id for r in thread.replies[0]]
    assert sorted(order) == sorted(nodes)
    direct = build_strategy(RunConfig(strategy=name, min_clients=len(nodes)))
    direct_arrays, direct_metrics = direct.aggregate_train(1, direct_replies(order, start_arrays(), fixed, 1))
    grid_arrays, grid_metrics = thread.results[0]
    assert_records_close(grid_arrays, direct_arrays, rtol=0, atol=0)
    assert grid_metrics["train_loss"] == pytest.approx(direct_metrics["train_loss"], rel=1e-12)
    stacked = {k: np.stack([node_arrays(n)[k] for n in nodes]) for k in SHAPES}
    return grid_arrays, stacked


def test_fedmedian_is_elementwise_median():
    arrays, stacked = _grid_vs_direct("fedmedian", NODES)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k].numpy(), np.median(stacked[k], axis=0), rtol=1e-12)
        assert not np.allclose(arrays[k].numpy(), stacked[k].mean(axis=0))


def test_fedtrimmedavg_drops_extremes():
    # The table's beta=0.2 trims int(0.2 * n) replies at each end: with 5 nodes, the min and the max.
    nodes = [101, 202, 303, 404, 505]
    arrays, stacked = _grid_vs_direct("fedtrimmedavg", nodes)
    for k in SHAPES:
        middle = np.sort(stacked[k], axis=0)[1:-1].mean(axis=0)
        np.testing.assert_allclose(arrays[k].numpy(), middle, rtol=1e-12)
        assert not np.allclose(arrays[k].numpy(), stacked[k].mean(axis=0))


def test_krum_picks_one_input_not_the_outlier():
    outlier = 303

    def answers(node, rnd, arrays):
        a = node_arrays(node)
        if node == outlier:
            return {k: v + 100.0 for k, v in a.items()}
        return {k: 0.01 * v for k, v in a.items()}  # the honest two sit close together

    thread = run_through_grid(build_strategy(RunConfig(strategy="krum", min_clients=3)), answers)
    order = [r.metadata.src_node_id for r in thread.replies[0]]
    direct, _ = build_strategy(RunConfig(strategy="krum", min_clients=3)).aggregate_train(
        1, direct_replies(order, start_arrays(), answers, 1))
    arrays = thread.results[0][0]
    assert_records_close(arrays, direct, rtol=0, atol=0)
    picked = [n for n in NODES if all(np.array_equal(arrays[k].numpy(), answers(n, 1, None)[k]) for k in SHAPES)]
    assert len(picked) == 1 and picked[0] != outlier
    assert thread.results[0][1]["train_loss"] == pytest.approx(picked[0] / 100)


# -- stateful strategies: two rounds, Grid vs. a second instance called directly -------------

def drifting(node, rnd, arrays):
    """Each node returns the weights it was sent plus its own per-round step."""
    step = node_arrays(node, seed=rnd)
    return {k: arrays[k] + 0.1 * step[k] for k in SHAPES}


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_stateful_strategy_two_rounds_match_direct(name):
    cfg = RunConfig(strategy=name, min_clients=3)
    thread = run_through_grid(build_strategy(cfg), drifting, rounds=2)

    direct = build_strategy(cfg)
    helper_grid = SessionGrid(RUN_ID, live_nodes=lambda: list(NODES))  # only answers get_node_ids here
    arrays = start_arrays()
    for rnd in (1, 2):
        sent = list(direct.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), helper_grid))
        assert len(sent) == 3 and helper_grid.open_count() == 0  # nothing was pushed
        # the Grid path sent the same weights this round
        grid_sent = as_numpy(thread.sent[rnd - 1][0].content["arrays"])
        for k in SHAPES:
            np.testing.assert_allclose(grid_sent[k], arrays[k].numpy(), rtol=1e-12, atol=1e-15)
        order = [r.metadata.src_node_id for r in thread.replies[rnd - 1]]
        arrays, _ = direct.aggregate_train(rnd, direct_replies(order, arrays, drifting, rnd))
        assert_records_close(thread.results[rnd - 1][0], arrays, rtol=1e-12, atol=1e-15)

    # and the server optimizer really acted: round 2 is not the plain weighted mean of the replies
    r2_in = as_numpy(thread.sent[1][0].content["arrays"])
    total = sum(NUM_EXAMPLES[n] for n in NODES)
    plain = {k: sum(NUM_EXAMPLES[n] * drifting(n, 2, r2_in)[k] for n in NODES) / total for k in SHAPES}
    final = as_numpy(thread.results[1][0])
    assert not all(np.allclose(final[k], plain[k]) for k in SHAPES)


def test_fedavgm_momentum_by_hand():
    # Table: server_learning_rate 1.0, server_momentum 0.5.  x1 = avg1; x2 = x1 - (0.5*(x0-avg1) + (x1-avg2)).
    thread = run_through_grid(build_strategy(RunConfig(strategy="fedavgm", min_clients=3)), drifting, rounds=2)
    total = sum(NUM_EXAMPLES[n] for n in NODES)

    def avg(rnd, sent):
        return {k: sum(NUM_EXAMPLES[n] * drifting(n, rnd, sent)[k] for n in NODES) / total for k in SHAPES}

    x0 = {k: np.zeros(s) for k, s in SHAPES.items()}
    avg1 = avg(1, x0)
    x1 = as_numpy(thread.results[0][0])
    avg2 = avg(2, x1)
    x2 = as_numpy(thread.results[1][0])
    for k in SHAPES:
        np.testing.assert_allclose(x1[k], avg1[k], rtol=1e-12)
        np.testing.assert_allclose(x2[k], x1[k] - (0.5 * (x0[k] - avg1[k]) + (x1[k] - avg2[k])), rtol=1e-10)


# -- failures --------------------------------------------------------------------------------

def test_lost_node_gives_error_reply_and_fedavg_uses_the_rest():
    grid = SessionGrid(RUN_ID, live_nodes=lambda: list(NODES))
    thread = StrategyThread(FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3), grid,
                            start_arrays())
    thread.start()
    silent = NODES[2]
    for node in NODES[:2]:
        play_node(grid, node, lambda arrays, node=node: node_arrays(node))
    lost_msg = grid.take_task(silent, wait_s=10)  # it takes the task, then goes quiet
    assert lost_msg is not None
    assert grid.fail_node(silent, "lost") == 1
    thread.finish()

    replies = thread.replies[0]
    assert len(replies) == 3
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 1
    assert errors[0].metadata.src_node_id == silent
    assert errors[0].error.code == ERROR_NODE_LOST and errors[0].error.reason == "lost"
    assert errors[0].metadata.reply_to_message_id == lost_msg.metadata.message_id

    arrays, _ = thread.results[0]
    ok = NODES[:2]
    total = sum(NUM_EXAMPLES[n] for n in ok)
    for k in SHAPES:
        expect = sum(NUM_EXAMPLES[n] * node_arrays(n)[k] for n in ok) / total
        np.testing.assert_allclose(arrays[k].numpy(), expect, rtol=1e-12)

    # a late answer from the lost node is refused
    assert not grid.deliver_reply(lost_msg.metadata.message_id, silent, reply_content(node_arrays(silent), silent))
    assert grid.open_count() == 0 and grid.fail_node(silent, "again") == 0


def test_bad_replies_are_refused_and_change_nothing():
    grid = SessionGrid(RUN_ID, live_nodes=lambda: list(NODES))
    thread = StrategyThread(build_strategy(RunConfig(strategy="fedavg", min_clients=3)), grid, start_arrays())
    thread.start()
    a, b, c = NODES
    msg_a = grid.take_task(a, wait_s=10)
    assert msg_a is not None
    open_before = grid.open_count()
    assert open_before == 3
    poison = reply_content({k: np.full(s, 1e6) for k, s in SHAPES.items()}, b)

    assert not grid.deliver_reply("0" * 32, a, poison)                          # no such message
    assert not grid.deliver_reply(msg_a.metadata.message_id, b, poison)         # a's task, b answers
    assert grid.open_instruction(msg_a.metadata.message_id, b) is None
    assert grid.open_count() == open_before and grid.is_open(msg_a.metadata.message_id)
    assert grid.pull_messages([msg_a.metadata.message_id]) == []

    assert grid.deliver_reply(msg_a.metadata.message_id, a, reply_content(node_arrays(a), a))
    assert not grid.deliver_reply(msg_a.metadata.message_id, a, poison)         # answered already
    for node in (b, c):
        play_node(grid, node, lambda arrays, node=node: node_arrays(node))
    thread.finish()

    arrays, _ = thread.results[0]
    total = sum(NUM_EXAMPLES[n] for n in NODES)
    for k in SHAPES:
        expect = sum(NUM_EXAMPLES[n] * node_arrays(n)[k] for n in NODES) / total
        np.testing.assert_allclose(arrays[k].numpy(), expect, rtol=1e-12)


def test_push_to_node_not_live_gets_immediate_error():
    live = [101, 202]
    grid = SessionGrid(RUN_ID, live_nodes=lambda: list(live))
    gone = 999
    msgs = [grid.create_message(RecordDict({"arrays": start_arrays()}), MessageType.TRAIN, node, "1")
            for node in (101, gone)]
    start = time.monotonic()
    ids = list(grid.push_messages(msgs))
    assert len(ids) == 2 and len(set(ids)) == 2
    # the dead node's reply is there at once; the live node's task is queued
    [err] = grid.pull_messages(ids)
    assert err.has_error() and err.error.code == ERROR_NODE_LOST
    assert err.metadata.reply_to_message_id == ids[1] and err.metadata.src_node_id == gone
    assert grid.take_task(gone, wait_s=0) is None
    assert not grid.is_open(ids[1]) and grid.is_open(ids[0])

    # send_and_receive to only a dead node returns without waiting for the timeout
    replies = list(grid.send_and_receive(
        [grid.create_message(RecordDict(), MessageType.TRAIN, gone, "2")], timeout=30))
    assert time.monotonic() - start < 10
    assert len(replies) == 1 and replies[0].has_error()
    assert grid.take_task(101, wait_s=1).metadata.message_id == ids[0]


def test_send_and_receive_timeout_drops_unanswered():
    grid = SessionGrid(RUN_ID, live_nodes=lambda: [101])
    msg = grid.create_message(RecordDict(), MessageType.TRAIN, 101, "1")
    replies = list(grid.send_and_receive([msg], timeout=0.2))
    assert replies == []
    assert grid.open_count() == 0 and grid.take_task(101, wait_s=0) is None
    assert not grid.deliver_reply(msg.metadata.message_id, 101, RecordDict())


def test_take_task_returns_none_after_close():
    grid = SessionGrid(RUN_ID, live_nodes=lambda: [101])
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(grid.take_task(101, wait_s=30)), daemon=True)
    waiter.start()
    start = time.monotonic()
    grid.close()
    waiter.join(timeout=10)
    assert not waiter.is_alive() and got == [None]
    assert time.monotonic() - start < 10
    # even with work queued, a closed grid hands nothing out
    grid.push_messages([grid.create_message(RecordDict(), MessageType.TRAIN, 101, "1")])
    assert grid.open_count() == 1
    assert grid.take_task(101, wait_s=1) is None


def test_requeue_hands_open_task_out_again():
    grid = SessionGrid(RUN_ID, live_nodes=lambda: [101])
    [mid] = grid.push_messages([grid.create_message(RecordDict(), MessageType.TRAIN, 101, "1")])
    assert grid.take_task(101, wait_s=1).metadata.message_id == mid
    assert grid.take_task(101, wait_s=0) is None
    grid.requeue_for(101)
    assert grid.take_task(101, wait_s=1).metadata.message_id == mid


# -- the real strategies table ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_build_strategy_every_name_aggregates_through_grid(name):
    cfg = RunConfig(strategy=name, min_clients=2)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, Strategy)
    assert strategy.min_train_nodes == 2 and strategy.min_available_nodes == 2
    assert strategy.fraction_train == 1.0 and strategy.fraction_evaluate == 0.0
    nodes = [101, 202]
    grid = SessionGrid(RUN_ID, live_nodes=lambda: list(nodes))
    assert list(strategy.configure_evaluate(1, start_arrays(), ConfigRecord(), grid)) == []

    same = {k: np.arange(np.prod(s), dtype=np.float64).reshape(s) - 3.0 for k, s in SHAPES.items()}
    thread = run_through_grid(strategy, lambda node, rnd, arrays: same, nodes=nodes)
    sent, (arrays, metrics) = thread.sent[0], thread.results[0]
    if name == "fedprox":
        assert all(m.content["config"]["proximal-mu"] == cfg.proximal_mu for m in sent)
    if name == "krum":  # Krum keeps the one selected reply, its metrics included
        assert metrics["train_loss"] in [pytest.approx(n / 100) for n in nodes]
    else:
        assert metrics["train_loss"] == pytest.approx(sum(NUM_EXAMPLES[n] * n / 100 for n in nodes)
                                                      / sum(NUM_EXAMPLES[n] for n in nodes))
    out = as_numpy(arrays)
    assert set(out) == set(SHAPES)
    if name == "fedadam":
        # a server-side Adam step from zero toward the (unanimous) replies: it moves by about eta per element
        for k in SHAPES:
            moved = out[k]
            assert np.all(np.sign(moved[same[k] != 0]) == np.sign(same[k][same[k] != 0]))
            assert np.all(np.abs(moved) < np.abs(same[k]) + 1e-12)
    elif name == "diloco":
        # the first Nesterov outer step from zero: g = 0 - same, m = g, w = 0 - lr * (g + mu * m)
        for k in SHAPES:
            np.testing.assert_allclose(out[k], 0.7 * (1 + 0.9) * same[k], rtol=1e-12)
    else:
        # every other strategy returns unanimous replies unchanged
        for k in SHAPES:
            np.testing.assert_allclose(out[k], same[k], rtol=1e-12)


def test_build_strategy_unknown_name():
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy(RunConfig(strategy="fedsgd"))
