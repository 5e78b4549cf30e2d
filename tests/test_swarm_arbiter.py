"""With only two replicas of a stage, a spot check they dispute goes to the coordinator, which re-runs the input
on its own copy of the stage at the weights version both ran on (coordinator/arbiter.py) and removes the liar;
a removed liar's pending stage sync is refused, so its contribution is left out of the stage's next average."""
from __future__ import annotations

import types

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedswarm import receipts as R
from fedswarm.client.swarm.lies import Liar
from fedswarm.client.swarm.stage_server import StageServer
from fedswarm.client.swarm.tensors import ids_to_bytes, to_wire
from fedswarm.coordinator.arbiter import StageArbiter
from fedswarm.coordinator.modes import SwarmMode
from fedswarm.coordinator.rpc import Refused
from fedswarm.coordinator.swarm_registry import SwarmRegistry
from fedswarm.p2p import new_identity
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto.refusals import Reason
from fedswarm.run_config import RunConfig
from fedswarm.signed_records import private_key
from fedswarm.stages import Stage, build_untied_model, stage_state

RUN = "run"
CFG = RunConfig(model="gpt2-tiny", mode="swarm", stages=2, seed=0, seq_len=16, batch_size=2, activation_codec="bf16")
KEYS = [new_identity() for _ in range(2)]
STATES = [stage_state(Stage(build_untied_model("gpt2-tiny", 0), s, 2)) for s in range(2)]


def _replica(i: int, stage: int, liar: bool = False) -> StageServer:
    """A stage server as a peer runs it on the stage's committed average, signing with peer i's libp2p key."""
    server = StageServer(RUN, CFG, torch.device("cpu"), "fp32")
    server.node = types.SimpleNamespace(signing_key=private_key(KEYS[i][0]), peer_id=KEYS[i][1])
    server.liar = Liar([("corrupt", 1.0)]) if liar else None
    server.serve(stage, {n: t.clone() for n, t in STATES[stage].items()})
    return server


def _request(stage: int, seed: int = 0) -> pb.StageRequest:
    """A spot check of `stage`: tokens for stage 0, an activation and labels for stage 1."""
    g = torch.Generator().manual_seed(seed)
    req = pb.StageRequest(run_id=RUN, stage=stage, microbatch_id="mb", verify=True)
    if stage == 0:
        req.ids, req.ids_shape[:] = ids_to_bytes(torch.randint(0, 256, (2, 16), generator=g)), [2, 16]
    else:
        req.hidden.CopyFrom(to_wire(torch.randn(2, 16, 128, generator=g), pb.CODEC_BF16))
        req.labels = ids_to_bytes(torch.randint(0, 256, (2, 16), generator=g))
    return req


