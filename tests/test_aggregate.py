"""Bounded-memory aggregation gives what Flower's own aggregation gives on the same replies.

Updates go through the real SessionGrid.deliver_update (what the gRPC service calls)
with the folding / spilling sinks; the reference is Flower's stock strategy (or
aggregate_arrayrecords) over replies that each hold their full weights.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as S
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedswarm.coordinator.aggregate import DecodedUpdate, FoldedArrays, FoldUpdates, HoldEveryUpdate, MeanFold
from fedswarm.run_config import RunConfig
from fedswarm.coordinator.grid import SessionGrid
from fedswarm.coordinator.spill import MappedArray, SpillKrum, SpillUpdates
from fedswarm.coordinator.strategies import DiLoCo, build_strategy, sampling
from fedswarm.coordinator.strategy_state import export_state, import_state

SHAPES = {"wte": (7, 5), "h.0.w": (5, 5), "h.0.b": (5,), "ln.g": (5,)}
NODES = [11, 22, 33, 44]
EXAMPLES = {11: 3, 22: 40, 33: 17, 44: 100}   # deliberately unequal weights


pytestmark = pytest.mark.usefixtures("task_identity")   # tests/conftest.py


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def delta_of(node: int, rnd: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rnd + node)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def as_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


def metrics(node: int) -> MetricRecord:
    return MetricRecord({"num-examples": EXAMPLES[node], "train_loss": node / 10, "bytes-up": 1, "bytes-up-raw": 4})


def held_reply(instruction: Message, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], node: int) -> Message:
    content = HoldEveryUpdate().content(instruction, None, DecodedUpdate(base, delta, metrics(node), ConfigRecord({"name": str(node)})))
    return Message(content, reply_to=instruction)


def rounds_through_grid(strategy, sink, rounds: int, start: ArrayRecord) -> list[ArrayRecord]:
    """configure_train -> deliver_update per node (from a helper thread) -> aggregate_train."""
    grid = SessionGrid(7, live_nodes=lambda: list(NODES), updates=sink)
    arrays, out = start, []
    for rnd in range(1, rounds + 1):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), grid))
        base = as_state(arrays)

        def answer(rnd=rnd, base=base):
            for node in NODES:
                task = grid.take_task(node, wait_s=10)
                update = DecodedUpdate(base, delta_of(node, rnd), metrics(node), ConfigRecord({"name": str(node)}))
                assert grid.deliver_update(task.metadata.message_id, node, update)
        helper = threading.Thread(target=answer)
        helper.start()
        replies = list(grid.send_and_receive(msgs, timeout=30))
        helper.join()
        assert len(replies) == len(NODES)
        arrays, _ = strategy.aggregate_train(rnd, replies)
        sink.release_round(rnd)
        out.append(arrays)
    return out


def rounds_direct(strategy, rounds: int, start: ArrayRecord) -> list[ArrayRecord]:
    """The stock path: each reply holds its full weights; no grid, no folding."""
    arrays, out = start, []
    for rnd in range(1, rounds + 1):

        class Direct:  # the only Grid methods configure_train uses
            def get_node_ids(self):
                return list(NODES)
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), Direct()))
        base = as_state(arrays)
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        replies = [held_reply(by_node[n], base, delta_of(n, rnd), n) for n in NODES]
        arrays, _ = strategy.aggregate_train(rnd, replies)
        out.append(arrays)
    return out


def assert_close(a: ArrayRecord, b: ArrayRecord, rtol=2e-6, atol=2e-6) -> None:
    assert list(a.keys()) == list(b.keys())
    for k in a.keys():
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=rtol, atol=atol, err_msg=k)


def start_record() -> ArrayRecord:
    return ArrayRecord(torch_state_dict=model(0))


def test_fold_equals_aggregate_arrayrecords():
    base = model(0)
    fold = MeanFold(ArrayRecord(torch_state_dict=base))
    contents, weights = [], {}
    instruction = Message(RecordDict({"arrays": fold.base}), dst_node_id=1, message_type=MessageType.TRAIN)
    for i, node in enumerate(NODES):
        d = delta_of(node, 1)
        fold.add(f"task-{i}", d, EXAMPLES[node])
        weights[f"task-{i}"] = EXAMPLES[node]
        contents.append(held_reply(instruction, base, d, node).content)
    assert_close(fold.mean(weights), aggregate_arrayrecords(contents, "num-examples"))
    with pytest.raises(Exception, match="already taken"):
        fold.mean(weights)


def test_fold_refuses_replies_it_did_not_fold():
    fold = MeanFold(ArrayRecord(torch_state_dict=model(0)))
    fold.add("a", delta_of(11, 1), 3)
    fold.add("b", delta_of(22, 1), 40)
    with pytest.raises(ValueError, match="already folded"):
        fold.add("a", delta_of(11, 1), 3)
    with pytest.raises(Exception, match="differ"):
        fold.mean({"a": 3.0})


@pytest.mark.parametrize("name, stock", [
    ("fedavg", lambda s: S.FedAvg(**s)),
    ("fedprox", lambda s: S.FedProx(**s, proximal_mu=0.01)),
    ("fedavgm", lambda s: S.FedAvgM(**s, server_learning_rate=1.0, server_momentum=0.5)),
    ("fedadam", lambda s: S.FedAdam(**s, eta=1e-2, eta_l=3e-3, beta_1=0.9, beta_2=0.99, tau=1e-4)),
    ("diloco", lambda s: DiLoCo(**s, server_learning_rate=0.7, server_momentum=0.9)),
])
def test_streaming_strategies_equal_flowers_own(name, stock):
    cfg = RunConfig(strategy=name, min_clients=len(NODES))
    streamed = rounds_through_grid(build_strategy(cfg), FoldUpdates(), 3, start_record())
    direct = rounds_direct(stock(sampling(cfg)), 3, start_record())
    for a, b in zip(streamed, direct):
        assert_close(a, b)


def test_folded_replies_hold_no_weights():
    cfg = RunConfig(strategy="fedavg", min_clients=len(NODES))
    grid = SessionGrid(7, live_nodes=lambda: list(NODES), updates=FoldUpdates())
    msgs = list(build_strategy(cfg).configure_train(1, start_record(), ConfigRecord(), grid))
    grid.push_messages(msgs)
    task = grid.take_task(NODES[0], wait_s=5)
    assert grid.deliver_update(task.metadata.message_id, NODES[0],
                               DecodedUpdate(model(0), delta_of(11, 1), metrics(11), ConfigRecord({"name": "a"})))
    (reply,) = grid.pull_messages([task.metadata.message_id])
    arrays = reply.content["arrays"]
    assert isinstance(arrays, FoldedArrays) and set(arrays.keys()) == set(SHAPES)
    assert all(len(a.data) == 0 for a in arrays.values())
    with pytest.raises(Exception):   # a strategy that does not know folds cannot silently average placeholders
        arrays["wte"].numpy()
    # a second delivery for the same task folds nothing
    assert not grid.deliver_update(task.metadata.message_id, NODES[0],
                                   DecodedUpdate(model(0), delta_of(11, 1), metrics(11), ConfigRecord({"name": "a"})))


@pytest.mark.parametrize("name, stock", [
    ("fedmedian", lambda s: S.FedMedian(**s)),
    ("fedtrimmedavg", lambda s: S.FedTrimmedAvg(**s, beta=0.2)),
    ("krum", lambda s: S.Krum(**s, num_malicious_nodes=0)),
])
def test_spilled_robust_strategies_equal_flowers_own(name, stock, tmp_path):
    cfg = RunConfig(strategy=name, min_clients=len(NODES))
    seen = []

    class Watch(SpillUpdates):  # records what is on disk when each update lands
        def content(self, instruction, fold, update):
            content = super().content(instruction, fold, update)
            folder = self.round_dir(1)
            seen.append((sorted(p.name for p in folder.iterdir()) if folder.exists() else [],
                         all(isinstance(a, MappedArray) for a in content["arrays"].values())))
            return content
    sink = Watch(tmp_path)
    streamed = rounds_through_grid(build_strategy(cfg), sink, 2, start_record())
    direct = rounds_direct(stock(sampling(cfg)), 2, start_record())
    for a, b in zip(streamed, direct):
        assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [len(files) for files, _ in seen[:len(NODES)]] == [1, 2, 3, 4], "one spill file per update"
    assert all(mapped for _, mapped in seen)
    assert not sink.round_dir(1).exists() and not sink.round_dir(2).exists(), "spill files removed after the round"


def test_mapped_array_is_a_read_only_memory_map(tmp_path):
    sink = SpillUpdates(tmp_path)
    instruction = Message(RecordDict({"arrays": start_record(), "config": ConfigRecord({"server-round": 3})}),
                          dst_node_id=1, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = "t1"
    base, delta = model(0), delta_of(11, 1)
    content = sink.content(instruction, None, DecodedUpdate(base, delta, metrics(11), ConfigRecord({"name": "a"})))
    assert (tmp_path / "spill" / "round-3" / "t1.f32").stat().st_size == 4 * sum(int(np.prod(s)) for s in SHAPES.values())
    for k, a in content["arrays"].items():
        values = a.numpy()
        assert isinstance(values, np.memmap) and not values.flags.writeable
        np.testing.assert_array_equal(values, (base[k] + delta[k]).numpy())
        serialized = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)  # Flower's form
        np.testing.assert_array_equal(serialized.numpy(), values)
    SpillUpdates(tmp_path)   # a restarted coordinator clears what a killed one left
    assert not (tmp_path / "spill").exists()


def test_spill_krum_selects_like_flowers_krum():
    base = model(0)
    instruction = Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=base)}), dst_node_id=1,
                          message_type=MessageType.TRAIN)
    replies = [held_reply(instruction, base, delta_of(n, 1), n) for n in NODES]
    far = {k: v + 5.0 for k, v in delta_of(55, 1).items()}   # an outlier Krum must not pick
    replies.append(held_reply(instruction, base, far, 44))
    ours, _ = SpillKrum(num_malicious_nodes=1, min_train_nodes=1, min_available_nodes=1).aggregate_train(1, replies)
    theirs, _ = S.Krum(num_malicious_nodes=1, min_train_nodes=1, min_available_nodes=1).aggregate_train(1, replies)
    assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.integration
def test_delivery_in_progress_outlives_the_round_deadline():
    """An update being folded when the deadline passes still lands in this round's replies."""
    started, release = threading.Event(), threading.Event()

    class SlowFold(FoldUpdates):
        def content(self, instruction, fold, update):
            started.set()
            assert release.wait(10)
            return super().content(instruction, fold, update)
    cfg = RunConfig(strategy="fedavg", min_clients=1)
    grid = SessionGrid(7, live_nodes=lambda: [11], updates=SlowFold())
    strategy = build_strategy(cfg)
    msgs = list(strategy.configure_train(1, start_record(), ConfigRecord(), grid))
    result = {}
    sender = threading.Thread(target=lambda: result.setdefault("replies", list(grid.send_and_receive(msgs, timeout=0.5))))
    sender.start()
    task = grid.take_task(11, wait_s=5)
    deliver = threading.Thread(target=lambda: result.setdefault("ok", grid.deliver_update(
        task.metadata.message_id, 11, DecodedUpdate(model(0), delta_of(11, 1), metrics(11), ConfigRecord({"name": "a"})))))
    deliver.start()
    assert started.wait(5)
    assert grid.fail_node(11, "lease lost") == 0, "a lost lease does not void an update already being folded"
    threading.Event().wait(1.0)   # past the 0.5 s deadline while the fold is still running
    assert sender.is_alive(), "the round waits for the update being folded in"
    release.set()
    sender.join(10)
    deliver.join(10)
    assert result["ok"] and len(result["replies"]) == 1 and not result["replies"][0].has_error()
    arrays, _ = strategy.aggregate_train(1, result["replies"])
    expected = {k: model(0)[k] + delta_of(11, 1)[k] for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k].numpy(), expected[k].numpy(), rtol=1e-6)


