"""No poisoned commit: a finite 1e36 delta (weight 640, the review's attack) is refused and counted before it
reaches any aggregate; the fold itself cannot overflow; the default norm bound refuses outliers and keeps honest
updates; a non-finite aggregate is never committed (and leaves no trace in the strategy's state).

In-process, with the real service, grid, sinks and Flower strategies (no sockets: tests/test_byzantine.py
runs the same attack over real processes)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedswarm.coordinator.aggregate import FP32_MAX, MeanFold, sink_for
from fedswarm.coordinator.config import CoordinatorTimeouts
from fedswarm.run_config import RunConfig
from fedswarm.coordinator.driver import RunProgress
from fedswarm.coordinator.grid import SessionGrid
from fedswarm.coordinator.integrity import (MAX_WEIGHT, Inadmissible, UpdateNormBound, check_values, l2_norm,
                                            refused_aggregate)
from fedswarm.coordinator.membership import Membership
from fedswarm.coordinator.service import CoordinatorService
from fedswarm.proto.refusals import Reason, Refused
from fedswarm.coordinator.store import Store
from fedswarm.coordinator.strategies import build_strategy
from fedswarm.coordinator.strategy_state import export_state
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.app.testing import STAGE_CFG, middle_stage_server
from fedswarm.proto import wire

SHAPES = {"wte": (64, 16), "h.0.w": (16, 16), "h.0.b": (16,), "ln.g": (16,)}
WEIGHT = 640            # what the coordinator weighs a default task with: 40 local steps x batch 16


pytestmark = pytest.mark.usefixtures("task_identity")   # tests/conftest.py


def model(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def attack() -> dict[str, torch.Tensor]:
    """The review's update: finite, 1e36 on a single weight."""
    delta = {k: torch.zeros(s) for k, s in SHAPES.items()}
    delta["h.0.w"][3, 5] = 1e36
    return delta


def finite(arrays: ArrayRecord) -> bool:
    return all(np.isfinite(arrays[k].numpy()).all() for k in arrays.keys())


def test_the_fold_refuses_what_would_overflow_and_keeps_its_sums():
    base = model(0)
    fold = MeanFold(ArrayRecord(torch_state_dict=base))
    honest = model(1, 0.01)
    fold.add("honest", honest, WEIGHT)
    with pytest.raises(Inadmissible) as err:   # 1e36 x 640 is beyond fp32: refused before anything is added
        fold.add("poison", attack(), WEIGHT)
    assert err.value.reason == "update_overflow"
    nan = {k: torch.full(s, math.nan) for k, s in SHAPES.items()}
    with pytest.raises(Inadmissible, match="not finite"):
        fold.add("nan", nan, WEIGHT)
    mean = fold.mean({"honest": WEIGHT})   # neither refused update left a trace in the sums
    for k in SHAPES:
        np.testing.assert_allclose(mean[k].numpy(), (base[k] + honest[k]).numpy(), rtol=1e-6, atol=1e-6)
    # Many updates near fp32's edge: refused once the sum could overflow, never an Inf in the sums.
    fold = MeanFold(ArrayRecord(torch_state_dict=base))
    big = {k: torch.full(s, FP32_MAX / 4) for k, s in SHAPES.items()}
    fold.add("a", big, 1.0)
    fold.add("b", big, 1.0)
    with pytest.raises(Inadmissible, match="overflow"):
        fold.add("c", {k: v * 2.5 for k, v in big.items()}, 1.0)
    assert all(torch.isfinite(s).all() for s in fold._sums.values())


def test_values_must_be_finite_and_bounded():
    base = model(0)
    check_values(base, model(1, 0.1))
    for delta, reason in [(attack(), "update_magnitude"), ({**model(1), "ln.g": torch.full((16,), math.inf)},
                                                           "non_finite"),
                          ({**model(1), "h.0.b": torch.full((16,), math.nan)}, "non_finite"),
                          ({**model(1), "wte": torch.full((64, 16), 2 * MAX_WEIGHT)}, "update_magnitude")]:
        with pytest.raises(Inadmissible) as err:
            check_values(base, delta)
        assert err.value.reason == reason
    assert math.isfinite(l2_norm(attack().values())) and l2_norm(attack().values()) == pytest.approx(1e36)


