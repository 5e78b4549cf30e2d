"""Which peer serves which pipeline stage; re-assignment when a stage empties (at once) or when moving a peer
pays for its switch (coordinator/rebalance.py)."""
from __future__ import annotations

import collections
import enum
import logging
import re
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from fedswarm import receipts as R
from fedswarm.coordinator.rebalance import Move, Rebalancer, SwarmRegistryConfig
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto.refusals import Reason

log = logging.getLogger(__name__)
MAX_EVENTS = 1000      # stage events kept (oldest forgotten first)


class EventKind(enum.StrEnum):
    """What a stage event records (its "kind" in status); "reason" says why in words."""

    JOINED = "joined"        # a new peer took a stage
    LEFT = "left"            # a peer left (lease lost, replaced, exited)
    FILLED = "filled"        # re-assignment: a stage with no peer took one at once
    REBALANCED = "rebalanced"   # re-assignment: a move to the bottleneck stage that pays for its switch
    LYING_PEER = Reason.LYING_PEER.value   # a trainer's spot check convicted it: off the roster for good


REASSIGNMENTS = frozenset({EventKind.FILLED, EventKind.REBALANCED})
MAX_LOSSES = 10_000    # trainers' losses kept between two rounds
PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,128}")   # a base58 libp2p peer id
MAX_REFUSAL_REASONS = 32                                  # distinct reasons kept per reporter
MAX_LYING_REPORTS = 8                                     # lying reports judged per heartbeat
MAX_DISPUTES = 4     # two-replica disputes waiting for the coordinator's re-run (more are refused and counted)
MAX_CONFIRMATIONS = 256                                   # neighbours a peer's heartbeat may confirm
__all__ = ["SwarmRegistry", "SwarmRegistryConfig", "PEER_ID"]