# -- DiLoCo ---------------------------------------------------------------------------------

def test_diloco_outer_nesterov_by_hand():
    lr, mu = 0.7, 0.9
    strategy = DiLoCo(server_learning_rate=lr, server_momentum=mu, min_train_nodes=1, min_available_nodes=1)
    w = {"x": np.array([1.0, -2.0, 0.5], dtype=np.float32)}
    clients = [  # (weights after local training, num-examples) per round
        [(np.array([0.0, -1.0, 0.5], np.float32), 1), (np.array([2.0, 1.0, 1.5], np.float32), 3)],
        [(np.array([1.0, 1.0, 1.0], np.float32), 2), (np.array([0.0, 0.0, 0.0], np.float32), 2)],
    ]
    m = None
    for rnd, answers in enumerate(clients, start=1):
        arrays = ArrayRecord({"x": Array(w["x"])})
        instruction = Message(RecordDict({"arrays": arrays}), dst_node_id=1, message_type=MessageType.TRAIN)
        strategy.current_arrays = arrays   # what configure_train records
        replies = [Message(RecordDict({"arrays": ArrayRecord({"x": Array(v)}),
                                       "metrics": MetricRecord({"num-examples": n})}), reply_to=instruction)
                   for v, n in answers]
        out, _ = strategy.aggregate_train(rnd, replies)
        # by hand: outer gradient = global - weighted mean; m = mu m + g; w -= lr (g + mu m)
        mean = sum(v * n for v, n in answers) / sum(n for _, n in answers)
        g = w["x"] - mean
        m = g if m is None else mu * m + g
        w = {"x": w["x"] - lr * (g + mu * m)}
        np.testing.assert_allclose(out["x"].numpy(), w["x"], rtol=1e-6)
    # round 1: mean = [1.5, 0.5, 1.25], g = [-0.5, -2.5, -0.75], w = [1.665, 1.325, 1.4975]
    assert strategy.momentum_vector is not None