def test_the_norm_bound_refuses_outliers_keeps_honest_updates_and_turns_off():
    base = model(0)                                  # norm ~ 34
    bound = UpdateNormBound(10.0, window=8, min_history=3)
    base_norm = l2_norm(base.values())
    assert bound.limit("model", base) == pytest.approx(10 * base_norm)   # no history: relative to the weights
    with pytest.raises(Inadmissible) as err:
        bound.check("model", {k: v * 11 for k, v in base.items()}, base)
    assert err.value.reason == "update_norm"
    honest = [model(i, 0.05 * (1 + i % 3)) for i in range(1, 8)]   # norms vary by 3x
    for update in honest:
        bound.accept("model", bound.check("model", update, base))
    norms = sorted(l2_norm(u.values()) for u in honest)
    assert bound.limit("model", base) == pytest.approx(10 * norms[3])   # the median of the window
    with pytest.raises(Inadmissible):   # 20x the median: refused although well below 10x the weights' norm
        bound.check("model", {k: v * 20 for k, v in honest[3].items()}, base)
    assert bound.limit("stage 1", base) == pytest.approx(10 * base_norm)   # each stage keeps its own history
    bound.accept("model", 0.0)   # a replica with no steps says nothing about the scale
    assert bound.limit("model", base) == pytest.approx(10 * norms[3])
    off = UpdateNormBound(0.0)
    assert off.limit("model", base) is None
    assert off.check("model", {k: v * 1e6 for k, v in base.items()}, base) > 0


def _serve_round(tmp_path, strategy: str, aggregation: str, nodes: int):
    """A real service over a real grid, one round's instructions out: (service, strategy, members, ids, start)."""
    cfg = RunConfig(min_clients=nodes, strategy=strategy, upload_codec="none")   # default norm bound
    membership = Membership(60.0, on_lost=lambda cid, why: None)
    grid = SessionGrid(7, membership.live_ids, updates=sink_for(strategy, str(tmp_path), aggregation))
    progress = RunProgress(cfg, [{"round": 0}])
    service = CoordinatorService(cfg, "run", grid, membership, progress, CoordinatorTimeouts())
    members = [membership.join(f"c{i}", "cpu", "fp32")[0] for i in range(nodes)]
    start = ArrayRecord(torch_state_dict=model(0))
    flower = build_strategy(cfg)
    ids = list(grid.push_messages(flower.configure_train(1, start, ConfigRecord({"local-steps": 40}), grid)))
    return service, flower, members, ids, membership


def _push(service, member, delta: dict[str, torch.Tensor], metrics: dict | None = None) -> pb.PushReply:
    task = service.grid.take_task(member.client_id, wait_s=5)
    codec = C.codec_by_name("none")
    parts = [p for name, t in delta.items() for p in wire.tensor_parts(name, tuple(t.shape), C.encode(t.flatten(), codec))]
    header = pb.UpdateHeader(client_id=member.client_id, session_token=member.token, task_id=task.metadata.message_id,
                             round=1, num_examples=1, train_loss=1.0, num_tensors=len(delta), num_parts=len(parts),
                             metrics=metrics or {})
    chunks = [pb.UpdateChunk(header=header)] + [pb.UpdateChunk(part=p) for p in parts]
    try:
        return service.push_update(iter(c.SerializeToString() for c in chunks), None)
    except Refused:
        service.grid.requeue_for(member.client_id)   # a refused upload leaves the task open: hand it out again
        raise


@pytest.mark.parametrize("strategy, aggregation", [("fedavg", "stream"), ("fedavg", "hold"),
                                                   ("fedmedian", "stream"), ("krum", "stream")])
