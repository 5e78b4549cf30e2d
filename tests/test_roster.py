"""The data plane's membership: the coordinator's roster, routing records derived from it, and request bounds."""
import pytest
import torch

from fedswarm.client.swarm.roster import Roster, roster_records
from fedswarm.client.swarm.stage_server import StageServer
from fedswarm.client.swarm.tensors import BadStageInput, ids_to_bytes, to_wire
from fedswarm.coordinator.swarm_registry import SwarmRegistry
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.run_config import RunConfig

A, B, FAKE = "Qm" + "a" * 44, "Qm" + "b" * 44, "Qm" + "f" * 44


def test_routing_is_the_roster_whatever_the_dht_says():
    members = frozenset({A, B})
    raw = {A: {"name": "a", "stage": 0, "throughput": 100.0, "load": 0.0},
           B: {"junk": True},                                                        # overwritten by an intruder
           FAKE: {"name": "fake", "stage": 0, "throughput": 1e300, "load": 0.0}}   # never joined
    records, ignored = roster_records(0, members, raw, cap_factor=4.0, default_throughput=1.0)
    assert [r.peer_id for r in records] == [A, B]          # B stays routable: its record cannot hide it
    assert ignored["record_not_member"] == {FAKE}
    assert {p for p, _ in ignored["record_malformed"]} == {B}
    # a member announcing a huge throughput is capped at cap_factor x the stage's median
    raw[B] = {"name": "b", "stage": 0, "throughput": 1e300, "load": 0.0}
    records, _ = roster_records(0, members, raw, cap_factor=4.0, default_throughput=1.0)
    assert max(r.throughput for r in records) <= 4.0 * 1e300  # sanity
    median = (100.0 + 1e300) / 2
    assert dict((r.peer_id, r.throughput) for r in records)[B] <= 4 * median
    raw = {A: raw[A], B: {"name": "b", "stage": 0, "throughput": 1e6, "load": 0.0},
           "Qm" + "c" * 44: {"name": "c", "stage": 0, "throughput": 100.0, "load": 0.0}}
    records, _ = roster_records(0, frozenset(raw), raw, cap_factor=4.0, default_throughput=1.0)
    assert dict((r.peer_id, r.throughput) for r in records)[B] == 400.0


def test_a_replica_that_served_nothing_yet_is_routed_as_the_stages_median():
    """A fresh replica announces the floor (it has served no token): routed by it, the measured replicas would
    keep all the traffic and it would never measure anything else."""
    C3 = "Qm" + "c" * 44
    raw = {A: {"name": "a", "stage": 0, "throughput": 300.0, "load": 0.0},
           B: {"name": "b", "stage": 0, "throughput": 500.0, "load": 0.0},
           C3: {"name": "c", "stage": 0, "throughput": 1.0, "load": 0.0}}
    records, _ = roster_records(0, frozenset(raw), raw, cap_factor=4.0, default_throughput=1.0)
    assert dict((r.peer_id, r.throughput) for r in records) == {A: 300.0, B: 500.0, C3: 400.0}
    only_fresh = {C3: raw[C3]}
    records, _ = roster_records(0, frozenset(only_fresh), only_fresh, cap_factor=4.0, default_throughput=1.0)
    assert [r.throughput for r in records] == [1.0]


def test_registry_roster_lists_peers_serving_their_assigned_stage_and_trainers():
    reg = SwarmRegistry(2)
    assert reg.assign(1, "p0", A) == 0
    assert reg.assign(2, "p1", B) == 1
    reg.add_trainer(3, "t0", FAKE)
    roster = reg.roster()
    assert [list(s.peer_ids) for s in roster.stages] == [[], []]   # nobody reports serving yet
    assert list(roster.trainer_peer_ids) == [FAKE]
    reg.report_peer(1, 10.0, 0, serving=0, refused={"not_member": 3})
    reg.report_peer(2, 10.0, 0, serving=0)                            # still on its old stage: not routed to
    roster2 = reg.roster()
    assert [list(s.peer_ids) for s in roster2.stages] == [[A], []] and roster2.version > roster.version
    reg.remove(1, "lease expired")
    assert reg.snapshot()["refused"] == {"not_member": 3}             # kept after the reporter left
    assert all(A not in s.peer_ids for s in reg.roster().stages)


