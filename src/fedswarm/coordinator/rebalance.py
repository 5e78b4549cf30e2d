"""When moving a swarm peer to another stage pays: a pipeline model, hysteresis and cool-downs (no locks, no I/O).

A pipeline serves at most the tokens/s of its slowest stage, and a stage serves the sum of its replicas'
capacities. A replica's capacity is the tokens it serves per second it spends computing (its reported
throughput over its utilization), so it does not depend on how busy the pipeline keeps it. Moving a peer
changes two stages: its old one loses its capacity, its new one gains what that peer would do there. The move
costs the peer's measured switch time (stage fetch + build), during which it serves neither. A move is made
only when, in `hold_windows` windows in a row, it would raise the pipeline's tokens over `horizon_s` by at
least `min_gain`, switch time included; a moved peer then stays for `peer_cooldown_s`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SwarmRegistryConfig:
    """The swarm registry's timings (seconds) and thresholds (fractions)."""
    warm_reports: int = 4             # a peer's readings count after this many heartbeats serving its stage
    rate_window_s: float = 10.0       # the trainers' tokens/s is measured over this window
    window_s: float = 10.0            # one evidence window: each peer's readings are pooled over this long
    hold_windows: int = 3             # a move must pay in this many windows in a row (one noisy window moves nothing)
    horizon_s: float = 300.0          # a move must pay for its switch within this long ...
    min_gain: float = 0.15            # ... raising the predicted pipeline tokens over it by at least this fraction
    saturated: float = 0.5            # a stage gets a peer only if a replica of it is busy at least this much
    min_util: float = 0.02            # a replica busy less than this gives no capacity reading (its stage's mean)
    default_switch_s: float = 30.0    # the switch time assumed for a peer that has reported none
    max_switch_s: float = 3600.0      # reported switch times are capped here
    peer_cooldown_s: float = 300.0    # a moved peer stays this long before it may move again (an emptied stage
                                      # still takes it when no other peer can go)
    rebalance_cooldown_s: float = 60.0   # at most one throughput move this often (an emptied stage fills at once)


@dataclass(frozen=True)
class Move:
    """One planned re-assignment and what it is predicted to bring."""
    peer: int
    src: int
    dst: int
    rate_now: float      # predicted pipeline tokens/s as placed now
    rate_after: float    # ... once the peer serves `dst`
    gain: float          # fractional gain in tokens over the horizon, net of the switch
    switch_s: float      # the peer's measured switch time


def pipeline_rate(stage_caps: list[float]) -> float:
    """A pipeline serves at most what its slowest stage does."""
    return min(stage_caps) if stage_caps else 0.0


def net_gain(rate_now: float, rate_during: float, rate_after: float, switch_s: float, horizon_s: float) -> float:
    """Tokens over the horizon when moving (`switch_s` at `rate_during`, then `rate_after`) vs staying, minus 1."""
    if rate_now <= 0 or horizon_s <= 0:
        return 0.0
    switch = min(max(switch_s, 0.0), horizon_s)
    return (rate_during * switch + rate_after * (horizon_s - switch)) / (rate_now * horizon_s) - 1.0


def plan_move(stages: list[list[int]], cap: dict[int, float], busy: list[float], switch_s: dict[int, float],
              cooling: set[int], cfg: SwarmRegistryConfig) -> Move | None:
    """The move with the largest net gain over the horizon, if that gain is at least `min_gain`.

    stages: the peers of each stage; cap: each peer's capacity (tokens per busy second); busy: each stage's
    busiest replica's utilization; switch_s: each peer's switch time; cooling: peers that may not move."""
    stage_cap = [sum(cap[c] for c in peers) for peers in stages]
    now, best = pipeline_rate(stage_cap), None
    for src, peers in enumerate(stages):
        if len(peers) < 2 or stage_cap[src] <= 0:
            continue
        for peer in sorted(set(peers) - cooling):
            for dst, dst_peers in enumerate(stages):
                if dst == src or not dst_peers or busy[dst] < cfg.saturated:
                    continue
                after = list(stage_cap)
                after[src] -= cap[peer]
                during = pipeline_rate(after)
                # the peer at dst: its own speed times how fast dst's replicas are relative to src's
                after[dst] += cap[peer] * (stage_cap[dst] / len(dst_peers)) / (stage_cap[src] / len(peers))
                gain = net_gain(now, during, pipeline_rate(after), switch_s[peer], cfg.horizon_s)
                if best is None or gain > best.gain:
                    best = Move(peer, src, dst, now, pipeline_rate(after), gain, switch_s[peer])
    return best if best is not None and best.gain >= cfg.min_gain else None


