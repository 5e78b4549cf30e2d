"""Aggregation in bounded memory: how a delivered update becomes the reply a Flower strategy aggregates.

Flower's `aggregate_arrayrecords` needs every reply's weights at once. For the
mean-based strategies the coordinator instead folds each decoded update into one
running weighted sum (`MeanFold`, one per instruction set sharing a base model)
as it is delivered; the reply carries a `FoldedArrays` placeholder naming the
fold, and `StreamingFedAvg.aggregate_train` takes base + sum / total weight in
place of `aggregate_arrayrecords`. Subclasses (strategies.py) keep Flower's own
server-side step on top (FedAvgM momentum, FedAdam moments, DiLoCo's Nesterov).
Robust strategies need every update: `SpillUpdates` (spill.py) maps them from disk.
"""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import io
import math
import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.serverapp import strategy as S
from flwr.serverapp.exception import AggregationError

from fedswarm.coordinator.integrity import Inadmissible, peak_of, pieces
from fedswarm.proto.refusals import Reason

M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 128 << 10   # glibc mallopt: allocations above go to mmap
WEIGHT_KEY = "num-examples"   # the MetricRecord key Flower weights by (FedAvg's weighted_by_key)
FP32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class DecodedUpdate:
    """One verified upload: the task's base weights, the client's delta, and the reply's other records."""

    base: Mapping[str, torch.Tensor]
    delta: Mapping[str, torch.Tensor]
    metrics: MetricRecord
    client: ConfigRecord

    @property
    def weight(self) -> float:
        return float(self.metrics[WEIGHT_KEY])

    def weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(name, base + delta) tensor by tensor, so at most one tensor's sum is alive at a time."""
        for name in self.base:
            yield name, self.base[name] + self.delta[name]


