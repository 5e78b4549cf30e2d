"""Which peer serves which pipeline stage; re-assignment when a stage empties or is the clear bottleneck."""
from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

from fedswarm.proto import fedswarm_pb2 as pb

log = logging.getLogger(__name__)
MAX_EVENTS = 1000      # stage events kept (oldest forgotten first)
MAX_LOSSES = 10_000    # trainers' losses kept between two rounds
PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,128}")   # a base58 libp2p peer id
MAX_REFUSAL_REASONS = 32                                  # distinct reasons kept per reporter


@dataclass
class SwarmTimeouts:
    rebalance_cooldown_s: float = 15.0   # at most one bottleneck move this often (an emptied stage moves at once)
    busy: float = 0.85                   # a stage whose peers compute this fraction of the time is saturated ...
    idle: float = 0.45                   # ... and takes a peer from a stage (of >= 2 peers) busy at most this much
    warm_reports: int = 4                # utilization counts only after this many heartbeats of a peer
    rate_window_s: float = 10.0          # tokens/s is measured over this window


class SwarmRegistry:
    """Thread-safe: the service reports peers and trainers; the membership reaper reports losses."""

    def __init__(self, num_stages: int, timeouts: SwarmTimeouts | None = None, clock=time.time):
        self.num_stages = num_stages
        self.t = timeouts or SwarmTimeouts()
        self.clock = clock
        self._lock = threading.Lock()
        self.stage_of: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.throughput: dict[int, float] = {}
        self.steps: dict[int, int] = {}
        self.util: dict[int, float] = {}
        self.reports: dict[int, int] = {}
        self._warned_empty: set[int] = set()
        self.trainers: dict[int, dict] = {}           # live trainers' latest totals
        self.retired = {"completed": 0, "retried": 0, "lost": 0, "tokens": 0}   # totals of trainers that left
        self.events: deque[dict] = deque(maxlen=MAX_EVENTS)
        self._last_move = 0.0
        self._samples: list[tuple[float, int]] = []
        self._losses: deque[float] = deque(maxlen=MAX_LOSSES)   # trainers' reported losses since the last round
        self.peer_ids: dict[int, str] = {}       # peers' and trainers' libp2p ids, from their signed joins
        self.serving: dict[int, int] = {}         # the stage each peer reports it serves now
        self.refused: dict[int, collections.Counter] = {}        # live reporters' refusal totals
        self.refused_retired: collections.Counter = collections.Counter()
        self._roster_key: tuple = ()
        self._roster_version = 0
        self._tokens_at_sync: dict[int, int] = {}   # stage -> trainers' token total at its last average

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
            self._event(stage, cid, "joined")
            return stage

    def stage(self, cid: int) -> int:
        with self._lock:
            return self.stage_of.get(cid, -1)

    def report_peer(self, cid: int, throughput: float, steps: int, utilization: float = 0.0,
                    serving: int = -1, refused: dict[str, int] | None = None) -> None:
        with self._lock:
            if cid in self.stage_of:
                self.throughput[cid], self.steps[cid] = throughput, steps
                self.util[cid] = min(max(utilization, 0.0), 1.0)
                self.reports[cid] = self.reports.get(cid, 0) + 1
                self.serving[cid] = serving
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
                             if s == st and self.serving.get(c) == st and c in self.peer_ids)
                      for st in range(self.num_stages)]
            trainers = sorted(self.peer_ids[c] for c in self.trainers if c in self.peer_ids)
            key = (tuple(map(tuple, stages)), tuple(trainers))
            if key != self._roster_key:
                self._roster_key, self._roster_version = key, self._roster_version + 1
            return pb.SwarmRoster(stages=[pb.StageRoster(peer_ids=ids) for ids in stages],
                                  trainer_peer_ids=trainers, version=self._roster_version)

    def synced(self, cids: list[int]) -> None:
        """These replicas just synced: their steps restart at 0 (not at their last, pre-sync heartbeat's count)."""
        with self._lock:
            for cid in cids:
                if cid in self.steps:
                    self.steps[cid] = 0

    def sync_weight(self, stage: int, claimed: int) -> int:
        """A stage replica's averaging weight: the tokens it says it trained on, at most the tokens the trainers
        reported since this stage's last average (no replica can have done more), so a peer cannot claim the
        average for itself."""
        with self._lock:
            done = self._total("tokens") - self._tokens_at_sync.get(stage, 0)
        return max(1, min(int(claimed), done))

    def stage_synced(self, stage: int) -> None:
        """Stage `stage` was just averaged: its replicas' work is counted from here."""
        with self._lock:
            self._tokens_at_sync[stage] = self._total("tokens")

    def remove(self, cid: int, reason: str) -> None:
        with self._lock:
            self.peer_ids.pop(cid, None)
            self.serving.pop(cid, None)
            self.refused_retired.update(self.refused.pop(cid, {}))
            if cid in self.trainers:
                last = self.trainers.pop(cid)
                for k in self.retired:
                    self.retired[k] += last.get(k, 0)
            stage = self.stage_of.pop(cid, None)
            if stage is None:
                return
            self._event(stage, cid, f"left: {reason}")
            for d in (self.throughput, self.steps, self.util, self.reports):
                d.pop(cid, None)
            if self._counts()[stage] == 0:
                self._move_to(stage, f"stage {stage} lost its last peer")

    def rebalance(self) -> None:
        """Fill empty stages; move one peer to a saturated stage from an idle one (with a cooldown).

        In a pipeline every stage serves the same tokens/s, so throughput cannot show a
        bottleneck; utilization (the fraction of time a peer spends computing) can."""
        with self._lock:
            counts = self._counts()
            for stage in range(self.num_stages):
                if counts[stage] == 0:
                    self._move_to(stage, f"stage {stage} has no peer")
                    counts = self._counts()
            if self.clock() - self._last_move < self.t.rebalance_cooldown_s:
                return
            if not self.stage_of or any(self.reports.get(c, 0) < self.t.warm_reports for c in self.stage_of):
                return  # utilization not yet measured everywhere
            util = [self._mean_util(s) for s in range(self.num_stages)]
            hot = max(range(self.num_stages), key=lambda s: util[s])
            donors = [s for s in range(self.num_stages) if counts[s] >= 2 and util[s] <= self.t.idle and s != hot]
            if util[hot] >= self.t.busy and donors:
                cold = min(donors, key=lambda s: util[s])
                self._move_to(hot, f"stage {hot} is the bottleneck (peers {util[hot]:.0%} busy, "
                                   f"stage {cold}'s {util[cold]:.0%})", donor_stage=cold)

    def stage_peers(self, stage: int) -> list[int]:
        with self._lock:
            return [c for c, s in self.stage_of.items() if s == stage]

    def steps_since_sync(self, stage: int) -> list[int]:
        with self._lock:
            return [self.steps.get(c, 0) for c, s in self.stage_of.items() if s == stage]

    # -- trainers --------------------------------------------------------------------
    def report_trainer(self, cid: int, name: str, completed: int, retried: int, lost: int, tokens: int,
                       train_loss: float | None = None, refused: dict[str, int] | None = None) -> None:
        with self._lock:
            self._take_refused(cid, refused)
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
                            "optimizer_steps": sum(self.steps.get(c, 0) for c, st in self.stage_of.items() if st == s)}
                           for s in range(self.num_stages)],
                "microbatches_completed": self._total("completed"),
                "microbatches_retried": self._total("retried"),
                "microbatches_lost": self._total("lost"),
                "tokens": self._total("tokens"),
                "tokens_per_s": round(rate, 1),
                "refused": dict(sorted(self._refused_totals().items())),
                "reassignments": [e for e in self.events if e["reason"] != "joined" and not e["reason"].startswith("left")],
                "events": list(self.events)[-200:],
            }

    # -- internals (lock held) ---------------------------------------------------------
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

    def _mean_util(self, stage: int) -> float:
        vals = [self.util.get(c, 0.0) for c, s in self.stage_of.items() if s == stage]
        return sum(vals) / len(vals) if vals else 0.0

    def _total(self, key: str) -> int:
        return self.retired[key] + sum(t.get(key, 0) for t in self.trainers.values())

    def _move_to(self, stage: int, reason: str, donor_stage: int | None = None) -> bool:
        counts = self._counts()
        if donor_stage is None:  # the most over-provisioned stage that can spare a peer
            candidates = [s for s in range(self.num_stages) if counts[s] >= 2]
            if not candidates:
                if stage not in self._warned_empty:
                    self._warned_empty.add(stage)
                    log.warning("%s and no stage has a peer to spare: waiting for a new peer", reason)
                return False
            donor_stage = max(candidates, key=lambda s: (counts[s], -self._totals()[s]))
        donors = [c for c, s in self.stage_of.items() if s == donor_stage]
        donor = min(donors, key=lambda c: self.throughput.get(c, 0.0))   # the slowest replica moves
        self.stage_of[donor] = stage
        self.steps[donor], self.reports[donor] = 0, 0
        self._warned_empty.discard(stage)
        self._last_move = self.clock()
        self._event(stage, donor, reason)
        log.warning("re-assigned %s from stage %d to stage %d: %s", self.names.get(donor), donor_stage, stage, reason)
        return True

    def _event(self, stage: int, cid: int, reason: str) -> None:
        self.events.append({"stage": stage, "peer": self.names.get(cid, str(cid)), "reason": reason,
                            "at": round(self.clock(), 3)})
