"""Signed stage receipts (receipts.py): a chain proves itself stage by stage, a claim is checked against its
claimer, and spot-check verdicts follow the codec's tolerance."""
from __future__ import annotations

import math

import pytest
import torch

from fedswarm import receipts as R
from fedswarm.client.swarm.tensors import to_wire
from fedswarm.p2p import new_identity
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.signed_records import private_key

RUN, MB = "run", "mb1"
KEYS = [new_identity() for _ in range(4)]            # (identity, peer id)
SIGNERS = [private_key(identity) for identity, _ in KEYS]
PEERS = [peer for _, peer in KEYS]


def _chain(loss=2.5, stages=3):
    ids, shape = b"\x01\x00\x00\x00" * 8, [2, 4]
    first = R.ids_digest(ids, shape)
    receipts, prev = [], first
    for stage in range(stages):
        out = to_wire(torch.randn(2, 4, 8), C.CODEC_NAMES["bf16"])
        r = pb.StageReceipt(microbatch_id=MB, stage=stage, input_digest=prev, output_digest=R.tensor_digest(out),
                            loss=loss if stage == stages - 1 else 0.0, output=out)
        receipts.append(R.sign(SIGNERS[stage], RUN, r))
        prev = r.output_digest
    return first, receipts


def test_a_valid_chain_checks_and_any_forgery_is_blamed_on_whom_the_evidence_shows():
    first, receipts = _chain()
    route = dict(enumerate(PEERS[:3]))
    R.check_chain(RUN, MB, route, first, receipts, 2.5, audit=True)
    with pytest.raises(R.BadReceipt) as err:          # a loss the last stage did not sign: the head made it up
        R.check_chain(RUN, MB, route, first, receipts, math.nan)
    assert err.value.blame == PEERS[0]
    with pytest.raises(R.BadReceipt) as err:          # the next stages' receipts left out (a fabricated chain)
        R.check_chain(RUN, MB, route, first, receipts[:1], 2.5)
    assert err.value.blame == PEERS[0]
    with pytest.raises(R.BadReceipt):                 # a receipt signed by another peer than the route's
        R.check_chain(RUN, MB, {**route, 1: PEERS[3]}, first, receipts, 2.5)
    with pytest.raises(R.BadReceipt):                 # another micro-batch's receipts, replayed
        R.check_chain(RUN, "mb2", route, first, receipts, 2.5)
    with pytest.raises(R.BadReceipt):                 # another run's
        R.check_chain("run2", MB, route, first, receipts, 2.5)
    tampered = pb.StageReceipt()
    tampered.CopyFrom(receipts[2])
    tampered.loss = 0.05                               # a changed loss no longer matches its signature
    with pytest.raises(R.BadReceipt):
        R.check_chain(RUN, MB, route, first, receipts[:2] + [tampered], 0.05)
    swapped = pb.StageReceipt()
    swapped.CopyFrom(receipts[1])
    swapped.output.CopyFrom(receipts[0].output)       # an output other than the one it signed
    with pytest.raises(R.BadReceipt):
        R.check_chain(RUN, MB, route, first, [receipts[0], swapped, receipts[2]], 2.5)
    _, nan_chain = _chain(loss=math.nan)               # a NaN loss the last stage itself signed: its own doing
    with pytest.raises(R.BadReceipt) as err:
        R.check_chain(RUN, MB, route, first, nan_chain, math.nan)
    assert err.value.blame == PEERS[2]


def test_a_claim_counts_only_signed_by_the_claimer_about_its_next_hop():
    out = to_wire(torch.randn(2, 4, 8), C.CODEC_NAMES["bf16"])
    claim = R.sign(SIGNERS[0], RUN, pb.StageReceipt(microbatch_id=MB, stage=0, output_digest=R.tensor_digest(out),
                                                    output=out, failed_peer=PEERS[1], failed_reason="timeout"))
    route = dict(enumerate(PEERS[:3]))
    assert R.check_claim(RUN, MB, route, claim) == 1
    for bad_route in ({**route, 1: PEERS[3]}, {**route, 0: PEERS[3]}):   # names another peer / by another peer
        with pytest.raises(R.BadReceipt):
            R.check_claim(RUN, MB, bad_route, claim)
    forged = R.sign(SIGNERS[1], RUN, pb.StageReceipt(microbatch_id=MB, stage=0, output_digest=claim.output_digest,
                                                     output=out, failed_peer=PEERS[1]))
    with pytest.raises(R.BadReceipt):                  # stage 1 cannot speak for stage 0
        R.check_claim(RUN, MB, route, forged)


