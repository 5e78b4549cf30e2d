"""Swarm fault injection with real processes on 127.0.0.1: a coordinator in --mode swarm, stage peers and
a trainer (`fedswarm client --role peer|trainer`), peers killed mid-request (FEDSWARM_FAULT) or SIGKILLed
from the test, and the per-stage average checked against Flower's own aggregation.

Placement is deterministic: a new peer takes the stage with the fewest peers (ties: lowest index), and
each peer is started only once the previous one shows up in status, so p0, p1, ... land on stages
0, 1, ..., S-1, 0, 1, ...
"""
from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time

import grpc
import pytest
import torch

from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import wire
from fedswarm.sim.processes import Proc, fetch_status
from fedswarm.app.testing import Swarm, completed, stage_of, swarm_run, swarm_status, until

OPTIONS = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
           ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096)]


# -- helpers (fedswarm.app.testing: shared with the other swarm tests) ------------------------------------------
_until, _swarm_status, _stage_of, _completed = until, swarm_status, stage_of, completed


def _recovery_time(swarm: Swarm, victim: str, deadline_s: float, watch, trainer: str = "t0") -> float:
    """SIGKILL `victim`'s process group; return the seconds until the coordinator shows a micro-batch completed
    after the kill.

    The trainer reports its counts every 0.5 s, so "after the kill" is judged against the count in its first
    heartbeat sent after the kill (that count holds everything completed before it); the next increase is
    a micro-batch completed after the kill. This is an upper bound: it includes the time to that first
    heartbeat and the reporting lag of the next one (each up to one 0.5 s heartbeat interval)."""
    swarm.procs[victim].signal(signal.SIGKILL)
    t_kill = time.monotonic()

    def first_beat_after_kill():
        status = fetch_status(swarm.address)
        seen = next(c["seen_s_ago"] for c in status["clients"] if c["name"] == trainer)
        return time.monotonic() - seen > t_kill + 0.02 and [status["swarm"]["microbatches_completed"]]
    baseline = _until("a trainer heartbeat after the kill", first_beat_after_kill, 10, watch, poll_s=0.02)[0]
    _until("a micro-batch completed after the kill", lambda: _completed(swarm.address) > baseline, deadline_s,
           watch, poll_s=0.02)
    return time.monotonic() - t_kill


def _placement(swarm: dict) -> dict[int, list[str]]:
    return {s["stage"]: s["peers"] for s in swarm["stages"]}


def _steady(address: str):
    """Every stage's served throughput measured (> 0) and within 2x of the others: with one trainer every
    micro-batch crosses every stage, so once all windows cover traffic the totals agree (the registry's
    bottleneck move can fire while the first windows after the trainer's start still hold idle time)."""
    sw = _swarm_status(address)
    rates = [s["throughput"] for s in sw["stages"]]
    return min(rates) > 0 and max(rates) <= 2 * min(rates) and sw


# -- 1. replay after a peer dies inside a forward and inside a backward ------------------------------------------
# The default run replays both in chained traffic (tests/test_swarm_chain.py) and runs relayed traffic through
# SIGKILLs in tests/test_swarm_sim.py.
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_replay_after_peer_dies_mid_forward_and_mid_backward(tmp_path):
    # relayed traffic: every hop's forward and backward is a trainer call (tests/test_swarm_chain.py: chained)
    with swarm_run(tmp_path, stages=2, rounds=50, average_every=10, extra=["--swarm-traffic", "relayed"]) as swarm:
        p = {}
        faults = {"p2": {"FEDSWARM_FAULT": "die_on_forward:2"}, "p4": {"FEDSWARM_FAULT": "die_on_backward:2"}}
        for i, stage in enumerate([0, 1, 0, 1, 0]):   # stage 0: p0, p2, p4; stage 1: p1, p3
            p[f"p{i}"] = swarm.start_peer(f"p{i}", stage, env=faults.get(f"p{i}"))
        trainer = swarm.start_trainer()
        healthy = [swarm.coordinator, trainer, p["p0"], p["p1"], p["p3"]]

        _until("both faulty peers dead", lambda: p["p2"].popen.poll() is not None and p["p4"].popen.poll() is not None,
               120, healthy, poll_s=0.1)
        after_deaths = _completed(swarm.address)
        _until(">= 10 micro-batches after the second death", lambda: _completed(swarm.address) >= after_deaths + 10,
               90, healthy)

        fwd = _until("p2's fault line", lambda: re.search(r"fault injection: dying during forward of micro-batch (\w+)",
                                                           p["p2"].output()), 10)
        bwd = _until("p4's fault line", lambda: re.search(r"fault injection: dying during backward of micro-batch (\w+)",
                                                           p["p4"].output()), 10)
        assert p["p2"].popen.returncode == -signal.SIGKILL and p["p4"].popen.returncode == -signal.SIGKILL
        # A micro-batch that needed any replay counts once: the two faults hit two micro-batches unless the
        # replayed forward of p2's micro-batch happened to land on p4 and be p4's fatal backward.
        distinct = len({fwd.group(1), bwd.group(1)})
        sw = _until(f"{distinct} replayed micro-batches reported",
                    lambda: (s := _swarm_status(swarm.address))["microbatches_retried"] >= distinct and s, 10, healthy)
        assert sw["microbatches_lost"] == 0, sw
        assert sw["microbatches_retried"] >= 2 or distinct == 1, sw
        log = trainer.output()
        assert re.search(r"failed \(forward of stage 0: (unreachable|error|timeout)", log), log[-3000:]
        assert re.search(r"failed \(backward of stage 0: (unreachable|error|timeout)", log), log[-3000:]
        assert "micro-batch lost" not in log
        for name in ("p0", "p1", "p3"):
            assert p[name].popen.poll() is None, f"{name} died"