def test_the_service_refuses_the_attack_on_every_aggregation_path(tmp_path, strategy, aggregation):
    service, flower, members, ids, membership = _serve_round(tmp_path, strategy, aggregation, nodes=3)
    try:
        for bad, reason in [(attack(), "update_magnitude"),
                            ({k: v * 100 for k, v in model(0).items()}, "update_norm")]:   # 100x the weights
            with pytest.raises(Refused) as err:
                _push(service, members[0], bad)
            assert (err.value.reason, err.value.code.name) == (reason, "INVALID_ARGUMENT")
        honest = [model(10 + i, 0.01) for i in range(3)]
        for member, delta in zip(members, honest):
            assert _push(service, member, delta).accepted
        replies = service.grid.receive(ids, timeout=10)
        assert len(replies) == 3 and not any(m.has_error() for m in replies)
        arrays, _ = flower.aggregate_train(1, replies)
        service.grid.updates.release_round(1)
        assert finite(arrays)
        base = model(0)
        moved = max(float(np.abs(arrays[k].numpy() - base[k].numpy()).max()) for k in SHAPES)
        assert moved < 0.1, moved   # honest deltas are ~0.01 per weight
    finally:
        membership.close()


def test_an_update_reports_its_training_figures_within_bounds(tmp_path):
    """UpdateHeader.metrics (e.g. the client's lr) reach the reply's "client" record; too many, or a non-finite
    one, refuse the header. A reply with figures and one without aggregate together."""
    service, flower, members, ids, membership = _serve_round(tmp_path, "fedavg", "stream", nodes=2)
    try:
        for bad in ({"lr-first": math.nan}, {f"m{i}": 1.0 for i in range(17)}, {"": 1.0}):
            with pytest.raises(Refused) as err:
                _push(service, members[0], model(10, 0.01), bad)
            assert err.value.reason == Reason.BAD_HEADER, bad
        assert _push(service, members[0], model(10, 0.01), {"lr-first": 1e-3, "lr-last": 5e-4}).accepted
        assert _push(service, members[1], model(11, 0.01)).accepted
        replies = {m.content.config_records["client"]["name"]: m for m in service.grid.receive(ids, timeout=10)}
        client = replies["c0"].content.config_records["client"]   # not in the metrics Flower averages
        assert (client["client:lr-first"], client["client:lr-last"], client["adopted"]) == (1e-3, 5e-4, False)
        arrays, _ = flower.aggregate_train(1, list(replies.values()))
        service.grid.updates.release_round(1)
        assert arrays is not None and finite(arrays)
    finally:
        membership.close()


def _replies(instructions: list[Message], deltas: list[dict[str, torch.Tensor]], base) -> list[Message]:
    out = []
    for msg, delta in zip(instructions, deltas):
        arrays = ArrayRecord({k: Array((base[k] + delta[k]).numpy()) for k in SHAPES})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": WEIGHT, "train_loss": 1.0}),
                              "client": ConfigRecord({"name": str(msg.metadata.dst_node_id)})})
        out.append(Message(content, reply_to=msg))
    return out


class Nodes:   # the only Grid method configure_train needs here
    def get_node_ids(self):
        return [1, 2]