def test_diloco_momentum_survives_export_and_import():
    cfg = RunConfig(strategy="diloco", min_clients=len(NODES))
    first = build_strategy(cfg)
    rounds_through_grid(first, FoldUpdates(), 1, start_record())
    keys = list(SHAPES)
    saved = export_state(first, keys)
    assert set(saved) == {f"strategy/momentum_vector/{k}" for k in keys}
    second = build_strategy(cfg)
    assert import_state(second, saved, keys) == 1
    for a, b in zip(first.momentum_vector, second.momentum_vector):
        np.testing.assert_array_equal(a, b)


def test_server_lr_flags_reach_the_strategies():
    avg = build_strategy(RunConfig(strategy="fedavg", server_lr=0.5))
    assert isinstance(avg, S.FedAvgM) and avg.server_learning_rate == 0.5 and avg.server_momentum == 0.0
    assert not isinstance(build_strategy(RunConfig(strategy="fedavg")), S.FedAvgM)
    m = build_strategy(RunConfig(strategy="fedavgm", server_lr=0.8, server_momentum=0.7))
    assert (m.server_learning_rate, m.server_momentum) == (0.8, 0.7)
    d = build_strategy(RunConfig(strategy="diloco"))
    assert (d.server_learning_rate, d.server_momentum) == (0.7, 0.9)
    with pytest.raises(ValueError, match="server-momentum"):
        RunConfig(strategy="diloco", server_momentum=1.0).check()