class TensorArray(Array):
    """An Array over a float32 tensor the coordinator made (a round's mean, finished in its running sum's own
    buffers): `numpy()` is a read-only view of it, and Flower's serialized form (`data`) is built only if
    something asks for it, so a new global model costs no copy."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.dtype != torch.float32 or not tensor.is_contiguous():
            raise ValueError(f"a TensorArray holds a contiguous float32 tensor, got {tensor.dtype}")
        self.__dict__.update(dtype="float32", shape=tuple(tensor.shape), stype=SType.NUMPY, tensor=tensor)

    def numpy(self) -> np.ndarray:
        values = self.tensor.numpy().view()
        values.flags.writeable = False
        return values

    @property
    def data(self) -> bytes:  # Flower's serialized form, only built if something asks for it
        return Array(np.ascontiguousarray(self.numpy())).data


def read_only_view(array: Array) -> torch.Tensor:
    """A tensor over an Array's .npy bytes (Flower's numpy serialization) or a TensorArray's tensor, or a decoded
    copy of any other: to evaluate, check, checkpoint or serve, never to write into."""
    if isinstance(array, TensorArray):
        return array.tensor
    head = io.BytesIO(array.data)
    version = np.lib.format.read_magic(head) if array.stype == SType.NUMPY else None
    if version not in ((1, 0), (2, 0)):
        return torch.from_numpy(array.numpy().copy())
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(head)
    flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=head.tell())
    with warnings.catch_warnings():   # torch warns that the array is read-only: so is every use of it here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat.reshape(shape, order="F" if fortran else "C"))


class ArraysView(Mapping):
    """An ArrayRecord read as name -> float tensor, decoding one tensor per read and keeping none:
    a task's base weights cost no memory beyond the instruction's own ArrayRecord."""

    def __init__(self, arrays: ArrayRecord):
        self.arrays = arrays

    def __getitem__(self, name: str) -> torch.Tensor:
        return read_only_view(self.arrays[name])   # over the record's own bytes: no copy, never written

    def __iter__(self):
        return iter(self.arrays.keys())

    def __len__(self) -> int:
        return len(self.arrays)


class MeanFold:
    """The weighted running sum of the deltas answering instructions that share one base model."""

    def __init__(self, base: ArrayRecord):
        self.base = base                                   # the instructions' own ArrayRecord (not a copy)
        self._lock = threading.Lock()
        self._sums: dict[str, torch.Tensor] | None = None
        self._weights: dict[str, float] = {}               # instruction message id -> weight folded in
        self._peaks: dict[str, float] = {}                 # per tensor: a bound on max |sum| (no overflow)
        self._consumed = False

    def add(self, message_id: str, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"an update's weight must be > 0, got {weight}")
        with self._lock:
            if self._consumed:
                raise AggregationError("this round's mean was already taken; the update came too late")
            if message_id in self._weights:
                raise ValueError(f"an update for {message_id} was already folded in")
            if self._sums is not None and set(delta) != set(self._sums):
                raise ValueError("the update's tensors differ from the ones already folded in")
            peaks = self._room_for(delta, weight)   # checked before anything is added: all or nothing
            if self._sums is None:
                self._sums = self._first_sums(delta, weight)
            else:
                for n in delta:   # a piece at a time: the delta is never decoded whole
                    flat, at = self._sums[n].view(-1), 0
                    for piece in pieces(delta, n):
                        flat[at:at + piece.numel()].add_(piece, alpha=weight)
                        at += piece.numel()
            self._peaks = peaks
            self._weights[message_id] = weight

    def _first_sums(self, delta: Mapping[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
        """weight x delta, filled a piece at a time into new float32 buffers of the base's shapes."""
        sums = {}
        for n in delta:
            sums[n] = torch.empty(tuple(self.base[n].shape), dtype=torch.float32)
            flat, at = sums[n].view(-1), 0
            for piece in pieces(delta, n):
                torch.mul(piece.float(), weight, out=flat[at:at + piece.numel()])
                at += piece.numel()
        return sums

    def _room_for(self, delta: Mapping[str, torch.Tensor], weight: float) -> dict[str, float]:
        """The sums' bounds (max |sum| per tensor) after adding weight x delta; Inadmissible if a sum could leave
        fp32's range (or the delta is not finite), so the fp32 sums can never overflow."""
        peaks = {}
        for n in delta:
            top = self._peaks.get(n, 0.0) + weight * peak_of(delta, n)
            if not math.isfinite(top):
                raise Inadmissible(Reason.NON_FINITE, f"the update's {n!r} is not finite")
            if top > FP32_MAX:
                raise Inadmissible(Reason.UPDATE_OVERFLOW, f"the update's {n!r} x its weight {weight:g} would overflow "
                                   f"the round's fp32 sum")
            peaks[n] = top
        return peaks

    def mean(self, weights: Mapping[str, float]) -> ArrayRecord:
        """base + sum / total weight, for exactly the replies in `weights` (instruction id -> weight).

        Finished in the sums' own buffers, which become the result's arrays (TensorArray): call once."""
        with self._lock:
            if self._consumed:
                raise AggregationError("the mean of this fold was already taken")
            if dict(weights) != self._weights:
                missing = set(weights) - set(self._weights)
                extra = set(self._weights) - set(weights)
                raise AggregationError(f"the replies and the folded updates differ ({len(missing)} replies not "
                                       f"folded, {len(extra)} folded updates not among the replies)")
            self._consumed = True
            total = sum(self._weights.values())
            sums, self._sums = self._sums, None
        out = ArrayRecord()
        for name, base in self.base.items():
            s, view = sums.pop(name).div_(total), read_only_view(base)
            if view.dtype == torch.float32:
                out[name] = TensorArray(s.add_(view.view(s.shape)))
            else:   # a base of another dtype: numpy's promotion, in a new array
                out[name] = Array(np.asarray(base.numpy() + s.numpy().reshape(base.shape)))
        return out


class FoldedArrays(ArrayRecord):
    """A reply's ArrayRecord whose values were folded into `fold`: the model's keys, shapes and
    dtypes, but no data (reading one raises), so only a fold-aware strategy can aggregate it."""

    def __init__(self, fold: MeanFold):
        super().__init__()
        for name, array in fold.base.items():
            self[name] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=SType.NUMPY, data=b"")
        self.__dict__["fold"] = fold