def _verdict(value, peer, codec="bf16"):
    out = to_wire(value, C.CODEC_NAMES[codec])
    return R.sign(SIGNERS[peer], RUN, pb.StageReceipt(microbatch_id=MB, stage=1, input_digest=b"in", output=out,
                                                      output_digest=R.tensor_digest(out), weights_version=b"v1"))


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_the_tolerance_follows_the_codec_and_a_third_replica_convicts(codec):
    torch.manual_seed(0)
    honest = torch.randn(4, 16, 64)
    drifted = honest + 0.5 * R.SLACK * honest.std() * torch.randn_like(honest)   # another device's arithmetic
    lie = honest + 1.0 * honest.std() * torch.randn_like(honest)                  # sim --lie-scale 1
    a, b, c = _verdict(lie, 0, codec), _verdict(honest, 1, codec), _verdict(drifted, 2, codec)
    assert R.agree(b, c) and not R.agree(a, b)
    assert R.tolerance(C.CODEC_NAMES["int8"]) > R.tolerance(C.CODEC_NAMES["bf16"]) > R.SLACK
    assert R.judge(RUN, pb.LyingReport(stage=1, receipts=[a, b, c])) == PEERS[0]
    with pytest.raises(R.BadReceipt):                  # an honest replica cannot be framed by the liar's word
        R.judge(RUN, pb.LyingReport(stage=1, receipts=[b, a, c]))
    stale = _verdict(honest, 2, codec)
    stale.weights_version = b"v0"
    with pytest.raises(R.BadReceipt):                  # a witness on another committed average: no evidence
        R.judge(RUN, pb.LyingReport(stage=1, receipts=[a, b, R.sign(SIGNERS[2], RUN, stale)]))
    with pytest.raises(R.BadReceipt):                  # one peer cannot be its own two witnesses
        R.judge(RUN, pb.LyingReport(stage=1, receipts=[a, b, _verdict(honest, 1, codec)]))


def test_the_coordinator_convicts_only_on_evidence_from_the_stage_s_replicas():
    from fedswarm.coordinator.swarm_registry import SwarmRegistry

    registry = SwarmRegistry(num_stages=1)
    registry.run_id = RUN
    cids = [10, 11, 12]
    for cid, peer in zip(cids, PEERS[:3]):
        registry.assign(cid, f"p{cid}", peer)
        registry.report_peer(cid, 1.0, 0, serving=0)
    torch.manual_seed(1)
    honest = torch.randn(4, 16, 64)
    lie = honest + honest.std() * torch.randn_like(honest)
    liar, w1, w2 = _verdict(lie, 0), _verdict(honest, 1), _verdict(honest, 2)
    for r in (liar, w1, w2):
        r.stage = 0
    liar, w1, w2 = (R.sign(SIGNERS[i], RUN, r) for i, r in enumerate((liar, w1, w2)))   # re-signed for stage 0
    registry.report_lying([pb.LyingReport(stage=0, receipts=[w1, liar, w2])])   # framing an honest replica
    assert registry.snapshot()["lying_reports_refused"] == 1 and PEERS[1] in registry.roster().stages[0].peer_ids
    registry.report_lying([pb.LyingReport(stage=0, receipts=[liar, w1, w2])])
    snap = registry.snapshot()
    assert snap["lying_peers"] == 1 and [e["peer"] for e in snap["events"] if e["kind"] == "lying_peer"] == ["p10"]
    assert PEERS[0] not in registry.roster().stages[0].peer_ids and registry.is_liar(10)


def test_a_colluding_trainer_and_peer_cannot_raise_a_replica_s_weight_above_what_its_neighbours_confirm():
    from fedswarm.coordinator.swarm_registry import SwarmRegistry

    registry = SwarmRegistry(num_stages=2)
    registry.chained = True
    colluder, honest, neighbour, trainer = 1, 2, 3, 9
    for cid, peer in ((colluder, PEERS[0]), (neighbour, PEERS[1]), (honest, PEERS[2])):
        registry.assign(cid, f"p{cid}", peer)           # stage 0, stage 1, stage 0
    registry.add_trainer(trainer, "t", PEERS[3])
    registry.report_trainer(trainer, "t", 10, 0, 0, 1_000_000,          # the colluding trainer's word
                            routed={PEERS[0]: 10**9, PEERS[2]: 8192, PEERS[1]: 10**9})
    registry.report_peer(colluder, 1.0, 0, serving=0, confirmed={PEERS[1]: 10**9})   # and the peer's own
    registry.report_peer(neighbour, 1.0, 0, serving=1, confirmed={PEERS[0]: 4096, PEERS[2]: 8192})
    assert registry.sync_weight(0, 1_000_000, colluder) == 4096          # what the honest neighbour saw
    assert registry.sync_weight(0, 8192, honest) == 8192
    registry.synced([colluder, honest])                                  # counted afresh after the average
    assert registry.sync_weight(0, 1_000_000, colluder) == 1