# -- sampling -------------------------------------------------------------------------------

def test_sampling_takes_k_of_the_connected():
    nodes = list(range(1, 21))
    grid = SessionGrid(7, live_nodes=lambda: list(nodes))
    strategy = build_strategy(RunConfig(min_clients=2, clients_per_round=3))
    assert strategy.min_available_nodes == 3
    picked = set()
    for rnd in range(1, 6):
        msgs = list(strategy.configure_train(rnd, start_record(), ConfigRecord(), grid))
        assert len(msgs) == 3
        picked |= {m.metadata.dst_node_id for m in msgs}
    assert len(picked) > 3
    by_fraction = build_strategy(RunConfig(min_clients=2, fraction=0.25))
    assert len(list(by_fraction.configure_train(1, start_record(), ConfigRecord(), grid))) == 5
    both = build_strategy(RunConfig(min_clients=2, fraction=0.1, clients_per_round=4))
    assert len(list(both.configure_train(1, start_record(), ConfigRecord(), grid))) == 4
    with pytest.raises(ValueError, match="clients-per-round"):
        RunConfig(clients_per_round=-1).check()
    with pytest.raises(ValueError, match="fraction"):
        RunConfig(fraction=1.5).check()


def test_assembler_keeping_encoded_parts_decodes_the_same_tensors():
    from fedswarm.proto import codec as C
    from fedswarm.proto import wire

    state = {"big": torch.randn(300_000), "w": torch.randn(64, 33)}
    int8 = C.CODEC_NAMES["int8"]
    parts = list(wire.state_parts(state, lambda n, t: C.encode(t.flatten(), int8), max_part_bytes=64 * 1024))
    spec = {n: tuple(t.shape) for n, t in state.items()}
    eager, lazy = wire.PartAssembler(spec, {int8}), wire.PartAssembler(spec, {int8}, keep_encoded=True)
    for p in parts:
        eager.add(p)
        lazy.add(p)
    held = sum(len(e.data) + len(e.scales) for es in lazy.encoded.values() for e in es)
    assert held < 0.3 * 4 * sum(t.numel() for t in state.values()), "int8 parts are held, not fp32 tensors"
    assert not lazy.buffers
    a, b = eager.finish(), lazy.finish()
    assert list(a) == list(b) == list(state)
    for n in state:
        assert torch.equal(a[n], b[n]) and b[n].shape == state[n].shape


def test_arrays_view_reads_the_records_own_bytes():
    """A task's base weights cost nothing beyond the record: each read is a read-only view of its bytes (a
    copy per read of a 124M model's 154 MB embedding, in each of two concurrent uploads' checks, was most of
    the coordinator's transient peak)."""
    from fedswarm.coordinator.aggregate import ArraysView

    state = model(3)
    record = ArrayRecord(torch_state_dict=state)
    view = ArraysView(record)
    assert list(view) == list(state) and len(view) == len(state)
    first, again = view["wte"], view["wte"]
    assert torch.equal(first, state["wte"]) and first.data_ptr() == again.data_ptr()   # no copy, ever
