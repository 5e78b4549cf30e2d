"""What Status reports, bounded whatever the run's age: the last rounds plus totals over all of them, the
whole history in pages (StatusRequest.history), the first clients plus counts of every session."""
from __future__ import annotations

import bisect
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from fedswarm.coordinator.privacy import status_entry

TOTAL_FIELDS = ("bytes_up", "bytes_up_raw", "bytes_down", "bytes_down_raw", "tokens", "failures", "seconds")


@dataclass
class StatusLimits:
    """Everything a Status reply lists, bounded (a reply stays far below the 4 MiB message limit)."""

    recent_rounds: int = 100      # rounds in a plain Status: the last N (--status-rounds; totals cover every round)
    page_rounds: int = 1000       # most rounds in one page of the history
    round_bytes: int = 1 << 20    # ... and about this much JSON of rounds in any reply (always at least one round)
    clients: int = 1000           # client rows (clients_total and clients_by_role count every session)
    stage_peers: int = 1000       # swarm: peer names listed per stage (peer_count counts them all)

    def __post_init__(self):
        if self.recent_rounds < 0:
            raise ValueError(f"--status-rounds {self.recent_rounds}: must be >= 0 (0: totals only)")


class RoundLedger:
    """Totals over every committed round and each round's JSON size, folded once per round as the driver
    appends rounds (the list only grows; a list replaced or cut is folded again). Call with the progress lock
    held, so the list holds still."""

    def __init__(self):
        self._list, self._folded, self._sizes, self._totals = None, 0, [], _zero()

    def fold(self, rounds: list[dict]) -> None:
        if rounds is not self._list or len(rounds) < self._folded:   # not the list we folded: start over
            self._list, self._folded, self._sizes, self._totals = rounds, 0, [], _zero()
        for r in rounds[self._folded:]:
            self._sizes.append(len(json.dumps(r)) + 2)
            if r["round"] > 0:
                self._totals["rounds_committed"] += 1
                self._totals["updates"] += len(r.get("clients") or ())
                for key in TOTAL_FIELDS:
                    self._totals[key] += r.get(key) or 0
        self._folded = len(rounds)

    def totals(self, rounds: list[dict]) -> dict:
        self.fold(rounds)
        return {**self._totals, "seconds": round(self._totals["seconds"], 3)}

    def recent(self, rounds: list[dict], n: int, budget: int) -> list[dict]:
        """The last `n` rounds, fewer if they pass `budget` bytes of JSON (never none when n > 0)."""
        self.fold(rounds)
        first, size = len(rounds), 0
        while first > max(len(rounds) - n, 0):
            size += self._sizes[first - 1]
            if size > budget and first < len(rounds):
                break
            first -= 1
        return [dict(r) for r in rounds[first:]]

    def page(self, rounds: list[dict], start: int, limit: int, budget: int) -> tuple[list[dict], int | None]:
        """Up to `limit` rounds from round `start` on, within `budget` bytes (at least one); and the next round."""
        self.fold(rounds)
        first = bisect.bisect_left(rounds, start, key=lambda r: r["round"])
        end, size = first, 0
        while end < min(first + limit, len(rounds)):
            size += self._sizes[end]
            if size > budget and end > first:
                break
            end += 1
        return [dict(r) for r in rounds[first:end]], rounds[end]["round"] if end < len(rounds) else None


def _zero() -> dict:
    return {"rounds_committed": 0, "updates": 0, **dict.fromkeys(TOTAL_FIELDS, 0)}


class StatusReport:
    """Builds the Status object and the history pages from the run's progress, membership and the mode's own
    part (`mode_status`, given the limits: the swarm's stages)."""

    def __init__(self, cfg, run_id: str, progress, members, mode_status: Callable[[StatusLimits], dict] | None = None,
                 limits: StatusLimits | None = None):
        self.cfg, self.run_id, self.progress, self.members = cfg, run_id, progress, members
        self.mode_status = mode_status or (lambda limits: {})
        self.limits = limits or StatusLimits()
        self.ledger = RoundLedger()
        with progress.lock:   # a resumed run's rounds, folded at start-up rather than in the first Status
            self.ledger.fold(progress.rounds)
            # the committed round this process took the run up from (None: it started the run)
            self.resumed_from = progress.rounds[-1]["round"] if progress.rounds else None

    def status(self, counters: dict) -> dict:
        lim, p = self.limits, self.progress
        with p.lock:
            rounds = self.ledger.recent(p.rounds, lim.recent_rounds, lim.round_bytes)
            totals = self.ledger.totals(p.rounds)
            first, last = (p.rounds[0]["round"], p.rounds[-1]["round"]) if p.rounds else (0, 0)
            listed = len(p.rounds)
            state, current = p.state, p.current_round
            privacy, end_reason = status_entry(self.cfg, p.rounds), getattr(p, "end_reason", None)
        return {
            "state": state, "run_id": self.run_id, "round": last, "current_round": current,
            "rounds_total": self.cfg.rounds, **self._clients(),
            "rounds": rounds, "totals": totals,
            "history": {"rounds": listed, "first_round": first, "last_round": last, "rounds_shown": len(rounds),
                        "page_rounds": lim.page_rounds},
            "config": json.loads(self.cfg.to_json()), **counters,
            **({"privacy": privacy} if privacy else {}), **({"end_reason": end_reason} if end_reason else {}),
            **({"resumed_from": self.resumed_from} if self.resumed_from is not None else {}),
            **self.mode_status(lim),
        }

    def history(self, from_round: int, max_rounds: int) -> dict:
        """A page of committed rounds from `from_round` on; `next_round` (None at the end) continues."""
        lim, p = self.limits, self.progress
        limit = min(max_rounds or lim.page_rounds, lim.page_rounds)
        with p.lock:
            rounds, next_round = self.ledger.page(p.rounds, from_round, limit, lim.round_bytes)
            last = p.rounds[-1]["round"] if p.rounds else 0
            state = p.state
        return {"state": state, "run_id": self.run_id, "round": last, "rounds": rounds, "next_round": next_round}

    def _clients(self) -> dict:
        members = self.members.snapshot()
        now = time.monotonic()
        return {
            "clients": [{"name": m.name, "id": str(m.client_id), "role": m.role, "device": m.device,
                         "precision": m.precision, "rounds_done": m.rounds_done, "address": m.address,
                         "seen_s_ago": round(now - m.last_seen, 2)} for m in members[:self.limits.clients]],
            "clients_total": len(members),
            "clients_by_role": dict(Counter(m.role for m in members)),
        }