def test_two_peers_on_different_stages_confirming_each_other_cannot_raise_a_replica_s_weight():
    """The pair confirm each other's chained tokens in their heartbeats; the honest trainer's completed chains
    (each hop's signed receipt checked) never went through them, so their weight stays what honest traffic
    supports, while the honest replicas' weights are what they did."""
    from fedswarm.coordinator.swarm_registry import SwarmRegistry

    registry = SwarmRegistry(num_stages=2)
    registry.chained = True
    ids = ["Qm" + c * 44 for c in "abcd"]
    (a, b, h0, h1), trainer = range(4), 9            # a (stage 0) and b (stage 1) collude; h0, h1 are honest
    for cid in (a, b, h0, h1):
        registry.assign(cid, f"p{cid}", ids[cid])      # stage 0, 1, 0, 1
    registry.add_trainer(trainer, "t", PEERS[3])
    registry.report_trainer(trainer, "t", 16, 0, 0, 8192, routed={ids[h0]: 8192, ids[h1]: 8192})
    registry.report_peer(a, 1.0, 0, serving=0, confirmed={ids[b]: 10**9})
    registry.report_peer(b, 1.0, 0, serving=1, confirmed={ids[a]: 10**9})
    registry.report_peer(h1, 1.0, 0, serving=1, confirmed={ids[h0]: 8192})
    registry.report_peer(h0, 1.0, 0, serving=0, confirmed={ids[h1]: 8192})
    assert registry.sync_weight(0, 8192, a) == 1 and registry.sync_weight(1, 8192, b) == 1
    assert registry.sync_weight(0, 8192, h0) == 8192 and registry.sync_weight(1, 8192, h1) == 8192
    registry.remove(trainer, "left")                    # a trainer that left still vouches for what it routed
    assert registry.sync_weight(0, 8192, h0) == 8192


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_a_spot_check_runs_on_the_committed_average_one_layer_in_float32_at_a_time(preset):
    """on_weights (the spot check's forward) computes what a forward on the whole average converted to float32
    computes, while the stage keeps its own (trained-apart) weights; no float32 copy of the whole average."""
    from fedswarm.client.swarm.chain import on_weights
    from fedswarm.stages import Stage, build_untied_model, stage_state

    full = build_untied_model(preset, 0)
    x = torch.randint(0, full.config.vocab_size, (2, 8))
    for index in range(3):
        stage = Stage(full, index, 3).eval()
        base = {n: (t + 0.01 * torch.randn_like(t)).to(torch.bfloat16) for n, t in stage_state(stage).items()}
        own = {n: p.detach().clone() for n, p in stage.named_parameters()}
        inputs = (x,) if index == 0 else (torch.randn(2, 8, full.config.hidden_size),)
        inputs += (x,) if stage.is_last else ()
        with torch.no_grad():
            expected = torch.func.functional_call(stage, {n: t.float() for n, t in base.items()}, inputs)
            swapped = []   # at each submodule's forward: how many float32 copies the stage holds
            with on_weights(stage, base, torch.device("cpu")):
                probes = [m.register_forward_pre_hook(lambda *_: swapped.append(sum(
                    not isinstance(t, torch.nn.Parameter) for t in stage.parameters()))) for m in stage.modules()]
                got = stage(*inputs)
            for probe in probes:
                probe.remove()
            live = stage(*inputs)
        assert torch.equal(got, expected), (preset, index)
        assert 0 < max(swapped) <= 2, swapped                      # one layer's weight and bias at most
        assert not torch.equal(live, expected)                     # its own weights differ, and are back
        assert all(torch.equal(p, own[n]) and isinstance(p, torch.nn.Parameter) for n, p in stage.named_parameters())
