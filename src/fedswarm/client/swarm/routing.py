"""Stage routing for swarm pipelines: DHT records -> replicas -> stochastic choice (no network here).

A stage server announces ``StageRecord.to_value()`` under ``stage_key(run_id, stage)`` with its peer id
as the subkey; clients ``parse_records`` what ``SwarmNode.lookup`` returns and feed a ``Router``.
"""
from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass

__all__ = ["StageRecord", "stage_key", "parse_records", "RoutingConfig", "Router"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRecord:
    """One replica of one stage, as announced: throughput in tokens/s, load = requests in flight at the peer."""
    peer_id: str
    name: str
    stage: int
    throughput: float
    load: float

    def to_value(self) -> dict:
        """The DHT value to announce (subkey = peer_id); inverse of parse_records."""
        return {"name": self.name, "stage": self.stage, "throughput": float(self.throughput), "load": float(self.load)}


def stage_key(run_id: str, stage: int) -> str:
    """The DHT key stage servers of ``run_id`` announce under."""
    return f"fedswarm:{run_id}:stage:{int(stage)}"


def _number(x) -> float | None:
    """A finite, non-negative real (bools excluded), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) and x >= 0 else None


def parse_records(stage: int, raw: dict[str, dict]) -> list[StageRecord]:
    """Records from ``SwarmNode.lookup()`` (subkey = peer id); malformed entries are skipped silently."""
    out = []
    for peer_id, value in raw.items():
        if not isinstance(peer_id, str) or not peer_id or not isinstance(value, dict):
            continue
        throughput, load = _number(value.get("throughput")), _number(value.get("load"))
        name = value.get("name", "")
        announced_stage = value.get("stage", stage)
        if throughput is None or load is None or not isinstance(name, str):
            continue
        if isinstance(announced_stage, bool) or announced_stage != stage:
            continue
        out.append(StageRecord(peer_id, name, int(stage), throughput, load))
    return sorted(out, key=lambda r: r.peer_id)


@dataclass
class RoutingConfig:
    """Routing knobs, in seconds and tokens/s."""
    ban_initial_s: float = 2.0  # first ban of a failing peer
    ban_max_s: float = 30.0  # repeated bans double up to this
    min_throughput: float = 1.0  # announced throughput is floored here, so a fresh replica (0 tok/s) still gets traffic


class Router:
    """Stochastic wiring (SWARM): pick a replica with probability proportional to throughput / (1 + load + our own in-flight to it); banned peers get weight 0.

    Thread-safe: the trainer's micro-batch workers and its DHT refresher share one Router; every method
    takes one re-entrant lock, so a read never sees a half-applied update or ban.
    """

    def __init__(self, config: RoutingConfig | None = None, rng: random.Random | None = None, clock=time.monotonic):
        self.config = config or RoutingConfig()
        self.rng = rng or random.Random()
        self.clock = clock
        self._records: dict[int, dict[str, StageRecord]] = {}
        self._inflight: dict[str, int] = {}
        self._banned_until: dict[str, float] = {}
        self._last_ban_s: dict[str, float] = {}  # failure streak: length of the last ban, cleared by a success
        self.latency_s: dict[str, float] = {}  # EMA of call durations that ended ok, for diagnostics
        self._lock = threading.RLock()

    def update(self, stage: int, records: list[StageRecord]) -> None:
        """Replace the known replicas of ``stage`` (peers missing from ``records`` are forgotten)."""
        with self._lock:
            if any(r.stage != stage for r in records):
                raise ValueError(f"records for another stage passed to update(stage={stage})")
            self._records[stage] = {r.peer_id: r for r in records}

    def peers(self, stage: int) -> list[str]:
        """Known replicas of ``stage``, banned ones included."""
        with self._lock:
            return sorted(self._records.get(stage, {}))

    def _raw_weight(self, r: StageRecord) -> float:
        if self.is_banned(r.peer_id):
            return 0.0
        throughput = max(r.throughput, self.config.min_throughput)
        return throughput / (1.0 + r.load + self._inflight.get(r.peer_id, 0))

    def weights(self, stage: int, exclude: set[str] = frozenset()) -> dict[str, float]:
        """Choice probabilities over eligible (unbanned, not excluded) peers, summing to 1; {} if none."""
        with self._lock:
            raw = {p: self._raw_weight(r) for p, r in self._records.get(stage, {}).items() if p not in exclude}
            total = sum(raw.values())
            if total <= 0:
                return {}
            return {p: w / total for p, w in raw.items() if w > 0}

    def choose(self, stage: int, exclude: set[str] = frozenset()) -> StageRecord | None:
        """Draw one replica of ``stage`` by weight; None if every replica is banned, excluded or unknown."""
        with self._lock:
            w = self.weights(stage, exclude)
            if not w:
                return None
            peers = sorted(w)
            chosen = self.rng.choices(peers, weights=[w[p] for p in peers], k=1)[0]
            return self._records[stage][chosen]

    def begin(self, peer_id: str) -> None:
        """A call to ``peer_id`` starts (lowers its weight until end())."""
        with self._lock:
            self._inflight[peer_id] = self._inflight.get(peer_id, 0) + 1

    def end(self, peer_id: str, ok: bool, seconds: float) -> None:
        """A call to ``peer_id`` ended; a success clears the peer's ban streak."""
        with self._lock:
            left = self._inflight.get(peer_id, 0) - 1
            if left > 0:
                self._inflight[peer_id] = left
            else:
                self._inflight.pop(peer_id, None)
            if ok:
                self._last_ban_s.pop(peer_id, None)
                prev = self.latency_s.get(peer_id)
                self.latency_s[peer_id] = seconds if prev is None else 0.8 * prev + 0.2 * seconds

    def inflight(self, peer_id: str) -> int:
        with self._lock:
            return self._inflight.get(peer_id, 0)

    def ban(self, peer_id: str, reason: str, forever: bool = False) -> float:
        """Ban ``peer_id`` for ban_initial_s, doubling on each repeat up to ban_max_s (``forever``: for good, a
        peer caught lying); returns the length."""
        with self._lock:
            prev = self._last_ban_s.get(peer_id)
            length = self.config.ban_initial_s if prev is None else min(2.0 * prev, self.config.ban_max_s)
            length = math.inf if forever or self._banned_until.get(peer_id) == math.inf else length
            self._last_ban_s[peer_id] = length
            self._banned_until[peer_id] = self.clock() + length
            logger.warning(f"Peer {peer_id} failed ({reason}); not routing to it for {length:.1f} s")
            return length

    def is_banned(self, peer_id: str) -> bool:
        with self._lock:
            until = self._banned_until.get(peer_id)
            if until is None:
                return False
            if self.clock() >= until:
                del self._banned_until[peer_id]
                return False
            return True