def test_a_non_finite_aggregate_is_refused_counted_and_leaves_the_strategy_as_committed(tmp_path):
    """FedAvgM (stateful): round 2's aggregate is NaN (replies that skipped every upload check): refused and
    counted; momentum back to round 1's; the repeated round ends exactly where a run without it would."""
    cfg = RunConfig(min_clients=2, strategy="fedavgm")
    base = model(0)
    keys = list(SHAPES)
    store = Store(tmp_path / "state")
    sink = sink_for("fedavgm", None)
    try:
        store.commit_round({"round": 0, "eval_loss": 1.0, "train_loss": None, "clients": [], "bytes_up": 0,
                            "bytes_up_raw": 0, "seconds": 0.0}, dict(base))

        def one_round(strategy, rnd, arrays, deltas):
            msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), Nodes()))
            state = {k: torch.from_numpy(arrays[k].numpy().copy()) for k in keys}
            return strategy.aggregate_train(rnd, _replies(msgs, deltas, state))[0]

        honest = [[model(10 * r + i, 0.01) for i in range(2)] for r in range(3)]
        reference, tested = build_strategy(cfg), build_strategy(cfg)
        ref1 = one_round(reference, 1, ArrayRecord(torch_state_dict=base), honest[1])
        ref2 = one_round(reference, 2, ref1, honest[2])
        start = ArrayRecord(torch_state_dict=base)
        arrays1 = one_round(tested, 1, start, honest[1])
        assert not refused_aggregate(1, arrays1, start, tested, store, sink)
        state1 = {k: torch.from_numpy(arrays1[k].numpy().copy()) for k in keys}
        store.commit_round({"round": 1, "eval_loss": 1.0, "train_loss": None, "clients": [], "bytes_up": 0,
                            "bytes_up_raw": 0, "seconds": 0.0}, {**state1, **export_state(tested, keys)})
        poisoned = [honest[2][0], {**honest[2][1], "ln.g": torch.full((16,), math.nan)}]
        bad = one_round(tested, 2, arrays1, poisoned)
        assert not finite(bad) and not np.isfinite(tested.momentum_vector[keys.index("ln.g")]).all()
        assert refused_aggregate(2, bad, arrays1, tested, store, sink)
        assert sink.refused() == {"non_finite_aggregate": 1}
        again = one_round(tested, 2, arrays1, honest[2])   # the round repeated
        assert finite(again)
        for k in keys:
            np.testing.assert_allclose(again[k].numpy(), ref2[k].numpy(), rtol=1e-6, atol=1e-7)
    finally:
        store.close()


# -- stage peers ---------------------------------------------------------------------------------------
@pytest.fixture
def stage_server():
    """A peer serving the middle stage of gpt2-tiny (hidden in, hidden out)."""
    with middle_stage_server() as server:
        yield server


def _stage_call(server, mb: str, hidden: torch.Tensor, grad: torch.Tensor | None = None) -> pb.StageReply:
    from fedswarm.client.swarm.tensors import to_wire

    codec = C.codec_by_name("bf16")
    req = pb.StageRequest(run_id="run", stage=1, microbatch_id=mb, hidden=to_wire(hidden, codec),
                          backward=grad is not None)
    if grad is not None:
        req.grad_output.CopyFrom(to_wire(grad, codec))
    return server._timed_compute(req)


def _sync(server, stage: int, average: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """A peer's sync (client/swarm/stage_sync.py) of a whole average, handed over tensor by tensor."""
    server.begin_sync(stage, average)
    progress = {name: server.adopt(name, average.pop(name)).result() for name in list(average)}
    return progress, server.end_sync()


def _weights(server) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in server.module.named_parameters()}


@pytest.mark.parametrize("where", ["one element", "every element"])
def test_a_stage_peer_refuses_a_1e36_gradient_and_steps_only_on_sane_ones(stage_server, where):
    from fedswarm.client.swarm.tensors import BadStageInput

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, 128, generator=g)
    before = _weights(stage_server)
    _stage_call(stage_server, "m1", hidden)
    poison = torch.zeros(2, 16, 128)
    if where == "one element":
        poison[0, 3, 7] = 1e36
    else:
        poison.fill_(1e36)
    with pytest.raises(BadStageInput) as err:
        _stage_call(stage_server, "m1", hidden, poison)
    assert err.value.reason == "non_finite_grad"
    assert stage_server.refusals.snapshot() == {"non_finite_grad": 1}
    assert stage_server.optimizer_steps == 0
    assert all(torch.equal(before[n], p) for n, p in stage_server.module.named_parameters()), "stepped on it"
    assert all(p.grad is None for p in stage_server.module.parameters()), "the refused gradient lingers"
    _stage_call(stage_server, "m2", hidden)   # an honest backward, with a large but finite gradient: clipped
    _stage_call(stage_server, "m2", hidden, torch.randn(2, 16, 128, generator=g) * 1e6)
    assert stage_server.optimizer_steps == 1
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in stage_server.module.named_parameters())
    assert 0 < moved <= 2 * STAGE_CFG.lr, moved   # one AdamW step moves a weight by about lr at most
    assert stage_server._weights_finite()