# -- 2. SIGKILL a replica, then the only peer of a stage ----------------------------------------------------------
@pytest.mark.slow   # the default run heals both across hosts (tests/test_hosts_swarm.py: replica SIGKILL, only peer lost)
@pytest.mark.timeout(240)
def test_sigkill_replica_then_only_peer(tmp_path):
    with swarm_run(tmp_path, stages=3, rounds=50, average_every=5) as swarm:
        p = {}
        for i, stage in enumerate([0, 1, 2, 0, 1]):   # stage 0: p0, p3; stage 1: p1, p4; stage 2: p2
            p[f"p{i}"] = swarm.start_peer(f"p{i}", stage)
        trainer = swarm.start_trainer()
        watch = [swarm.coordinator, trainer, *p.values()]
        _until(">= 20 micro-batches", lambda: _completed(swarm.address) >= 20, 120, watch)
        sw = _until("steady per-stage throughput", lambda: _steady(swarm.address), 60, watch)
        assert sw["microbatches_lost"] == 0, sw
        # The issue's victims are p3 (a replica of stage 0) and p2 (stage 2's only peer). The registry may have
        # moved one peer as a "bottleneck" while the first throughput windows were still ramping up, so the
        # victims are picked by role from the live placement: the same p3 and p2 when nothing moved.
        placement = _placement(sw)

        # 1. A replica of a stage with two: the trainer replays on the other one. The issue asks for 2 s; the
        #    coordinator's counts trail the trainer by up to one 0.5 s heartbeat, hence 2.5 s here.
        stage_a = min(s for s, peers in placement.items() if len(peers) >= 2)
        victim_a = "p3" if "p3" in placement[stage_a] else placement[stage_a][-1]
        watch.remove(p[victim_a])
        replica_recovery = _recovery_time(swarm, victim_a, 30, watch)
        print(f"\nrecovery after SIGKILL of {victim_a}, a replica of stage {stage_a}: {replica_recovery:.2f} s")
        assert replica_recovery <= 2.5
        sw = _until(f"{victim_a} dropped (lease)", lambda: (s := _swarm_status(swarm.address)) and
                    _stage_of(s, victim_a) is None and s, 30, watch)
        assert not [e for e in sw["reassignments"] if "lost its last peer" in e["reason"]], sw["reassignments"]

        # 2. The only peer of a stage (stage 2): its lease (3 s) runs out, a peer of a stage with two replicas
        #    is re-assigned to it and starts from the stage's committed average.
        placement = _placement(sw)
        singles = [s for s, peers in placement.items() if len(peers) == 1]
        stage_b = 2 if 2 in singles else max(singles)
        victim_b = placement[stage_b][0]
        assert (stage_a, victim_a, stage_b, victim_b) == (0, "p3", 2, "p2") or sw["reassignments"], sw
        served_before = {name: s for s, peers in placement.items() for name in peers}
        status = fetch_status(swarm.address)
        rounds_at_kill = status["rounds"]
        wall_kill = time.time()
        watch.remove(p[victim_b])
        only_peer_recovery = _recovery_time(swarm, victim_b, 60, watch)
        print(f"recovery after SIGKILL of {victim_b}, stage {stage_b}'s only peer: {only_peer_recovery:.2f} s")
        sw = _swarm_status(swarm.address)
        moves = [e for e in sw["reassignments"] if e["stage"] == stage_b and "lost its last peer" in e["reason"]
                 and e["at"] >= wall_kill - 0.5]
        assert len(moves) == 1, sw["reassignments"]
        assert only_peer_recovery <= 10.0
        mover = moves[0]["peer"]
        assert _placement(sw)[stage_b] == [mover], sw["stages"]
        assert served_before[mover] != stage_b, (mover, served_before)   # it used to serve another stage
        assert len(placement[served_before[mover]]) >= 2, "the donor must be a stage with a replica to spare"
        assert re.search(rf"now serving stage {stage_b} \(was {served_before[mover]}\)", p[mover].output()), \
            p[mover].output()[-2000:]

        # 3. Training goes on: at least two more rounds commit and the eval loss keeps falling.
        last, loss_at_kill = rounds_at_kill[-1]["round"], rounds_at_kill[-1]["eval_loss"]

        def rounds_after():
            rounds = fetch_status(swarm.address)["rounds"]
            return rounds[-1]["round"] >= last + 2 and rounds[-1]["eval_loss"] <= loss_at_kill and rounds
        rounds = _until(f"2+ rounds after the second kill with eval loss <= {loss_at_kill:.4f}", rounds_after, 120,
                        watch)
        assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"], rounds
        sw = _swarm_status(swarm.address)
        assert sw["microbatches_lost"] == 0, sw
        assert sw["microbatches_completed"] > 20, sw
        assert "micro-batch lost" not in trainer.output()