def test_roster_update_and_wait():
    roster = Roster()
    assert roster.update(pb.SwarmRoster(stages=[pb.StageRoster(peer_ids=[A])], trainer_peer_ids=[B], version=1))
    assert not roster.update(pb.SwarmRoster(stages=[pb.StageRoster(peer_ids=[A])], trainer_peer_ids=[B], version=1))
    assert roster.stage_peers(0) == {A} and roster.stage_peers(5) == frozenset()
    assert roster.is_trainer(B) and not roster.is_trainer(A)
    assert not roster.wait_for(lambda: roster.is_trainer(FAKE), 0.05)


CFG = RunConfig(model="gpt2-tiny", mode="swarm", stages=2, seed=0, lr=1e-3, seq_len=16, batch_size=2,
                activation_codec="bf16")


@pytest.fixture(scope="module")
def servers():
    from fedswarm.stages import build_stage, stage_state
    out = []
    for stage in (0, 1):
        server = StageServer("run", CFG, torch.device("cpu"), "fp32")
        server.serve(stage, stage_state(build_stage("gpt2-tiny", stage, 2)))
        out.append(server)
    yield out
    for server in out:
        server.close()


@pytest.mark.parametrize("shape", [(3, 16), (2, 17), (2, 16, 1)])
def test_oversized_or_misshapen_token_input_is_refused_before_compute(servers, shape):
    first = servers[0]
    req = pb.StageRequest(run_id="run", stage=0, microbatch_id="m")
    req.ids = ids_to_bytes(torch.zeros(shape, dtype=torch.long))
    req.ids_shape[:] = list(shape)
    steps = first.optimizer_steps
    with pytest.raises(BadStageInput) as err:
        first._timed_compute(req)
    assert err.value.reason == "bad_shape"
    assert first.refusals.snapshot()["bad_shape"] >= 1 and first.optimizer_steps == steps


def test_non_finite_activation_is_refused_and_changes_nothing(servers):
    last = servers[1]
    before = {n: p.detach().clone() for n, p in last.module.named_parameters()}
    hidden = torch.full((2, 16, last.module.config.hidden_size), float("nan"))
    req = pb.StageRequest(run_id="run", stage=1, microbatch_id="m", labels=ids_to_bytes(torch.zeros(2, 16, dtype=torch.long)))
    req.hidden.CopyFrom(pb.SwarmTensor(shape=list(hidden.shape), codec=C.CODEC_NAMES["none"],
                                       data=hidden.numpy().astype("<f4").tobytes()))
    with pytest.raises(BadStageInput) as err:
        last._timed_compute(req)
    assert err.value.reason in ("non_finite", "bad_encoding")
    assert all(torch.equal(p, before[n]) for n, p in last.module.named_parameters())


def test_a_malformed_activation_is_blamed_on_the_replica_that_produced_it():
    from fedswarm.client.swarm.swarm_trainer import BadReply, check_reply
    shape = (2, 16, 8)
    fwd = pb.StageRequest(stage=0)
    good = pb.StageReply(hidden=to_wire(torch.randn(shape), C.CODEC_NAMES["bf16"]))
    check_reply(0, 2, fwd, good, shape)
    for bad in (pb.StageReply(hidden=to_wire(torch.randn(2, 16, 9), C.CODEC_NAMES["bf16"])),   # wrong shape
                pb.StageReply(hidden=pb.SwarmTensor(shape=list(shape), codec=C.CODEC_NAMES["none"], data=b"x")),
                pb.StageReply()):                                                             # nothing at all
        with pytest.raises(BadReply):
            check_reply(0, 2, fwd, bad, shape)     # stage 0 produced it: stage 0's replica is banned
    with pytest.raises(BadReply):
        check_reply(1, 2, pb.StageRequest(stage=1), pb.StageReply(loss=float("nan")), shape)
