"""A trainer drives micro-batches through the stages: stochastic wiring, replay, never a lost micro-batch."""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from fedswarm.client.swarm.evidence import Blame, Evidence
from fedswarm.client.swarm.roster import Roster, roster_records
from fedswarm.p2p import Refusals
from fedswarm.client.swarm.routing import Router, stage_key
from fedswarm.client.swarm.chain import HANDLER
from fedswarm.client.swarm.tensors import WIRE_CODECS, BadStageInput, from_wire, ids_to_bytes
from fedswarm.p2p import PeerCallError, SwarmNode
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto.refusals import Reason
from fedswarm.swarm_settings import SpotChecks, TrainerTimeouts
from fedswarm.workers import WorkerFailed, run_workers  # noqa: F401 - the trainer's worker discipline (roles.py)

log = logging.getLogger(__name__)
FOREIGN_GRACE_S = 6.0   # > a stage record's TTL (4 s): an honest peer's stale record is gone by then


@dataclass
class TrainerStats:
    completed: int = 0
    retried: int = 0                  # micro-batches that needed at least one replay
    lost: int = 0
    tokens: int = 0
    losses: list = field(default_factory=list)
    routed: collections.Counter = field(default_factory=collections.Counter)   # peer id -> tokens of chains
    lock: threading.Lock = field(default_factory=threading.Lock)


class MicrobatchLost(RuntimeError):
    pass


class BadReply(Exception):
    """A replica answered with something unusable (wrong shape, codec, non-finite): that replica is to blame."""


def check_reply(stage: int, num_stages: int, req: pb.StageRequest, reply: pb.StageReply, hidden_shape) -> None:
    """BadReply unless ``reply`` carries what ``stage`` must return for ``req``, well-formed and finite: the
    trainer checks before relaying, so a malformed activation is blamed on the replica that produced it."""
    last = stage == num_stages - 1
    if last and not math.isfinite(reply.loss):
        raise BadReply(f"loss {reply.loss}")
    wanted = []
    if not last and not req.backward:
        wanted.append(("hidden", reply.hidden))
    if stage > 0 and (req.backward or last) and not req.verify:
        wanted.append(("grad_input", reply.grad_input))
    for what, tensor in wanted:
        try:
            value = from_wire(tensor, hidden_shape, WIRE_CODECS)
        except BadStageInput as err:
            raise BadReply(f"{what}: {err}") from None
        if not torch.isfinite(value).all():
            raise BadReply(f"{what} is not finite")


