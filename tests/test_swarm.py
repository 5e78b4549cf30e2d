"""Swarm fault injection with real processes on 127.0.0.1: a coordinator in --mode swarm, stage peers and
a trainer (`fedswarm client --role peer|trainer`), peers killed mid-request (FEDSWARM_FAULT) or SIGKILLed
from the test, and the per-stage average checked against Flower's own aggregation.

Placement is deterministic: a new peer takes the stage with the fewest peers (ties: lowest index), and
each peer is started only once the previous one shows up in status, so p0, p1, ... land on stages
0, 1, ..., S-1, 0, 1, ...
"""
from __future__ import annotations

import json
import math
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch

from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import wire
from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status

SMALL = ["--seq-len", "64", "--batch-size", "8"]
OPTIONS = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
           ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096)]


# -- helpers -----------------------------------------------------------------------------------------------
def _until(what: str, check, deadline_s: float, watch=(), poll_s: float = 0.2):
    """Poll `check()` until truthy and return its value; fail at once if a watched process exited."""
    tick, deadline = threading.Event(), time.monotonic() + deadline_s
    while True:
        for proc in watch:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}:\n"
                            f"{proc.output()[-3000:]}")
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {deadline_s:.0f} s")
        tick.wait(poll_s)


def _swarm_status(address: str) -> dict:
    return fetch_status(address)["swarm"]


def _stage_of(swarm: dict, name: str) -> int | None:
    return next((s["stage"] for s in swarm["stages"] if name in s["peers"]), None)


class Swarm:
    """The peers and trainers of one test; `close()` stops every one of them."""

    def __init__(self, out: Path, address: str, coordinator: Proc):
        self.out, self.address, self.coordinator = out, address, coordinator
        self.procs: dict[str, Proc] = {}

    def start_peer(self, name: str, expected_stage: int, env: dict | None = None) -> Proc:
        """Start a peer and wait until status shows it joined on `expected_stage`."""
        argv = fedswarm_cmd("client", "--role", "peer", "--coordinator", self.address, "--name", name,
                            "--threads", "1")
        proc = self.procs[name] = Proc(name, argv, self.out / f"{name}.log", env=env)
        stage = _until(f"{name} joined", lambda: _stage_of(_swarm_status(self.address), name) is not None
                       and [_stage_of(_swarm_status(self.address), name)], 90, [proc, self.coordinator])[0]
        assert stage == expected_stage, f"{name} landed on stage {stage}, expected {expected_stage}"
        return proc

    def start_trainer(self, name: str = "t0") -> Proc:
        argv = fedswarm_cmd("client", "--role", "trainer", "--coordinator", self.address, "--name", name,
                            "--threads", "1", "--inflight", "1")
        proc = self.procs[name] = Proc(name, argv, self.out / f"{name}.log")
        return proc

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):   # the trainer first: no bans logged at teardown
            proc.stop()


@contextmanager
def swarm_run(out: Path, stages: int, rounds: int, average_every: int, extra: list[str] = ()):
    args = ["--state-dir", str(out / "state"), "--mode", "swarm", "--stages", str(stages), "--rounds", str(rounds),
            "--average-every", str(average_every), *SMALL, *extra]
    with coordinator_process(out, args) as (coordinator, address):
        swarm = Swarm(out, address, coordinator)
        try:
            yield swarm
        finally:
            swarm.close()


def _completed(address: str) -> int:
    return _swarm_status(address)["microbatches_completed"]


def _kill_after_fresh_heartbeat(swarm: Swarm, victim: str, trainer: str = "t0") -> tuple[float, int]:
    """SIGKILL `victim`'s process group right after the trainer's counts reached the coordinator (its
    heartbeat is < 0.15 s old), so the count read here is the count at the kill; returns (t_kill, count)."""
    def fresh():
        status = fetch_status(swarm.address)
        seen = next(c["seen_s_ago"] for c in status["clients"] if c["name"] == trainer)
        return seen < 0.15 and [status["swarm"]["microbatches_completed"]]
    count = _until("a fresh trainer heartbeat", fresh, 10, [swarm.procs[trainer]], poll_s=0.02)[0]
    swarm.procs[victim].signal(signal.SIGKILL)
    return time.monotonic(), count


def _time_to_next_completion(swarm: Swarm, t_kill: float, count: int, deadline_s: float, watch) -> float:
    _until("a micro-batch completed after the kill", lambda: _completed(swarm.address) > count, deadline_s,
           watch, poll_s=0.02)
    return time.monotonic() - t_kill