# -- 3. a stage average is Flower's weighted FedAvg of the replicas --------------------------------------------
def _fetch(stub, cid: int, token: str, task_id: str = "", stage: int = -1) -> dict[str, torch.Tensor]:
    chunks = list(stub.FetchModel(pb.FetchModelRequest(client_id=cid, session_token=token, task_id=task_id,
                                                       stage=stage + 1), timeout=30))
    assembler = wire.PartAssembler({c.part.name: tuple(c.part.shape) for c in chunks}, {C.CODEC_NAMES["none"]})
    for c in chunks:
        assembler.add(c.part)
    return assembler.finish()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_stage_average_equals_flower_aggregate(tmp_path):
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    with swarm_run(tmp_path, stages=1, rounds=1, average_every=1, extra=["--upload-codec", "none"]) as swarm, \
            grpc.insecure_channel(swarm.address, options=OPTIONS) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        push = channel.stream_unary("/fedswarm.Coordinator/PushUpdate", request_serializer=None,
                                    response_deserializer=pb.PushReply.FromString)
        peers = {}
        for name in ("a", "b"):
            joined = stub.Join(pb.JoinRequest(name=name, device="cpu", precision="fp32", role="peer"), timeout=30)
            assert joined.stage == 0
            peers[name] = joined
        # a trainer's reported tokens bound each replica's weight (SwarmRegistry.sync_weight): 1000 >= 10, 30
        trainer = stub.Join(pb.JoinRequest(name="t", device="cpu", precision="fp32", role="trainer"), timeout=30)
        cfg = json.loads(peers["a"].run_config_json)
        assert cfg["upload_codec"] == "none" and cfg["stages"] == 1
        codec = C.codec_by_name(cfg["upload_codec"])

        stop, errors = threading.Event(), []

        def heartbeats():  # both leases (3 s) stay alive; 5 steps >= --average-every 1 starts the epoch
            while not stop.wait(0.5):
                for j in peers.values():
                    try:
                        reply = stub.Heartbeat(pb.HeartbeatRequest(client_id=j.client_id, session_token=j.session_token,
                                                                   stage=0, throughput=1.0, optimizer_steps=5), timeout=10)
                        assert reply.stage == 0
                    except Exception as err:  # noqa: BLE001 - reported by the test thread
                        errors.append(err)
                try:
                    stub.Heartbeat(pb.HeartbeatRequest(client_id=trainer.client_id, session_token=trainer.session_token,
                                                       microbatches_completed=1, tokens=1000), timeout=10)
                except Exception as err:  # noqa: BLE001 - reported by the test thread
                    errors.append(err)
        beat = threading.Thread(target=heartbeats, name="heartbeats", daemon=True)
        beat.start()
        try:
            tasks, bases = {}, {}
            for name, j in peers.items():
                def pull(j=j):
                    t = stub.PullTask(pb.PullTaskRequest(client_id=j.client_id, session_token=j.session_token,
                                                         wait_s=10), timeout=30)
                    return t.kind == pb.TASK_TRAIN and t
                tasks[name] = _until(f"a stage sync task for {name}", pull, 60, [swarm.coordinator], poll_s=0.0)
                assert json.loads(tasks[name].config_json)["stage"] == 0
                bases[name] = _fetch(stub, j.client_id, j.session_token, task_id=tasks[name].task_id)
            base = bases["a"]
            assert base.keys() == bases["b"].keys() and all(torch.equal(base[k], bases["b"][k]) for k in base)

            gen = torch.Generator().manual_seed(7)
            deltas = {name: {k: torch.randn(v.shape, generator=gen) * scale for k, v in base.items()}
                      for name, scale in (("a", 1e-2), ("b", 3e-2))}
            examples = {"a": 10, "b": 30}
            for name, j in peers.items():
                task, delta = tasks[name], deltas[name]
                parts = [part for k, d in delta.items()
                         for part in wire.tensor_parts(k, tuple(d.shape), C.encode(d.flatten(), codec))]
                header = pb.UpdateHeader(client_id=j.client_id, session_token=j.session_token, task_id=task.task_id,
                                         round=task.round, num_examples=examples[name], train_loss=1.0,
                                         num_tensors=len(delta), num_parts=len(parts))
                chunks = [pb.UpdateChunk(header=header).SerializeToString()] + \
                         [pb.UpdateChunk(part=part).SerializeToString() for part in parts]
                assert push(iter(chunks), timeout=60).accepted

            status = _until("round 1 committed", lambda: (s := fetch_status(swarm.address))["round"] >= 1 and s, 60,
                            [swarm.coordinator])
            assert sorted(status["rounds"][1]["clients"]) == ["a", "b"]
            a = peers["a"]
            average = _fetch(stub, a.client_id, a.session_token, stage=0)
        finally:
            stop.set()
            beat.join(timeout=15)
        assert not errors, errors

    assert average.keys() == base.keys()
    total = sum(examples.values())
    for k in base:  # base + the examples-weighted mean of the deltas (in float64)
        expected = base[k].double() + sum(examples[n] * deltas[n][k].double() for n in peers) / total
        assert torch.allclose(average[k].double(), expected, rtol=0, atol=1e-6), k
    records = [RecordDict({"arrays": ArrayRecord(torch_state_dict={k: base[k] + deltas[n][k] for k in base}),
                           "metrics": MetricRecord({"num-examples": examples[n]})}) for n in peers]
    flower = aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()
    assert flower.keys() == average.keys()
    for k in base:
        assert torch.allclose(average[k], flower[k].float(), rtol=0, atol=1e-6), k
    assert any(not torch.allclose(average[k], base[k], rtol=0, atol=1e-4) for k in base), "the average did not move"