class SwarmTrainer:
    """Micro-batches through the roster's peers: the coordinator's roster says who serves each stage, the DHT
    only how busy they are. Replies are checked before they are relayed, so a malformed activation is
    blamed on (and replayed away from) the replica that produced it, not the next stage."""

    def __init__(self, node: SwarmNode, run_id: str, num_stages: int, roster: Roster, hidden_size: int,
                 router: Router | None = None, timeouts: TrainerTimeouts | None = None,
                 cap_factor: float = 4.0, chained: bool = False, checks: SpotChecks | None = None):
        self.node, self.run_id, self.num_stages = node, run_id, num_stages
        self.chained = chained and num_stages > 1   # stage k sends its output to stage k+1 itself
        self.roster, self.hidden_size, self.cap_factor = roster, hidden_size, cap_factor
        self.router = router or Router()
        self.t = timeouts or TrainerTimeouts()
        self.stats = TrainerStats()
        self.checks, self.rng = checks or SpotChecks(), random.Random()
        self.evidence = Evidence(run_id, num_stages, self._hidden_shape, self._call_member, self.router,
                                 completed=lambda: self.stats.completed)
        self.refusals = Refusals()
        self.lookup_seconds = 0.0          # the last DHT refresh's duration (diagnostics)
        self._raw: dict[int, dict] = {}     # the last DHT answer per stage (kept when the DHT does not answer)
        self._ignored: dict[str, set] = {Reason.RECORD_NOT_MEMBER: set(), Reason.RECORD_MALFORMED: set()}
        self._foreign_since: dict[str, float] = {}
        self._lock = threading.Lock()
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
        """Read every stage's records from the DHT once, now (the background loop does this every refresh_s)."""
        started = time.monotonic()
        for stage in range(self.num_stages):
            raw = self.node.lookup(stage_key(self.run_id, stage))
            if raw is not None:  # None: the DHT did not answer; keep the last records rather than forget them
                with self._lock:
                    self._raw[stage] = raw
        unsigned = self.node.take_unsigned_records()   # written under no peer's own subkey: anyone's
        if unsigned:
            self.refusals.add(Reason.RECORD_UNSIGNED, unsigned)
            log.warning("ignored %d DHT record(s) that no peer signed", unsigned)
        self.apply_roster()
        self.lookup_seconds = time.monotonic() - started
        with self._refreshed:
            self._generation += 1
            self._refreshed.notify_all()

    def apply_roster(self) -> None:
        """Re-derive the routing table from the roster (called on every roster change, too)."""
        for stage in range(self.num_stages):
            with self._lock:
                raw = dict(self._raw.get(stage, {}))
            records, ignored = roster_records(stage, self.roster.stage_peers(stage), raw, self.cap_factor,
                                              self.router.config.min_throughput)
            self.router.update(stage, records)
            # a record of a peer on no stage's roster: a peer that just switched, joined or died leaves one
            # for up to the record TTL; only one that outlives FOREIGN_GRACE_S counts as foreign
            now, members = time.monotonic(), set().union(*(self.roster.stage_peers(s) for s in range(self.num_stages)))
            with self._lock:
                for peer in ignored[Reason.RECORD_NOT_MEMBER]:
                    self._foreign_since.setdefault(peer, now)
                ignored[Reason.RECORD_NOT_MEMBER] = {p for p in ignored[Reason.RECORD_NOT_MEMBER]
                                                if p not in members and now - self._foreign_since[p] >= FOREIGN_GRACE_S}
                for reason, items in ignored.items():
                    fresh = items - self._ignored[reason]
                    if fresh:
                        self._ignored[reason] |= fresh
                        self.refusals.add(reason, len(fresh))
                        log.warning("ignored %d DHT record(s) of stage %d (%s)", len(fresh), stage, reason)

    def _refresh_loop(self) -> None:
        """Micro-batches never wait on the DHT: records are read here, in the background."""
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - keep the last known records
                log.warning("DHT refresh failed: %s", err)
            self._wake.wait(self.t.refresh_s)
            self._wake.clear()

    def _wait_for_replica(self, started: float, what: str) -> None:
        """No live replica to route to: wait for the next DHT refresh, or count the micro-batch lost (raise
        MicrobatchLost) once the trainer has waited give_up_s for it."""
        if time.monotonic() - started > self.t.give_up_s:
            with self.stats.lock:
                self.stats.lost += 1
            raise MicrobatchLost(f"{what} had no live replica for {self.t.give_up_s:.0f} s")
        self._await_refresh(self.t.no_replica_wait_s)

    def _await_refresh(self, timeout: float) -> None:
        """Wake the refresher and wait (bounded) for its next read."""
        with self._refreshed:
            seen = self._generation
            self._wake.set()
            self._refreshed.wait_for(lambda: self._generation > seen, timeout)

    def step(self, x, y) -> float:
        """One micro-batch forward through every stage, then backward; returns its loss."""
        if self.chained:
            return self._step_chained(x, y)
        mb = uuid.uuid4().hex
        ids, labels = ids_to_bytes(x), ids_to_bytes(y)
        hidden_shape = (int(x.shape[0]), int(x.shape[1]), self.hidden_size)
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
            reply, peer, retried = self._call(stage, req, hidden_shape)
            inputs.append(req)
            used.append(peer)
            replayed |= retried
            if stage < self.num_stages - 1:
                hidden = reply.hidden      # checked, then relayed as-is
        loss = reply.loss
        grad = reply.grad_input
        for stage in range(self.num_stages - 2, -1, -1):
            req = pb.StageRequest()
            req.CopyFrom(inputs[stage])
            req.backward = True
            req.grad_output.CopyFrom(grad)
            reply, _, retried = self._call(stage, req, hidden_shape, prefer=used[stage])
            replayed |= retried
            grad = reply.grad_input
        with self.stats.lock:
            self.stats.completed += 1
            self.stats.retried += int(replayed)
            self.stats.tokens += x.numel()
            self.stats.losses.append(loss)
        return loss

    def _step_chained(self, x, y) -> float:
        """One micro-batch as one chain: the trainer picks a replica per stage, sends the tokens to stage 0's,
        and each stage forwards to the next; the loss comes back once the chain's backward reached stage 0,
        with every stage's signed receipt. A micro-batch counts only with those receipts; a failure is blamed
        where the evidence points (evidence.py), that peer banned and the micro-batch replayed from its tokens
        on a new route. A --verify-fraction of micro-batches is audited: each stage re-run on another replica."""
        mb, started, replayed = uuid.uuid4().hex, time.monotonic(), False
        while True:
            route = [self.router.choose(stage) for stage in range(self.num_stages)]
            if any(record is None for record in route):
                self._wait_for_replica(started, "a stage")
                continue
            peers = [record.peer_id for record in route]
            req = pb.StageRequest(run_id=self.run_id, stage=0, microbatch_id=mb, ids=ids_to_bytes(x),
                                  labels=ids_to_bytes(y), next_hops=peers[1:],
                                  audit=self.rng.random() < self.checks.verify_fraction)
            req.ids_shape[:] = list(x.shape)
            for peer in peers:
                self.router.begin(peer)
            t0 = time.monotonic()
            try:
                reply = self._call_member(peers[0], 0, req, route=peers)
                blame = self.evidence.chain(mb, peers, req, reply)
            except PeerCallError as err:   # the trainer's own call failed: its own evidence
                reply, blame = None, Blame(err.peer_id, f"{err.kind}: {err.reason}")
            for peer in peers:
                self.router.end(peer, ok=blame is None or peer != blame.peer, seconds=time.monotonic() - t0)
            if blame is None and req.audit:
                blame = self.evidence.spot_check(mb, peers, req, reply.receipts)
            if blame is None:
                break
            if blame.reason is not None:
                self.refusals.add(blame.reason)
            if blame.reason != Reason.LYING_PEER:   # a liar is banned for good where it was caught
                stage = peers.index(blame.peer) if blame.peer in peers else -1
                self.router.ban(blame.peer, f"chained micro-batch, stage {stage}: {blame.why}")
            replayed = True
        with self.stats.lock:
            self.stats.completed += 1
            self.stats.retried += int(replayed)
            self.stats.tokens += x.numel()
            self.stats.losses.append(reply.loss)
            self.stats.routed.update(dict.fromkeys(peers, x.numel()))   # each hop's signed receipt is in reply
        return reply.loss

    def _hidden_shape(self, req: pb.StageRequest) -> tuple[int, int, int]:
        return int(req.ids_shape[0]), int(req.ids_shape[1]), self.hidden_size

    def take_lying_reports(self) -> list[pb.LyingReport]:
        """The liars spot checks caught since the last call (the next heartbeat carries them)."""
        return self.evidence.take_reports()

    def _call(self, stage: int, req: pb.StageRequest, hidden_shape, prefer: str | None = None
              ) -> tuple[pb.StageReply, str, bool]:
        """Send to a live roster replica; on failure ban it and replay on another. Never drops the request."""
        started, retried = time.monotonic(), False
        what = f"{'backward' if req.backward else 'forward'} of stage {stage}"
        while True:
            peer = prefer if prefer and not self.router.is_banned(prefer) and prefer in self.router.peers(stage) else None
            prefer = None
            if peer is None:
                record = self.router.choose(stage)
                peer = record.peer_id if record else None
            if peer is None:
                self._wait_for_replica(started, f"stage {stage}")
                continue
            self.router.begin(peer)
            t0 = time.monotonic()
            try:
                reply = self._call_member(peer, stage, req)
                check_reply(stage, self.num_stages, req, reply, hidden_shape)
            except PeerCallError as err:
                self.router.end(peer, ok=False, seconds=time.monotonic() - t0)
                self.router.ban(peer, f"{what}: {err.kind}: {err}")
                retried = True
                continue
            except BadReply as err:
                self.router.end(peer, ok=False, seconds=time.monotonic() - t0)
                self.refusals.add(Reason.BAD_REPLY)
                self.router.ban(peer, f"{what}: malformed reply: {err}")
                retried = True
                continue
            self.router.end(peer, ok=True, seconds=time.monotonic() - t0)
            return reply, peer, retried

    def _call_member(self, peer: str, stage: int, req: pb.StageRequest, route: list[str] | None = None
                     ) -> pb.StageReply:
        """One call, abandoned early if the coordinator takes ``peer`` (or, for a chain, any peer of its
        ``route``, one per stage from ``stage`` on) off its stage's roster meanwhile (its lease ran out: a dead
        host or a cut link answers nothing until our deadline otherwise)."""
        route = route or [peer]
        call_s = self.t.call_s * len(route)   # a chain allows each stage ahead one call's deadline
        fut = self.node.submit(self.node.acall(peer, HANDLER, req, pb.StageReply, call_s))
        deadline = time.monotonic() + call_s + 1.0
        try:
            while True:
                try:
                    return fut.result(self.t.roster_check_s)
                except concurrent.futures.TimeoutError:
                    gone = next((p for i, p in enumerate(route) if p not in self.roster.stage_peers(stage + i)), None)
                    if gone is not None:
                        raise PeerCallError(gone, "unreachable", "dropped from the roster by the coordinator") from None
                    if time.monotonic() > deadline:
                        raise PeerCallError(peer, "timeout", f"no reply within {call_s:.1f}s") from None
        finally:
            fut.cancel()