def test_a_stage_peer_whose_weights_turn_non_finite_restores_its_last_sync(stage_server):
    from fedswarm.client.swarm.tensors import BadStageInput

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16, 128, generator=g)
    snapshot = {n: t.clone() for n, t in stage_server.snapshot.items()}
    _stage_call(stage_server, "m1", hidden)
    _stage_call(stage_server, "m1", hidden, torch.randn(2, 16, 128, generator=g))
    with torch.no_grad():
        next(stage_server.module.parameters()).view(-1)[0] = math.nan   # however it happened
    with pytest.raises(BadStageInput, match="not finite"):
        _stage_call(stage_server, "m2", hidden)
    assert stage_server.refusals.snapshot() == {"non_finite": 1, "weights_restored": 1}
    from fedswarm.stages import stage_state
    restored = stage_state(stage_server.module)
    assert all(torch.equal(restored[n], snapshot[n]) for n in snapshot)
    from fedswarm.client.swarm.tensors import from_wire
    out = _stage_call(stage_server, "m3", hidden).hidden   # serving again
    assert torch.isfinite(from_wire(out, (2, 16, 128), stage_server.allowed)).all()
    # ... and at a sync: progress made of NaN is never uploaded; the replica restarts from its last good state.
    _stage_call(stage_server, "m3", hidden, torch.randn(2, 16, 128, generator=g))
    with torch.no_grad():
        next(stage_server.module.parameters()).view(-1)[1] = math.inf
    progress, tokens = _sync(stage_server, 1, snapshot)
    assert all(float(p.abs().max()) == 0 for p in progress.values()) and tokens == 1
    assert stage_server.refusals.snapshot()["weights_restored"] == 2 and stage_server._weights_finite()


def test_a_sync_adopts_the_average_plus_the_progress_in_place(stage_server):
    """progress = weights - snapshot; the weights and the new snapshot become average + progress; the handed
    average is consumed tensor by tensor (dropped as used)."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 16, 128, generator=g)
    before = {n: t.clone() for n, t in stage_server.snapshot.items()}
    _stage_call(stage_server, "m1", hidden)
    _stage_call(stage_server, "m1", hidden, torch.randn(2, 16, 128, generator=g))
    trained = _weights(stage_server)
    average = {n: t + 0.5 for n, t in before.items()}
    expected = {n: average[n] + (trained[n] - before[n]) for n in before}
    progress, _ = _sync(stage_server, 1, average)
    assert not average   # consumed
    assert any(float(p.abs().max()) > 0 for p in progress.values())
    for n in before:
        assert torch.allclose(progress[n], trained[n] - before[n])
        assert torch.allclose(stage_server.snapshot[n], expected[n])
        assert torch.allclose(dict(stage_server.module.named_parameters())[n].detach(), expected[n])


def test_a_stage_request_of_the_runs_micro_batch_fits_the_members_bound(stage_server):
    """A member may send what its run's micro-batch needs (fp32 activation and gradient, ids, labels), far
    below the P2P plane's bound, so a member's 144 MiB request is refused unread."""
    from fedswarm.client.swarm.tensors import to_wire
    from fedswarm.p2p import MAX_P2P_MESSAGE

    b, t, hidden = STAGE_CFG.batch_size, STAGE_CFG.seq_len, stage_server.module.config.hidden_size
    fp32 = C.codec_by_name("none")
    biggest = pb.StageRequest(run_id="run", stage=1, backward=True, microbatch_id="m" * 32,
                              hidden=to_wire(torch.randn(b, t, hidden), fp32),
                              grad_output=to_wire(torch.randn(b, t, hidden), fp32),
                              ids=b"\x00" * (4 * b * t), labels=b"\x00" * (4 * b * t))
    assert biggest.ByteSize() <= stage_server.request_limit() < MAX_P2P_MESSAGE // 100
