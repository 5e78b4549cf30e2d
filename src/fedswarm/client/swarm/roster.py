"""Who may be on the swarm's data plane: the coordinator's roster as a client holds it, and refusal counts.

The roster (stage -> peer ids of the peers serving it, and the trainers' peer ids) arrives over the
authenticated gRPC channel in join and heartbeat replies; the DHT only adds load hints. A stage server
serves only roster trainers; a trainer routes only to roster peers.
"""
from __future__ import annotations

import statistics
import threading

from fedswarm.client.swarm.routing import StageRecord, parse_records
from fedswarm.p2p import Refusals
from fedswarm.proto.refusals import Reason
from fedswarm.proto import fedswarm_pb2 as pb

__all__ = ["Roster", "Refusals", "roster_records"]


class Roster:
    """Written by the heartbeat thread, read by the data plane's threads; `wait_for` lets a handler wait
    (bounded) for the next roster when a caller it does not know yet may have just joined."""

    def __init__(self):
        self._cv = threading.Condition()
        self.version = -1
        self._stages: list[frozenset[str]] = []
        self._trainers: frozenset[str] = frozenset()

    def update(self, msg: pb.SwarmRoster) -> bool:
        """Adopt the coordinator's roster; True if it changed."""
        stages = [frozenset(s.peer_ids) for s in msg.stages]
        trainers = frozenset(msg.trainer_peer_ids)
        with self._cv:
            if stages == self._stages and trainers == self._trainers:
                return False
            self._stages, self._trainers, self.version = stages, trainers, msg.version
            self._cv.notify_all()
            return True

    def stage_peers(self, stage: int) -> frozenset[str]:
        with self._cv:
            return self._stages[stage] if 0 <= stage < len(self._stages) else frozenset()

    def is_member(self, peer_id: str) -> bool:
        """A trainer of the run or a peer serving any stage: who may call a stage at all."""
        with self._cv:
            return peer_id in self._trainers or any(peer_id in s for s in self._stages)

    def is_trainer(self, peer_id: str) -> bool:
        with self._cv:
            return peer_id in self._trainers

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until predicate() holds after a roster update, or timeout; returns predicate()."""
        with self._cv:
            return self._cv.wait_for(predicate, timeout)


def roster_records(stage: int, members: frozenset[str], raw: dict[str, dict],
                   cap_factor: float, default_throughput: float) -> tuple[list[StageRecord], dict[str, set]]:
    """Routing records for ``stage``: exactly the roster's peers. DHT values give their throughput and load
    (throughput capped at cap_factor x the stage's median); a roster peer without a usable record still
    gets a default one, so overwriting or deleting records cannot hide a stage. Returns the records and
    what was ignored: {"record_not_member": peer ids, "record_malformed": (peer id, value) pairs}."""
    parsed = {r.peer_id: r for r in parse_records(stage, {p: v for p, v in raw.items() if p in members})}
    ignored = {Reason.RECORD_NOT_MEMBER: {p for p in raw if p not in members},
               Reason.RECORD_MALFORMED: {(p, repr(raw[p])[:200]) for p in raw if p in members and p not in parsed}}
    # a replica that has served nothing yet announces the floor: it is routed as the stage's median replica, or
    # the measured ones (whose served rate its share would never let it reach) would starve it of traffic
    measured = [r.throughput for r in parsed.values() if r.throughput > default_throughput]
    if measured:
        median = statistics.median(measured)
        cap = max(median, default_throughput) * cap_factor
    else:
        median, cap = default_throughput, float("inf")
    records = []
    for peer in sorted(members):
        r = parsed.get(peer)
        if r is None:
            records.append(StageRecord(peer, "", stage, median, 0.0))
        else:
            throughput = r.throughput if r.throughput > default_throughput else median
            records.append(StageRecord(peer, r.name, stage, min(throughput, cap), r.load))
    return records, ignored
