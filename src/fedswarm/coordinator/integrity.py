"""What an update must be before it joins an aggregate, and what an aggregate must be before it is committed.

An update is admissible when every weight it leads to is finite and within +-MAX_WEIGHT (below that no
strategy's fp32 arithmetic can overflow: weighted sums, medians, FedAdam's squared deltas), and, with
--max-update-norm-ratio R, when its L2 norm is at most R x the median norm of the updates recently accepted
for the same model (or stage); before there are MIN_HISTORY of those, R x the norm of the task's weights.
An aggregate that is not finite anyway is never committed: the driver repeats the round (`rewind_strategy`
first undoes what the refused aggregate did to the strategy's server-side state).
"""
from __future__ import annotations

import collections
import logging
import math
import statistics
import threading
from collections.abc import Iterable, Iterator, Mapping

import torch
from flwr.app import ArrayRecord

from fedswarm.proto import codec as C
from fedswarm.proto.refusals import Reason
from fedswarm.proto.wire import DecodeOnRead

log = logging.getLogger(__name__)
MAX_WEIGHT = 2.0 ** 32       # no trained model holds a weight this large
NORM_WINDOW = 32             # accepted update norms remembered per model (or stage), across rounds
MIN_HISTORY = 3              # fewer than this: bound by the norm of the task's weights instead
NORM_CHUNK = 1 << 20         # values summed in float64 (or checked) at a time: bounded temporaries


class Inadmissible(ValueError):
    """An update (or aggregate) that must not be folded or committed; `reason` is the counter it lands in."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = Reason(reason), detail


def l2_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all values together, summed in float64 a chunk at a time (1e36 does not overflow)."""
    total = 0.0
    for t in tensors:
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), NORM_CHUNK):
            total += float(flat[start:start + NORM_CHUNK].double().square().sum())
    return math.sqrt(total)


def flat_pieces(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """`t` flattened, NORM_CHUNK values at a time (views, no copies)."""
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), NORM_CHUNK):
        yield flat[start:start + NORM_CHUNK]


def pieces(tensors: Mapping[str, torch.Tensor], name: str) -> Iterator[torch.Tensor]:
    """Tensor `name` flattened, a bounded piece at a time, in order: an upload still held as its validated
    encoded parts (wire.DecodeOnRead) is decoded one part at a time, never whole."""
    if isinstance(tensors, DecodeOnRead):
        for part in tensors.encoded[name]:
            yield C.decode(part)
    else:
        yield from flat_pieces(tensors[name])


def peak_of(tensors: Mapping[str, torch.Tensor], name: str) -> float:
    """peak() of tensor `name`, read a piece at a time (nan if any value is nan)."""
    top = 0.0
    for piece in pieces(tensors, name):
        value = peak(piece)
        if math.isnan(value):
            return math.nan
        top = max(top, value)
    return top