class UpdateSink:
    """Turns a delivered, verified update into the reply content the strategy will aggregate; counts the
    aggregates refused before commit (the driver's last check), which status lists with the rejections."""

    def __init__(self):
        self._refused_lock = threading.Lock()
        self._refused: collections.Counter[str] = collections.Counter()

    def refuse(self, reason: Reason) -> None:
        with self._refused_lock:
            self._refused[Reason(reason).value] += 1

    def refused(self) -> dict[str, int]:
        with self._refused_lock:
            return dict(self._refused)

    def fold_for(self, base: ArrayRecord) -> MeanFold:
        """The running sum of the updates answering instructions that share `base` (secure aggregation: masked)."""
        return MeanFold(base)

    def content(self, instruction: Message, fold: MeanFold | None, update: DecodedUpdate) -> RecordDict:
        raise NotImplementedError

    def release_round(self, server_round: int) -> None:
        """The round is aggregated: drop whatever was kept for it."""


class HoldEveryUpdate(UpdateSink):
    """Flower's stock path: each reply carries its full weights until aggregation."""

    def content(self, instruction: Message, fold: MeanFold | None, update: DecodedUpdate) -> RecordDict:
        arrays = ArrayRecord()
        for name, w in update.weights():
            arrays[name] = Array(w.detach().cpu().float().numpy())
        return RecordDict({"arrays": arrays, "metrics": update.metrics, "client": update.client})


class FoldUpdates(UpdateSink):
    """Mean-based strategies: fold the delta into the instruction set's running sum; hold nothing else."""

    def content(self, instruction: Message, fold: MeanFold | None, update: DecodedUpdate) -> RecordDict:
        if fold is None:
            raise AggregationError("the instruction carried no arrays to fold an update into")
        fold.add(instruction.metadata.message_id, update.delta, update.weight)
        return RecordDict({"arrays": FoldedArrays(fold), "metrics": update.metrics, "client": update.client})


def task_round(msg: Message) -> int:
    """The round an instruction belongs to (its group id, else Flower's injected server-round)."""
    config = msg.content["config"] if "config" in msg.content else {}
    return int(msg.metadata.group_id or config.get("server-round", 0))


class StreamingFedAvg(S.FedAvg):
    """FedAvg whose weighted mean of folded replies comes from their MeanFold.

    Replies carrying ordinary ArrayRecords go through Flower's own `aggregate_arrayrecords`."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        records = [m.content.array_records.get(self.arrayrecord_key) for m in replies if not m.has_error()]
        folded = [r for r in records if isinstance(r, FoldedArrays)]
        if not folded:
            return super().aggregate_train(server_round, replies)
        if len(folded) != len(records):
            raise AggregationError("some replies were folded and some were not: they cannot be averaged together")
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        folds = {id(r.fold): r.fold for r in folded}
        if len(folds) != 1:
            raise AggregationError(f"the replies belong to {len(folds)} different rounds' folds")
        fold = next(iter(folds.values()))
        weights = {m.metadata.reply_to_message_id: float(next(iter(m.content.metric_records.values()))[self.weighted_by_key])
                   for m in valid}
        arrays = fold.mean(weights)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return arrays, metrics


def sink_for(strategy: str, state_dir: str | None, aggregation: str = "stream", secure: bool = False) -> UpdateSink:
    """The bounded-memory sink for a strategy (fold mean-based ones, spill robust ones to the state dir),
    or with aggregation="hold" Flower's stock path; `secure`: --secure-aggregation's masked sums."""
    from fedswarm.coordinator.spill import SpillUpdates
    from fedswarm.coordinator.strategies import MEAN_BASED

    if secure:
        from fedswarm.coordinator.secagg_round import SecAggSink

        return SecAggSink()   # run_config refuses the strategies that need every update
    if aggregation == "hold":
        return HoldEveryUpdate()
    if aggregation != "stream":
        raise ValueError(f"--aggregation {aggregation!r}: choose stream or hold")
    if strategy in MEAN_BASED:
        return FoldUpdates()
    if state_dir is None:
        raise ValueError(f"strategy {strategy!r} keeps every update: it needs a --state-dir to spill them to")
    return SpillUpdates(state_dir)


def return_freed_memory_to_os() -> bool:
    """Pin glibc's mmap threshold at 128 KiB: tensors and buffers above it are mmapped and go back to
    the OS when freed (glibc's dynamic threshold otherwise rises to 32 MiB and keeps freed updates
    in per-thread arenas, so RSS stays at its high-water mark). False where this is not glibc."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name)
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)


def rss_bytes() -> dict[str, int]:
    """This process's resident set now (VmRSS) and its high-water mark (VmHWM); {} off Linux."""
    try:
        lines = open("/proc/self/status").read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out