@pytest.mark.parametrize("stage", [0, 1])   # an activation; the last stage's loss
def test_the_coordinator_settles_a_two_replica_dispute_and_removes_the_liar(stage):
    req = _request(stage)
    servers = [_replica(0, stage), _replica(1, stage, liar=True)]
    try:
        mine, theirs = (s._compute(req).receipts[0] for s in servers)
    finally:
        for s in servers:
            s.close()
    newer = {n: t + 0.01 for n, t in STATES[stage].items()}   # the coordinator committed a newer average since
    kept: list[dict] = []
    arbiter = StageArbiter(CFG, lambda s: newer if s == stage else None, lambda names: iter(kept))
    report = pb.LyingReport(stage=stage, receipts=[mine, theirs], request=req)
    with pytest.raises(R.BadReceipt, match="no average of stage"):     # it must hold the version they ran on
        arbiter.judge(RUN, report)
    kept.append({n: STATES[stage][n] for n in sorted(STATES[stage])})   # ... as a kept checkpoint does
    assert arbiter.judge(RUN, report) == KEYS[1][1]
    assert arbiter.judge(RUN, pb.LyingReport(stage=stage, receipts=[theirs, mine], request=req)) == KEYS[1][1]
    for bad in (pb.LyingReport(stage=stage, receipts=[mine, mine], request=req),          # one peer twice
                pb.LyingReport(stage=stage, receipts=[mine, theirs], request=_request(stage, seed=1)),  # other input
                pb.LyingReport(stage=stage, receipts=[mine, theirs])):                    # no input to re-run
        with pytest.raises(R.BadReceipt):
            arbiter.judge(RUN, bad)

    # the registry takes the verdict: the liar leaves the roster and its stage for good
    registry = SwarmRegistry(2)
    registry.run_id, registry.arbiter = RUN, arbiter
    for cid, peer in enumerate([KEYS[0][1], KEYS[1][1], "Qm" + "f" * 44]):   # p2 serves the other stage
        registry.assign(cid, f"p{cid}", peer)
    registry.stage_of = {0: stage, 1: stage, 2: 1 - stage}
    for cid in range(3):
        registry.report_peer(cid, 1.0, 0, serving=registry.stage_of[cid])
    registry.report_lying([report])
    registry.settle_disputes(timeout_s=60)   # the re-run runs on the arbiter's thread
    snap = registry.snapshot()
    events = [e for e in snap["events"] if e["kind"] == "lying_peer"]
    assert [e["peer"] for e in events] == ["p1"] and "coordinator's own re-run" in events[0]["reason"], events
    assert snap["lying_peers"] == 1 and snap["lying_reports_refused"] == 0
    assert registry.roster().stages[stage].peer_ids == [KEYS[0][1]] and "p1" not in snap["stages"][stage]["peers"]


def test_a_trainer_sends_a_two_replica_dispute_once_with_its_input_and_the_coordinator_settles_it():
    """The trainer's spot check (evidence.py) on the only two replicas of stage 0, called in process: they
    disagree, no third replica exists, so it reports their receipts and the input, once, and bans no one."""
    from fedswarm.client.swarm.evidence import Evidence
    from fedswarm.client.swarm.routing import Router, StageRecord

    servers = {KEYS[0][1]: _replica(0, 0), KEYS[1][1]: _replica(1, 0, liar=True)}
    router = Router()
    router.update(0, [StageRecord(peer, "p", 0, 1.0, 0.0) for peer in servers])
    evidence = Evidence(RUN, 2, lambda req: (2, 16, 128), lambda peer, stage, req: servers[peer]._compute(req),
                        router)
    try:
        for peer in servers:   # whichever replica served the audited call, the other is the first witness
            assert evidence._arbitrate(0, peer, _request(0)) is None
    finally:
        for server in servers.values():
            server.close()
    reports = evidence.take_reports()
    assert len(reports) == 1 and len(reports[0].receipts) == 2 and evidence.spot.disputes == 2, reports
    assert not any(router.is_banned(peer) for peer in servers)
    arbiter = StageArbiter(CFG, lambda s: STATES[s], lambda names: iter(()))
    assert arbiter.judge(RUN, reports[0]) == KEYS[1][1]


def test_a_removed_liars_pending_stage_sync_is_refused_and_an_honest_one_is_weighed(task_identity):
    registry = SwarmRegistry(1)
    for cid, (_, peer) in enumerate(KEYS):
        registry.assign(cid, f"p{cid}", peer)
    registry.add_trainer(9, "t", "")
    registry.report_trainer(9, "t", 4, 0, 0, 4096)
    mode = SwarmMode(types.SimpleNamespace(registry=registry), bases=None)

    def sync_reply(cid: int):   # the weight a replica's upload of its stage-0 sync gets
        instruction = Message(RecordDict({"config": ConfigRecord({"stage": 0})}), dst_node_id=cid,
                              message_type=MessageType.TRAIN)
        return mode.weight(instruction, pb.UpdateHeader(num_examples=2048))
    assert sync_reply(1) == 2048                     # the sync is pending when the liar is caught
    registry.convict(1, 0)
    with pytest.raises(Refused) as refused:
        sync_reply(1)
    assert refused.value.reason == Reason.LYING_PEER, refused.value
    assert sync_reply(0) == 2048
