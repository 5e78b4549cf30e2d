"""A trainer drives micro-batches through the stages: stochastic wiring, replay, never a lost micro-batch."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from fedswarm.client.swarm.routing import Router, parse_records, stage_key
from fedswarm.client.swarm.stage_server import HANDLER
from fedswarm.client.swarm.tensors import ids_to_bytes
from fedswarm.client.swarm.transport import PeerCallError, SwarmNode
from fedswarm.proto import fedswarm_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class TrainerTimeouts:
    """Every wait of the trainer, named."""

    call_s: float = 10.0              # deadline of one stage call (a forward or a backward)
    refresh_s: float = 0.5            # how often the DHT is read for stage records
    no_replica_wait_s: float = 0.1    # re-check interval while a stage has no live replica
    give_up_s: float = 300.0          # a micro-batch still unplaced after this is counted lost


@dataclass
class TrainerStats:
    completed: int = 0
    retried: int = 0                  # micro-batches that needed at least one replay
    lost: int = 0
    tokens: int = 0
    losses: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class MicrobatchLost(RuntimeError):
    pass


class WorkerFailed(RuntimeError):
    """A micro-batch worker thread raised: the trainer stops instead of running on with fewer workers."""


def run_workers(count: int, work_once, done: threading.Event, join_s: float) -> None:
    """Call ``work_once()`` on ``count`` threads until ``done`` is set. The first exception any worker raises
    stops them all (``done`` is set) and is re-raised here as WorkerFailed, so a bug cannot silently kill
    a thread and leave the trainer running at reduced width (or not at all)."""
    failures: list[BaseException] = []
    lock = threading.Lock()

    def loop(i: int) -> None:
        try:
            while not done.is_set():
                work_once()
        except BaseException as err:  # noqa: BLE001 - recorded and re-raised by run_workers
            log.exception("micro-batch worker %d failed; stopping the trainer", i)
            with lock:
                failures.append(err)
            done.set()

    threads = [threading.Thread(target=loop, args=(i,), name=f"microbatch-{i}", daemon=True)
               for i in range(max(1, count))]
    for t in threads:
        t.start()
    done.wait()
    for t in threads:
        t.join(join_s)
    with lock:
        first = failures[0] if failures else None
    if first is not None:
        raise WorkerFailed(f"a micro-batch worker failed: {type(first).__name__}: {first}") from first


class SwarmTrainer:
    def __init__(self, node: SwarmNode, run_id: str, num_stages: int, router: Router | None = None,
                 timeouts: TrainerTimeouts | None = None):
        self.node, self.run_id, self.num_stages = node, run_id, num_stages
        self.router = router or Router()
        self.t = timeouts or TrainerTimeouts()
        self.stats = TrainerStats()
        self.lookup_seconds = 0.0          # the last DHT refresh's duration (diagnostics)
        self._wake = threading.Event()      # ask the refresher for a read now
        self._refreshed = threading.Condition()
        self._generation = 0
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, name="dht-refresh", daemon=True)
        self._refresher.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()

    def refresh(self) -> None:
        """Read every stage's replicas from the DHT once, now (the background loop does this every refresh_s)."""
        started = time.monotonic()
        for stage in range(self.num_stages):
            raw = self.node.lookup(stage_key(self.run_id, stage))
            if raw is None:  # the DHT did not answer: keep the last known replicas rather than forget them all
                continue
            self.router.update(stage, parse_records(stage, raw))
        self.lookup_seconds = time.monotonic() - started
        with self._refreshed:
            self._generation += 1
            self._refreshed.notify_all()

    def _refresh_loop(self) -> None:
        """Micro-batches never wait on the DHT: records are read here, in the background."""
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - keep the last known records
                log.warning("DHT refresh failed: %s", err)
            self._wake.wait(self.t.refresh_s)
            self._wake.clear()

    def _await_refresh(self, timeout: float) -> None:
        """Wake the refresher and wait (bounded) for its next read."""
        with self._refreshed:
            seen = self._generation
            self._wake.set()
            self._refreshed.wait_for(lambda: self._generation > seen, timeout)

    def step(self, x, y) -> float:
        """One micro-batch forward through every stage, then backward; returns its loss."""
        mb = uuid.uuid4().hex
        ids, labels = ids_to_bytes(x), ids_to_bytes(y)
        inputs: list[pb.StageRequest] = []     # what each stage was sent: kept for replay
        used: list[str] = []
        replayed = False
        hidden = None
        reply = None
        for stage in range(self.num_stages):
            req = pb.StageRequest(run_id=self.run_id, stage=stage, microbatch_id=mb)
            if stage == 0:
                req.ids, req.ids_shape[:] = ids, list(x.shape)
            else:
                req.hidden.CopyFrom(hidden)
            if stage == self.num_stages - 1:
                req.labels = labels
            reply, peer, retried = self._call(stage, req)
            inputs.append(req)
            used.append(peer)
            replayed |= retried
            if stage < self.num_stages - 1:
                hidden = reply.hidden      # relayed as-is: the trainer never decodes activations
        loss = reply.loss
        grad = reply.grad_input
        for stage in range(self.num_stages - 2, -1, -1):
            req = pb.StageRequest()
            req.CopyFrom(inputs[stage])
            req.backward = True
            req.grad_output.CopyFrom(grad)
            reply, _, retried = self._call(stage, req, prefer=used[stage])
            replayed |= retried
            grad = reply.grad_input
        with self.stats.lock:
            self.stats.completed += 1
            self.stats.retried += int(replayed)
            self.stats.tokens += x.numel()
            self.stats.losses.append(loss)
        return loss

    def _call(self, stage: int, req: pb.StageRequest, prefer: str | None = None) -> tuple[pb.StageReply, str, bool]:
        """Send to a live replica; on failure ban it and replay on another. Never drops the request."""
        started, retried = time.monotonic(), False
        while True:
            peer = prefer if prefer and not self.router.is_banned(prefer) and prefer in self.router.peers(stage) else None
            prefer = None
            if peer is None:
                record = self.router.choose(stage)
                peer = record.peer_id if record else None
            if peer is None:
                if time.monotonic() - started > self.t.give_up_s:
                    with self.stats.lock:
                        self.stats.lost += 1
                    raise MicrobatchLost(f"stage {stage} had no live replica for {self.t.give_up_s:.0f} s")
                self._await_refresh(max(self.t.no_replica_wait_s, 1.0))
                continue
            self.router.begin(peer)
            t0 = time.monotonic()
            try:
                reply = self.node.call(peer, HANDLER, req, pb.StageReply, timeout=self.t.call_s)
            except PeerCallError as err:
                self.router.end(peer, ok=False, seconds=time.monotonic() - t0)
                self.router.ban(peer, f"{'backward' if req.backward else 'forward'} of stage {stage}: {err.kind}: {err}")
                retried = True
                continue
            self.router.end(peer, ok=True, seconds=time.monotonic() - t0)
            return reply, peer, retried