# -- 1. replay after a peer dies inside a forward and inside a backward ------------------------------------------
@pytest.mark.timeout(200)
def test_replay_after_peer_dies_mid_forward_and_mid_backward(tmp_path):
    with swarm_run(tmp_path, stages=2, rounds=50, average_every=10) as swarm:
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
        # Both replays are in the trainer's counts once a heartbeat after them arrived (0.5 s cadence).
        sw = _until("the replays reported", lambda: (s := _swarm_status(swarm.address))["microbatches_retried"] >= 1
                    and s, 10, healthy)
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
@pytest.mark.timeout(240)
def test_sigkill_replica_then_only_peer(tmp_path):
    with swarm_run(tmp_path, stages=3, rounds=50, average_every=5) as swarm:
        p = {}
        for i, stage in enumerate([0, 1, 2, 0, 1]):   # stage 0: p0, p3; stage 1: p1, p4; stage 2: p2
            p[f"p{i}"] = swarm.start_peer(f"p{i}", stage)
        trainer = swarm.start_trainer()
        watch = [swarm.coordinator, trainer, *p.values()]
        _until(">= 20 micro-batches", lambda: _completed(swarm.address) >= 20, 120, watch)
        status = fetch_status(swarm.address)
        assert status["swarm"]["microbatches_lost"] == 0

        # A replica of a two-replica stage: the trainer replays on the other one. Measured on the coordinator's
        # counts, which trail the trainer by up to one heartbeat (0.5 s): hence 2.5 s against the 2 s.
        watch.remove(p["p3"])
        t_kill, count = _kill_after_fresh_heartbeat(swarm, "p3")
        replica_recovery = _time_to_next_completion(swarm, t_kill, count, 30, watch)
        print(f"\nrecovery after SIGKILL of a stage-0 replica (p3): {replica_recovery:.2f} s")
        assert replica_recovery <= 2.5

        # The only peer of stage 2: its lease (3 s) runs out, a peer of stage 1 (the only stage left with two)
        # is re-assigned to stage 2 and starts from stage 2's committed average.
        watch.remove(p["p2"])
        status = fetch_status(swarm.address)
        rounds_at_kill = status["rounds"]
        loss_at_kill = rounds_at_kill[-1]["eval_loss"]
        t_kill, count = _kill_after_fresh_heartbeat(swarm, "p2")
        only_peer_recovery = _time_to_next_completion(swarm, t_kill, count, 60, watch)
        print(f"recovery after SIGKILL of stage 2's only peer (p2): {only_peer_recovery:.2f} s")
        sw = _swarm_status(swarm.address)
        moves = [e for e in sw["reassignments"] if e["stage"] == 2 and "lost its last peer" in e["reason"]]
        assert moves, sw["reassignments"]
        assert only_peer_recovery <= 10.0
        assert sw["stages"][2]["peers"] == [moves[-1]["peer"]]
        assert moves[-1]["peer"] in {"p0", "p1", "p4"}, moves   # used to serve stage 0 or 1
        assert moves[-1]["peer"] in {"p1", "p4"}, "stage 0 had only p0 left: the donor must come from stage 1"
        _until("the re-assigned peer serving stage 2",
               lambda: re.search(r"now serving stage 2 \(was 1\)", p[moves[-1]["peer"]].output()), 10, watch)

        # Training goes on: two more rounds commit and the eval loss keeps falling.
        last = rounds_at_kill[-1]["round"]
        status = _until("2 rounds committed after the second kill",
                        lambda: (s := fetch_status(swarm.address))["round"] >= last + 2 and s, 120, watch)
        rounds = status["rounds"]
        assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"], rounds
        assert rounds[-1]["eval_loss"] <= loss_at_kill, (loss_at_kill, rounds)
        sw = status["swarm"]
        assert sw["microbatches_lost"] == 0, sw
        assert sw["microbatches_retried"] >= 1, sw
        assert len(sw["stages"][2]["peers"]) == 1 and sw["stages"][2]["peers"][0] in {"p1", "p4"}, sw["stages"]
        assert "micro-batch lost" not in trainer.output()


# -- 3. a stage average is Flower's weighted FedAvg of the replicas --------------------------------------------
def _fetch(stub, cid: int, token: str, task_id: str = "", stage: int = -1) -> dict[str, torch.Tensor]:
    chunks = list(stub.FetchModel(pb.FetchModelRequest(client_id=cid, session_token=token, task_id=task_id,
                                                       stage=stage + 1), timeout=30))
    assembler = wire.PartAssembler({c.part.name: tuple(c.part.shape) for c in chunks}, {C.CODEC_NAMES["none"]})
    for c in chunks:
        assembler.add(c.part)
    return assembler.finish()


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