class SwarmRegistry:
    """Thread-safe: the service reports peers and trainers; the membership reaper reports losses."""

    def __init__(self, num_stages: int, config: SwarmRegistryConfig | None = None, clock=time.time):
        self.num_stages = num_stages
        self.t = config or SwarmRegistryConfig()
        self.clock = clock
        self.policy = Rebalancer(self.t, clock)
        self._lock = threading.Lock()
        self.stage_of: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.throughput: dict[int, float] = {}
        self.steps: dict[int, int] = {}
        self.util: dict[int, float] = {}
        self.reports: dict[int, int] = {}            # heartbeats since the peer began serving its assigned stage
        self.switch_s: dict[int, float] = {}         # each peer's last measured stage switch (fetch + build)
        self._warned_empty: set[int] = set()
        self.trainers: dict[int, dict] = {}           # live trainers' latest totals
        self.retired = {"completed": 0, "retried": 0, "lost": 0, "tokens": 0}   # totals of trainers that left
        self.events: deque[dict] = deque(maxlen=MAX_EVENTS)
        self._samples: list[tuple[float, int]] = []
        self._losses: deque[float] = deque(maxlen=MAX_LOSSES)   # trainers' reported losses since the last round
        self.peer_ids: dict[int, str] = {}       # peers' and trainers' libp2p ids, from their signed joins
        self.serving: dict[int, int] = {}         # the stage each peer reports it serves now
        self.refused: dict[int, collections.Counter] = {}        # live reporters' refusal totals
        self.refused_retired: collections.Counter = collections.Counter()
        self._roster_key: tuple = ()
        self._roster_version = 0
        self._tokens_at_sync: dict[int, int] = {}   # stage -> trainers' token total at its last average
        self.run_id = ""                         # what receipts are signed for (set by start_swarm)
        self.liars: set[str] = set()             # peer ids convicted of lying: never on the roster again
        self.liar_cids: set[int] = set()         # ... and their sessions (their pending stage syncs are refused)
        self.lying_refused = 0                   # lying reports whose evidence did not hold
        self.arbiter = None                      # settles two replicas' disputes (coordinator/arbiter.py)
        self._arbitrations: ThreadPoolExecutor | None = None   # ... on a thread of its own, one at a time
        self._disputes: list[Future] = []                       # ... those not settled yet
        self.chained = False                     # chained traffic: neighbours confirm a replica's work
        self.confirmations: dict[int, dict[str, int]] = {}   # reporter -> neighbour peer id -> chained tokens
        self.routed: dict[int, dict[str, int]] = {}          # trainer -> peer id -> tokens of its chains through it
        self.routed_retired: collections.Counter = collections.Counter()   # ... of trainers that left
        self._confirmed_at_sync: dict[int, tuple[int, int]] = {}   # replica -> _confirmed() at its last sync

    # -- peers -----------------------------------------------------------------------
    def assign(self, cid: int, name: str, peer_id: str = "") -> int:
        """A new peer takes the stage with the fewest peers; it is on the roster once it reports serving it."""
        with self._lock:
            counts = self._counts()
            stage = min(range(self.num_stages), key=lambda s: (counts[s], s))
            self.stage_of[cid], self.names[cid] = stage, name
            if peer_id:
                self.peer_ids[cid] = peer_id
            self.throughput[cid], self.steps[cid] = 0.0, 0
            self.policy.reset()
            self._event(stage, cid, EventKind.JOINED, "joined")
            return stage

    def stage(self, cid: int) -> int:
        with self._lock:
            return self.stage_of.get(cid, -1)

    def report_peer(self, cid: int, throughput: float, steps: int, utilization: float = 0.0,
                    serving: int = -1, refused: dict[str, int] | None = None, switch_s: float = 0.0,
                    confirmed: dict[str, int] | None = None) -> None:
        """A peer's heartbeat; its readings feed the rebalancer once it served its assigned stage a while;
        `confirmed`: the chained tokens it exchanged with each neighbour (evidence of their work)."""
        with self._lock:
            if confirmed:
                self.confirmations[cid] = {str(k)[:128]: int(v) for k, v in
                                           list(confirmed.items())[:MAX_CONFIRMATIONS]}
            if cid in self.stage_of:
                self.throughput[cid], self.steps[cid] = throughput, steps
                self.util[cid] = min(max(utilization, 0.0), 1.0)
                self.serving[cid] = serving
                if switch_s > 0:
                    self.switch_s[cid] = min(switch_s, self.t.max_switch_s)
                if serving == self.stage_of[cid]:
                    self.reports[cid] = self.reports.get(cid, 0) + 1
                    if self.reports[cid] > self.t.warm_reports:
                        self.policy.observe(cid, throughput, self.util[cid])
                self._take_refused(cid, refused)
        self.rebalance()

    def add_trainer(self, cid: int, name: str, peer_id: str) -> None:
        """A trainer joined: its peer id goes on the roster the stage servers admit."""
        with self._lock:
            self.names[cid] = name
            if peer_id:
                self.peer_ids[cid] = peer_id
            self.trainers.setdefault(cid, {"completed": 0, "retried": 0, "lost": 0, "tokens": 0})

    def roster(self) -> pb.SwarmRoster:
        """Who is on the data plane now: per stage the peers assigned to it that report serving it (a peer
        that is still loading a new stage is not routed to), and the live trainers."""
        with self._lock:
            stages = [sorted(self.peer_ids[c] for c, s in self.stage_of.items()
                             if s == st and self.serving.get(c) == st and c in self.peer_ids
                             and self.peer_ids[c] not in self.liars)
                      for st in range(self.num_stages)]
            trainers = sorted(self.peer_ids[c] for c in self.trainers if c in self.peer_ids)
            key = (tuple(map(tuple, stages)), tuple(trainers))
            if key != self._roster_key:
                self._roster_key, self._roster_version = key, self._roster_version + 1
            return pb.SwarmRoster(stages=[pb.StageRoster(peer_ids=ids) for ids in stages],
                                  trainer_peer_ids=trainers, version=self._roster_version)

    def synced(self, cids: list[int]) -> None:
        """These replicas just synced: their steps restart at 0 (not at their last, pre-sync heartbeat's count),
        and their confirmed work is counted from here."""
        with self._lock:
            for cid in cids:
                if cid in self.steps:
                    self.steps[cid] = 0
                self._confirmed_at_sync[cid] = self._confirmed(cid)

    def sync_weight(self, stage: int, claimed: int, cid: int | None = None) -> int:
        """A stage replica's averaging weight: the tokens it says it trained on, at most the tokens the trainers
        reported since this stage's last average (no replica can have done more), so a peer cannot claim the
        average for itself. With chained traffic, also at most the tokens its neighbouring replicas (on other
        stages: the trainers' word is not enough) confirm they exchanged with it since its last sync, so a
        trainer and a peer colluding cannot raise its weight above the traffic that really passed through it; and
        at most the tokens the trainers' completed chains (each hop's signed receipt checked) routed through it,
        so two peers on different stages confirming each other cannot either."""
        with self._lock:
            done = self._total("tokens") - self._tokens_at_sync.get(stage, 0)
            if self.chained and cid is not None:
                now, then = self._confirmed(cid), self._confirmed_at_sync.get(cid, (0, 0))
                done = min(done, now[0] - then[0], now[1] - then[1])
        return max(1, min(int(claimed), done))

    def stage_synced(self, stage: int) -> None:
        """Stage `stage` was just averaged: its replicas' work is counted from here."""
        with self._lock:
            self._tokens_at_sync[stage] = self._total("tokens")

    def report_lying(self, reports) -> None:
        """A trainer's spot-check reports: each convicts its accused only if the signed evidence holds
        (receipts.judge; a two-replica dispute: this coordinator's own re-run, arbiter.py, on a thread of its own,
        since the heartbeat that brings it runs on the service's event loop) and the accused and witnesses are
        replicas of that stage. The liar leaves the roster for good (a `lying_peer` event and count); its
        pending stage sync is refused."""
        for report in list(reports)[:MAX_LYING_REPORTS]:
            if len(report.receipts) == 2 and self.arbiter is not None:
                self._arbitrate(report)
            else:
                self._judge(report, R.judge, "two other replicas of its stage agree against its output")

    def settle_disputes(self, timeout_s: float | None = None) -> None:
        """Wait until the two-replica disputes reported so far are settled (tests; shutdown)."""
        with self._lock:
            pending = list(self._disputes)
        for fut in pending:
            fut.exception(timeout=timeout_s)

    def _arbitrate(self, report) -> None:
        """Queue a two-replica dispute for the arbiter's re-run; refused (counted) while MAX_DISPUTES wait."""
        with self._lock:
            self._disputes = [f for f in self._disputes if not f.done()]
            if len(self._disputes) >= MAX_DISPUTES:
                log.warning("refused a lying report: %d disputes already wait for the coordinator's re-run",
                            len(self._disputes))
                self.lying_refused += 1
                return
            if self._arbitrations is None:
                self._arbitrations = ThreadPoolExecutor(1, thread_name_prefix="arbiter")
            fut = self._arbitrations.submit(self._judge, report, self.arbiter.judge,
                                            "the coordinator's own re-run of its stage contradicts its output")
            self._disputes.append(fut)
        fut.add_done_callback(_log_failure)

    def _judge(self, report, judge, evidence: str) -> None:
        """Convict the peer `judge` names from the report, if its signers are replicas of that stage."""
        try:
            liar = judge(self.run_id, report)
            signers = [R.signer(self.run_id, r) for r in report.receipts[:3]]
        except R.BadReceipt as err:
            log.warning("refused a lying report: %s", err)
            with self._lock:
                self.lying_refused += 1
            return
        with self._lock:
            stage_ids = {self.peer_ids.get(c) for c, s in self.stage_of.items() if s == report.stage}
            if not set(signers) <= stage_ids:
                self.lying_refused += 1
                return
            cid = next(c for c, p in self.peer_ids.items() if p == liar)
        self.convict(cid, report.stage, evidence)

    def convict(self, cid: int, stage: int, evidence: str = "two other replicas of its stage agree against "
                "its output") -> None:
        """Take a lying peer off the roster for good and out of its stage."""
        with self._lock:
            peer = self.peer_ids.get(cid)
            if peer is None or peer in self.liars:
                return
            self.liars.add(peer)
            self.liar_cids.add(cid)
            self._event(stage, cid, EventKind.LYING_PEER, f"caught lying by a spot check: {evidence}")
        log.error("peer %s (stage %d) caught lying: removed from the roster", self.names.get(cid), stage)
        self.remove(cid, Reason.LYING_PEER.value, event=False)

    def is_liar(self, cid: int) -> bool:
        with self._lock:
            return cid in self.liar_cids

    def remove(self, cid: int, reason: str, event: bool = True) -> None:
        with self._lock:
            self.peer_ids.pop(cid, None)
            self.serving.pop(cid, None)
            self.refused_retired.update(self.refused.pop(cid, {}))
            if cid in self.trainers:
                last = self.trainers.pop(cid)
                for k in self.retired:
                    self.retired[k] += last.get(k, 0)
                self.routed_retired.update(self.routed.pop(cid, {}))
            stage = self.stage_of.pop(cid, None)
            if stage is None:
                return
            if event:
                self._event(stage, cid, EventKind.LEFT, f"left: {reason}")
            for d in (self.throughput, self.steps, self.util, self.reports, self.switch_s):
                d.pop(cid, None)
            self.policy.forget(cid)
            self.policy.reset()
            if self._counts()[stage] == 0:
                self._move_to(stage, f"stage {stage} lost its last peer")

    def rebalance(self) -> None:
        """Fill empty stages at once; move a peer to the bottleneck stage only when the move pays for its
        switch (coordinator/rebalance.py: a pipeline model judged over several windows, with cool-downs)."""
        with self._lock:
            counts = self._counts()
            for stage in range(self.num_stages):
                if counts[stage] == 0:
                    self._move_to(stage, f"stage {stage} has no peer")
                    counts = self._counts()
            stages = [[c for c, s in self.stage_of.items() if s == st] for st in range(self.num_stages)]
            switch = {c: self.switch_s.get(c, self.t.default_switch_s) for c in self.stage_of}
            move = self.policy.tick(stages, switch)
            if move is not None:
                self._apply(move)

    def stage_peers(self, stage: int) -> list[int]:
        with self._lock:
            return [c for c, s in self.stage_of.items() if s == stage]

    def steps_since_sync(self, stage: int) -> list[int]:
        with self._lock:
            return [self.steps.get(c, 0) for c, s in self.stage_of.items() if s == stage]

    # -- trainers --------------------------------------------------------------------
    def report_trainer(self, cid: int, name: str, completed: int, retried: int, lost: int, tokens: int,
                       train_loss: float | None = None, refused: dict[str, int] | None = None,
                       routed: dict[str, int] | None = None) -> None:
        """A trainer's totals; `routed`: the tokens of its completed chains through each peer (stage weights)."""
        with self._lock:
            self._take_refused(cid, refused)
            if routed:
                self.routed[cid] = {str(k)[:128]: int(v) for k, v in list(routed.items())[:MAX_CONFIRMATIONS]}
            if train_loss is not None:
                self._losses.append(train_loss)
            self.names[cid] = name
            self.trainers[cid] = {"completed": completed, "retried": retried, "lost": lost, "tokens": tokens}
            now = self.clock()
            self._samples.append((now, self._total("tokens")))
            self._samples = [(t, v) for t, v in self._samples if now - t <= self.t.rate_window_s]

    def take_train_loss(self) -> float | None:
        """Mean of the trainers' reported losses since the last call (one round's train loss)."""
        with self._lock:
            losses, self._losses = self._losses, deque(maxlen=MAX_LOSSES)
        return sum(losses) / len(losses) if losses else None

    def snapshot(self) -> dict:
        with self._lock:
            rate = 0.0
            if len(self._samples) >= 2 and self._samples[-1][0] > self._samples[0][0]:
                (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
                rate = (v1 - v0) / (t1 - t0)
            return {
                "stages": [{"stage": s, "peers": sorted(self.names[c] for c, st in self.stage_of.items() if st == s),
                            "throughput": round(self._totals()[s], 1),
                            "optimizer_steps": sum(self.steps.get(c, 0) for c, st in self.stage_of.items() if st == s),
                            "switch_s": {self.names[c]: round(self.switch_s[c], 2) for c, st in self.stage_of.items()
                                         if st == s and c in self.switch_s}}
                           for s in range(self.num_stages)],
                "microbatches_completed": self._total("completed"),
                "microbatches_retried": self._total("retried"),
                "microbatches_lost": self._total("lost"),
                "tokens": self._total("tokens"),
                "tokens_per_s": round(rate, 1),
                "refused": dict(sorted(self._refused_totals().items())),
                "lying_peers": len(self.liars), "lying_reports_refused": self.lying_refused,
                "rebalance": {**{f"windows_{k}": v for k, v in self.policy.windows.items()},
                              "streak": self.policy.streak},
                "reassignments": [e for e in self.events if e["kind"] in REASSIGNMENTS],
                "events": list(self.events)[-200:],
            }

    # -- internals (lock held) ---------------------------------------------------------
    def _confirmed(self, cid: int) -> tuple[int, int]:
        """The chained tokens other stages' replicas report exchanging with `cid`'s peer id, and those the
        trainers' completed chains routed through it."""
        peer, stage = self.peer_ids.get(cid), self.stage_of.get(cid)
        if peer is None:
            return 0, 0
        return (sum(counts.get(peer, 0) for reporter, counts in self.confirmations.items()
                    if reporter != cid and self.stage_of.get(reporter, -1) != stage),
                self.routed_retired[peer] + sum(counts.get(peer, 0) for counts in self.routed.values()))

    def _take_refused(self, cid: int, refused: dict[str, int] | None) -> None:
        """A reporter's refusal totals (since it started): kept per reporter, bounded in reasons and length."""
        if not refused:
            return
        clean = {str(k)[:40]: int(v) for k, v in list(refused.items())[:MAX_REFUSAL_REASONS]}
        self.refused[cid] = collections.Counter(clean)

    def _refused_totals(self) -> collections.Counter:
        total = collections.Counter(self.refused_retired)
        for counts in self.refused.values():
            total.update(counts)
        return total

    def _counts(self) -> list[int]:
        counts = [0] * self.num_stages
        for s in self.stage_of.values():
            counts[s] += 1
        return counts

    def _totals(self) -> list[float]:
        totals = [0.0] * self.num_stages
        for c, s in self.stage_of.items():
            totals[s] += self.throughput.get(c, 0.0)
        return totals

    def _total(self, key: str) -> int:
        return self.retired[key] + sum(t.get(key, 0) for t in self.trainers.values())

    def _move_to(self, stage: int, reason: str) -> bool:
        """An emptied stage takes a peer at once from the most provisioned stage that can spare one: its slowest
        replica, one not cooling down after a move if there is one."""
        counts = self._counts()
        candidates = [s for s in range(self.num_stages) if counts[s] >= 2]
        if not candidates:
            if stage not in self._warned_empty:
                self._warned_empty.add(stage)
                log.warning("%s and no stage has a peer to spare: waiting for a new peer", reason)
            return False
        donor_stage = max(candidates, key=lambda s: (counts[s], -self._totals()[s]))
        cooling = self.policy.cooling()
        donors = [c for c, s in self.stage_of.items() if s == donor_stage]
        donor = min(donors, key=lambda c: (c in cooling, self.throughput.get(c, 0.0)))
        self._reassign(donor, stage, EventKind.FILLED, reason)
        return True

    def _apply(self, move: Move) -> None:
        """A move that pays: the planned peer goes, its event carrying the predicted gain and switch cost."""
        reason = (f"stage {move.dst} is the bottleneck: predicted {move.rate_now:.0f} -> {move.rate_after:.0f} "
                  f"tokens/s, +{move.gain:.0%} over {self.t.horizon_s:.0f} s net of a {move.switch_s:.1f} s switch, "
                  f"held {self.policy.streak} windows")
        self._reassign(move.peer, move.dst, EventKind.REBALANCED, reason, gain=round(move.gain, 3), switch_s=round(move.switch_s, 2))

    def _reassign(self, cid: int, stage: int, kind: EventKind, reason: str, **extra) -> None:
        src = self.stage_of[cid]
        self.stage_of[cid] = stage
        self.steps[cid], self.reports[cid] = 0, 0
        self._warned_empty.discard(stage)
        self.policy.moved(cid)
        self._event(stage, cid, kind, reason, source=src, **extra)
        log.warning("re-assigned %s from stage %d to stage %d: %s", self.names.get(cid), src, stage, reason)

    def _event(self, stage: int, cid: int, kind: EventKind, reason: str, **extra) -> None:
        self.events.append({"stage": stage, "peer": self.names.get(cid, str(cid)), "kind": kind.value, "reason": reason,
                            "at": round(self.clock(), 3), **extra})


def _log_failure(fut: Future) -> None:
    """A dispute's re-run that raised (not a refusal: a bug) is logged, not lost with its thread."""
    err = fut.exception()
    if err is not None:
        log.error("settling a two-replica dispute failed: %s: %s", type(err).__name__, err, exc_info=err)
