"""Correctness the swarm's threads rely on: a Router shared by workers and the DHT refresher, worker threads
that fail loudly, a DHT that stops answering, and stage switches kept off the heartbeat thread."""
import os
import random
import signal
import threading
import time

import pytest

from fedswarm.client.swarm.roles import StageSwitcher
from fedswarm.client.swarm.roster import Roster
from fedswarm.client.swarm.routing import Router, RoutingConfig, StageRecord, stage_key
from fedswarm.client.swarm.swarm_trainer import SwarmTrainer, TrainerTimeouts, WorkerFailed, run_workers
from fedswarm.p2p import SwarmNode, SwarmTimeouts
from fedswarm.proto import fedswarm_pb2 as pb


def rec(peer, throughput=100.0, stage=0):
    return StageRecord(peer, f"srv-{peer}", stage, throughput, 0.0)


class RacingClock:
    """Holds every caller at a barrier once `racing` is set, so two threads read the clock at the same moment."""

    def __init__(self):
        self.t, self.racing = 1000.0, False
        self.barrier = threading.Barrier(2, timeout=0.5)

    def __call__(self):
        if self.racing:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:  # a locked Router lets only one thread in: no partner comes
                pass
        return self.t


def test_a_ban_expiring_under_two_threads_is_not_a_keyerror():
    clock = RacingClock()
    router = Router(RoutingConfig(ban_initial_s=2.0), rng=random.Random(0), clock=clock)
    router.update(0, [rec("a")])
    router.ban("a", "timeout")
    clock.t += 5.0                       # the ban has run out; both threads notice it at once
    clock.racing = True
    results, errors = [], []

    def check():
        try:
            results.append(router.is_banned("a"))
        except Exception as err:  # noqa: BLE001 - the assertion below reports it
            errors.append(err)
    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not errors, errors
    assert results == [False, False]


@pytest.mark.integration
def test_router_under_workers_and_a_refresher():
    router = Router(RoutingConfig(ban_initial_s=0.001, ban_max_s=0.002), rng=random.Random(1))
    stop, errors = threading.Event(), []

    def worker(seed):
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                r = router.choose(0)
                if r is None:
                    continue
                router.begin(r.peer_id)
                ok = rng.random() < 0.7
                router.end(r.peer_id, ok=ok, seconds=0.001)
                if not ok:
                    router.ban(r.peer_id, "test")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    def refresher():
        rng = random.Random(99)
        try:
            while not stop.is_set():
                router.update(0, [rec(p) for p in "abcdef" if rng.random() < 0.6])
        except Exception as err:  # noqa: BLE001
            errors.append(err)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)] + [threading.Thread(target=refresher)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the workload's duration, not a wait for readiness
    stop.set()
    for t in threads:
        t.join(5)
    assert not errors, errors[:3]
    assert all(router.inflight(p) == 0 for p in "abcdef")


def test_a_failing_worker_stops_the_trainer_loudly():
    calls, lock = [0], threading.Lock()

    def work_once():
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 5:
            raise ValueError("a bug in micro-batch 5")
        time.sleep(0.001)
    done = threading.Event()
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match="a bug in micro-batch 5"):
        run_workers(3, work_once, done, join_s=5)
    assert done.is_set() and time.monotonic() - started < 5


def test_workers_end_when_the_run_is_done():
    done = threading.Event()
    n = [0]

    def work_once():
        n[0] += 1
        if n[0] >= 10:
            done.set()
    run_workers(2, work_once, done, join_s=5)
    assert n[0] >= 10


def test_a_stage_switch_never_blocks_the_caller():
    release, busy, switched, failures = threading.Event(), threading.Event(), [], []

    def slow_switch(stage, why):
        busy.set()
        release.wait(10)  # a fetch + build that outlives the 3 s lease
        switched.append(stage)
    switcher = StageSwitcher(slow_switch, failures.append)
    try:
        t0 = time.monotonic()
        switcher.request(1, "test")
        assert busy.wait(5)
        for stage in (2, 3):  # two more heartbeats while the first switch is still running
            switcher.request(stage, "test")
        assert time.monotonic() - t0 < 0.5
        release.set()
        deadline = time.monotonic() + 5
        while switched != [1, 3] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert switched == [1, 3]  # the latest request wins; the stale one in between is skipped
        assert not failures
    finally:
        switcher.close()


def test_a_failing_switch_is_reported():
    failed = threading.Event()
    errors = []

    def broken(stage, why):
        raise MemoryError("no room for stage 2")
    switcher = StageSwitcher(broken, lambda err: (errors.append(err), failed.set()))
    try:
        switcher.request(2, "test")
        assert failed.wait(5)
        assert isinstance(errors[0], MemoryError)
    finally:
        switcher.close()


@pytest.mark.integration
def test_a_dht_that_stops_answering_keeps_the_last_records():
    """SIGSTOP the DHT process: lookups time out. The trainer must keep the load records it knew (not fall
    back to knowing nothing about the replicas)."""
    node = SwarmNode(timeouts=SwarmTimeouts(dht_op_s=0.5))
    other = SwarmNode(initial_peers=node.maddrs())
    trainer = None
    roster = Roster()
    roster.update(pb.SwarmRoster(stages=[pb.StageRoster(peer_ids=[node.peer_id, other.peer_id])], version=1))
    try:   # each node announces its own record (only its own key can sign it)
        assert node.announce(stage_key("run", 0), rec(node.peer_id, 1000.0).to_value(), ttl=60)
        assert other.announce(stage_key("run", 0), rec(other.peer_id, 10.0).to_value(), ttl=60)
        trainer = SwarmTrainer(node, "run", 1, roster, hidden_size=8, timeouts=TrainerTimeouts(refresh_s=0.1))
        trainer.refresh()
        known = trainer.router.weights(0)
        assert known == pytest.approx({node.peer_id: 1000 / 1010, other.peer_id: 10 / 1010})
        os.kill(node._dht.pid, signal.SIGSTOP)
        try:
            assert node.lookup(stage_key("run", 0)) is None   # no answer, not "no replicas"
            trainer.refresh()
            assert trainer.router.weights(0) == pytest.approx(known)
        finally:
            os.kill(node._dht.pid, signal.SIGCONT)
    finally:
        if trainer is not None:
            trainer.close()
        other.shutdown()
        node.shutdown()