def window_readings(stages: list[list[int]], sums: dict[int, list[float]], min_util: float
                    ) -> tuple[dict[int, float], list[float]] | None:
    """Each peer's capacity and each stage's busiest replica, from one window's pooled readings
    (sums[peer] = [throughput, utilization, count]). A replica that was (nearly) idle gets its stage's mean
    capacity; None (no judgement) if a peer reported nothing or a whole stage was idle."""
    cap, busy = {}, []
    for peers in stages:
        if any(sums.get(c, (0, 0, 0))[2] == 0 for c in peers):
            return None
        measured = {c: sums[c][0] / sums[c][1] for c in peers if sums[c][1] / sums[c][2] >= min_util}
        if peers and not measured:
            return None
        mean = sum(measured.values()) / len(measured) if measured else 0.0
        cap.update({c: measured.get(c, mean) for c in peers})
        busy.append(max((sums[c][1] / sums[c][2] for c in peers), default=0.0))
    return cap, busy


class Rebalancer:
    """Pools peers' readings into windows and says when a move has paid in `hold_windows` windows in a row.
    Not thread-safe: the registry calls it under its lock."""

    def __init__(self, cfg: SwarmRegistryConfig, clock):
        self.cfg, self.clock = cfg, clock
        self._moved_at: dict[int, float] = {}
        self._last_move = -math.inf
        self.windows = {"judged": 0, "incomplete": 0, "paying": 0}   # for status: what the evidence showed
        self.reset()

    def reset(self) -> None:
        """The placement changed: evidence gathered for the old one no longer counts."""
        self._window_start = self.clock()
        self._sums: dict[int, list[float]] = {}
        self._streak: tuple[int | None, int] = (None, 0)   # (the stage a move would fill, windows in a row)

    def observe(self, cid: int, throughput: float, utilization: float) -> None:
        """One heartbeat's reading of a warm peer serving its assigned stage."""
        s = self._sums.setdefault(cid, [0.0, 0.0, 0])
        s[0] += throughput
        s[1] += utilization
        s[2] += 1

    def moved(self, cid: int) -> None:
        """`cid` was just re-assigned: its cool-down starts and the evidence starts over."""
        self._moved_at[cid] = self._last_move = self.clock()
        self.reset()

    def forget(self, cid: int) -> None:
        self._moved_at.pop(cid, None)
        self._sums.pop(cid, None)

    def cooling(self) -> set[int]:
        now = self.clock()
        return {c for c, t in self._moved_at.items() if now - t < self.cfg.peer_cooldown_s}

    @property
    def streak(self) -> int:
        return self._streak[1]

    def tick(self, stages: list[list[int]], switch_s: dict[int, float]) -> Move | None:
        """Close the window once `window_s` passed; the move to make, if the same one paid in enough windows."""
        now = self.clock()
        if now - self._window_start < self.cfg.window_s:
            return None
        sums, self._sums, self._window_start = self._sums, {}, now
        readings = window_readings(stages, sums, self.cfg.min_util)
        move = plan_move(stages, *readings, switch_s, self.cooling(), self.cfg) if readings else None
        self.windows["judged" if readings else "incomplete"] += 1
        self.windows["paying"] += move is not None
        key = move.dst if move else None   # the same stage starved, whichever stage would give
        held = self._streak[1] + 1 if key is not None and key == self._streak[0] else int(key is not None)
        self._streak = (key, held)
        if move and held >= self.cfg.hold_windows and now - self._last_move >= self.cfg.rebalance_cooldown_s:
            return move
        return None
