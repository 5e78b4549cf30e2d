"""The model versions a virtual-client worker keeps, so its clients download deltas as daemons do.

Each virtual client holds the version it last downloaded, as a daemon would; the worker stores each version's
weights once (all the clients of a round hold the same one) and keeps as many recent versions as
`--virtual-version-cache` MiB allows. A client whose version was evicted holds none and downloads a full copy,
which the worker's stats count."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from fedswarm.client.daemon import Held


def state_bytes(held: Held) -> int:
    return sum(t.numel() * t.element_size() for t in held.state.values())


@dataclass
class CacheStats:
    deltas: int = 0          # downloads that were delta steps from a version the client held
    full: int = 0            # downloads that were full float32 copies (no version held, or evicted)
    evicted: int = 0         # versions dropped to stay within the budget


class VersionCache:
    """client index -> the version it holds; (version, digest) -> its weights, least recently used evicted
    first once they exceed `budget_bytes` (0: keep none, every download a full copy)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.stats = CacheStats()
        self._versions: OrderedDict[tuple[int, bytes], Held] = OrderedDict()
        self._held_by: dict[int, tuple[int, bytes]] = {}
        self._lock = threading.Lock()

    def held(self, index: int) -> Held | None:
        """The version client `index` holds, if the worker still keeps it."""
        with self._lock:
            key = self._held_by.get(index)
            if key is None or key not in self._versions:
                return None
            self._versions.move_to_end(key)
            return self._versions[key]

    def downloaded(self, index: int, got: Held) -> Held:
        """Record what client `index` now holds (the stored copy when another client already brought it)."""
        key = (got.version, got.digest)
        with self._lock:
            if got.steps:
                self.stats.deltas += 1
            elif got.wire_bytes:
                self.stats.full += 1
            stored = self._versions.get(key)
            if stored is None and state_bytes(got) <= self.budget_bytes:
                self._versions[key] = stored = Held(got.version, got.state, got.digest)
            if stored is not None:
                self._versions.move_to_end(key)
                self._held_by[index] = key
            else:
                self._held_by.pop(index, None)
            self._evict()
        return got

    def _evict(self) -> None:
        total = sum(state_bytes(h) for h in self._versions.values())
        while total > self.budget_bytes and self._versions:
            _, oldest = self._versions.popitem(last=False)
            total -= state_bytes(oldest)
            self.stats.evicted += 1