def peak(t: torch.Tensor) -> float:
    """max |t| (nan if any value is nan; 0 for an empty tensor), without a temporary of t's size."""
    if t.numel() == 0:
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def check_values(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
    """Inadmissible unless base + delta is finite and within +-MAX_WEIGHT (one piece's sum alive at a time)."""
    for name in delta:
        flat, at, top = base[name].reshape(-1), 0, 0.0
        for piece in pieces(delta, name):
            value = peak(flat[at:at + piece.numel()] + piece)
            at += piece.numel()
            if not math.isfinite(value):
                raise Inadmissible(Reason.NON_FINITE, f"the update makes {name!r} non-finite")
            top = max(top, value)
        if top > MAX_WEIGHT:
            raise Inadmissible(Reason.UPDATE_MAGNITUDE, f"the update takes {name!r} to {top:.3g}, beyond the "
                               f"+-{MAX_WEIGHT:.3g} any model's weights stay within")


def non_finite_tensors(arrays: ArrayRecord) -> list[str]:
    """The names of the record's tensors holding a NaN or Inf (read in place, a piece at a time)."""
    from fedswarm.coordinator.aggregate import read_only_view   # aggregate imports this module

    return [name for name in arrays.keys()
            if not all(bool(torch.isfinite(p).all()) for p in flat_pieces(read_only_view(arrays[name])))]


class UpdateNormBound:
    """--max-update-norm-ratio R: refuse an update whose L2 norm exceeds R x the median of the norms recently
    accepted under the same key (the model, or a stage); with fewer than MIN_HISTORY, R x the base's norm."""

    def __init__(self, ratio: float, window: int = NORM_WINDOW, min_history: int = MIN_HISTORY):
        self.ratio, self.window, self.min_history = ratio, window, min_history
        self._lock = threading.Lock()
        self._norms: dict[str, collections.deque] = {}

    def limit(self, key: str, base: Mapping[str, torch.Tensor]) -> float | None:
        """The largest norm admitted now (None: no bound)."""
        if not self.ratio:
            return None
        with self._lock:
            recent = list(self._norms.get(key, ()))
        if len(recent) >= self.min_history:
            return self.ratio * statistics.median(recent)
        base_norm = l2_norm(base.values())
        return self.ratio * base_norm if base_norm > 0 else None

    def check(self, key: str, delta: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
        """The update's norm; Inadmissible("update_norm") if it exceeds the limit."""
        norm = l2_norm(piece for name in delta for piece in pieces(delta, name))
        limit = self.limit(key, base)
        log.info("%s: update norm %.4g, %.3g x the reference (limit %s)", key, norm,
                  norm * self.ratio / limit if limit else math.nan, f"{limit:.4g}" if limit else "none")
        if limit is not None and norm > limit:
            raise Inadmissible(Reason.UPDATE_NORM, f"update norm {norm:.4g} exceeds {limit:.4g} (--max-update-norm-ratio "
                               f"{self.ratio:g} x the reference norm): train with a smaller lr or fewer steps, or "
                               f"raise or turn off (0) the ratio")
        return norm

    def accept(self, key: str, norm: float) -> None:
        """Remember an accepted update's norm (an empty update, e.g. a replica with no steps, says nothing)."""
        if not self.ratio or not norm > 0:
            return
        with self._lock:
            self._norms.setdefault(key, collections.deque(maxlen=self.window)).append(norm)


def rewind_strategy(strategy, store, arrays: ArrayRecord) -> None:
    """Undo a refused aggregate's effect on the strategy: its global model goes back to `arrays` and its
    optimizer state (momentum, moments) to the last committed checkpoint's (none there: cleared)."""
    from fedswarm.coordinator.strategy_state import DICT_ATTRS, LIST_ATTRS, import_state, split_checkpoint

    if hasattr(strategy, "current_arrays"):
        strategy.current_arrays = None   # FedAvgM, FedOpt, DiLoCo take it from configure_train's arrays again
    held = [a for a in DICT_ATTRS + LIST_ATTRS if getattr(strategy, a, None) is not None]
    if not held:
        return
    for attr in held:
        setattr(strategy, attr, None)
    last = store.last_round()
    if last is not None:
        _, state = split_checkpoint(store.load_checkpoint(last))
        import_state(strategy, state, list(arrays.keys()))


def refused_aggregate(rnd: int, aggregate: ArrayRecord, arrays: ArrayRecord, strategy, store, sink) -> bool:
    """The driver's last check before commit: True (logged, counted in `sink`, strategy rewound) if the round's
    aggregate holds a NaN or Inf; the round is then repeated like one with no usable reply."""
    bad = non_finite_tensors(aggregate)
    if not bad:
        return False
    log.error("round %d: the aggregate is not finite in %d tensor(s) (%s); not committed, repeating the round",
              rnd, len(bad), ", ".join(bad[:3]))
    rewind_strategy(strategy, store, arrays)
    if sink is not None:
        sink.refuse(Reason.NON_FINITE_AGGREGATE)
    return True