# -- 4. a dead peer's abandoned long-poll does not renew its lease --------------------------------------------
VICTIM = r"""
import os, signal, sys, threading
import grpc
from fedswarm.proto import fedswarm_pb2 as pb, fedswarm_pb2_grpc as pb_grpc
stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(sys.argv[1]))
j = stub.Join(pb.JoinRequest(name="victim", device="cpu", precision="fp32", role="peer"), timeout=30)
def beat():
    while True:
        stub.Heartbeat(pb.HeartbeatRequest(client_id=j.client_id, session_token=j.session_token, stage=0), timeout=10)
        threading.Event().wait(0.5)
def poll():
    print("polling", flush=True)
    stub.PullTask(pb.PullTaskRequest(client_id=j.client_id, session_token=j.session_token, wait_s=10), timeout=30)
    print("poll returned", flush=True)
threading.Thread(target=beat, daemon=True).start()
threading.Thread(target=poll, daemon=True).start()
threading.Event().wait(8.0)       # die 8 s into the 10 s long-poll: it ends 2 s later, inside the 3 s lease
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_dead_peer_long_poll_does_not_renew_its_lease(tmp_path):
    """A SIGKILLed peer must be dropped within lease (3 s) + reaper tick (1 s) of its last heartbeat, not 3 s
    after its orphaned PullTask ends (which used to renew the lease of a process that no longer exists)."""
    with swarm_run(tmp_path, stages=1, rounds=1, average_every=1) as swarm:
        victim = swarm.procs["victim"] = Proc("victim", [sys.executable, "-c", VICTIM, swarm.address],
                                             tmp_path / "victim.log")
        victim.wait_for_line(re.compile("polling"), 60)
        assert any(c["name"] == "victim" for c in fetch_status(swarm.address)["clients"])
        _until("the victim's death", lambda: victim.popen.poll() is not None, 30, [swarm.coordinator], poll_s=0.02)
        died = time.monotonic()
        _until("the victim dropped", lambda: all(c["name"] != "victim" for c in fetch_status(swarm.address)["clients"]),
               30, [swarm.coordinator], poll_s=0.05)
        dropped_after = time.monotonic() - died
        assert "poll returned" not in victim.output()   # the long-poll was still open when it died
        assert victim.popen.returncode == -signal.SIGKILL
        assert dropped_after <= 4.5, f"dropped {dropped_after:.1f} s after its death"
