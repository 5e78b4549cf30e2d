"""Chained stage traffic (--swarm-traffic chained): each stage sends its output to the next stage's replica that
the trainer chose; a hop that dies mid-chain is named by the stage before it, banned, and the micro-batch
replayed from its tokens on another route, so nothing is lost."""
from __future__ import annotations

import re

import pytest
import torch

from fedswarm.client.swarm.roster import Roster
from fedswarm.client.swarm.stage_server import StageServer
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.run_config import RunConfig
from fedswarm.sim.processes import fetch_status
from fedswarm.app.testing import completed as _completed, swarm_run, swarm_status as _swarm_status, until as _until

A, B, T = "Qm" + "a" * 44, "Qm" + "b" * 44, "Qm" + "t" * 44


def test_only_the_previous_stages_roster_peers_may_chain_into_a_stage():
    roster = Roster()
    roster.update(pb.SwarmRoster(stages=[pb.StageRoster(peer_ids=[A]), pb.StageRoster(peer_ids=[B])],
                                 trainer_peer_ids=[T], version=1))
    server = StageServer("run", RunConfig(activation_codec="bf16"), torch.device("cpu"), "fp32", roster=roster)
    try:
        forward1, backward1 = pb.StageRequest(stage=1), pb.StageRequest(stage=1, backward=True)
        assert server._may_call(T, forward1) and server._may_call(T, backward1)   # the trainer: anything
        assert server._may_call(A, forward1)                                      # stage 0's peer: a forward
        assert not server._may_call(A, backward1)                                 # ... never a backward
        assert not server._may_call(B, forward1)                                  # a peer of the same stage
        assert not server._may_call(A, pb.StageRequest(stage=0))                  # nobody before stage 0
    finally:
        server.close()


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_chained_traffic_trains_and_replays_a_dead_hop(tmp_path):
    with swarm_run(tmp_path, stages=2, rounds=50, average_every=5, extra=["--swarm-traffic", "chained"]) as swarm:
        p = {}
        # stage 0: p0, p2, p4 (dies in its 2nd backward); stage 1: p1, p3 (dies in its 2nd forward)
        faults = {"p3": {"FEDSWARM_FAULT": "die_on_forward:2"}, "p4": {"FEDSWARM_FAULT": "die_on_backward:2"}}
        for i, stage in enumerate([0, 1, 0, 1, 0]):
            p[f"p{i}"] = swarm.start_peer(f"p{i}", stage, env=faults.get(f"p{i}"))
        trainer = swarm.start_trainer()
        healthy = [swarm.coordinator, trainer, p["p0"], p["p1"], p["p2"]]
        _until("p3 died in a chained forward, p4 in a backward",
               lambda: p["p3"].popen.poll() is not None and p["p4"].popen.poll() is not None, 120, healthy, poll_s=0.1)
        after = _completed(swarm.address)
        _until(">= 12 micro-batches after p3 died, and a stage average",
               lambda: _completed(swarm.address) >= after + 12 and len(fetch_status(swarm.address)["rounds"]) >= 2,
               120, healthy)
        sw = _swarm_status(swarm.address)
        assert sw["microbatches_lost"] == 0 and sw["microbatches_retried"] >= 1, sw
        def trained(names):   # a stage sync uploaded progress over real tokens (steps reset at each sync)
            return any(int(t) > 1 for name in names
                       for t in re.findall(r"uploaded \d+ bytes of progress over (\d+) tokens", p[name].output()))
        _until("both stages trained", lambda: trained(["p0", "p2"]) and trained(["p1"]), 60, healthy)
        assert "fault injection: dying during forward" in p["p3"].output()
        assert "fault injection: dying during backward" in p["p4"].output()
        log = trainer.output()
        assert re.search(r"chained micro-batch, stage 1: (unreachable|error|timeout)", log), log[-3000:]
        assert re.search(r"chained micro-batch, stage 0: (unreachable|error|timeout)", log), log[-3000:]   # p4
        assert "micro-batch lost" not in log
        # stage 0's replicas sent their outputs on themselves (they log the count at each stage sync)
        def chained_by_stage_0():
            counts = [int(m) for name in ("p0", "p2")
                      for m in re.findall(r"(\d+) forwards chained to the next stage", p[name].output())]
            return counts and max(counts) > 0
        _until("a stage-0 sync that reports chained forwards", chained_by_stage_0, 90, healthy)
