"""Robust strategies (median, trimmed mean, Krum) need every update: keep them on disk, not in RAM.

Each delivered update is written once to `<state-dir>/spill/round-N/<task>.f32`
(float32, the model's tensors back to back); its reply carries `MappedArray`s
whose `numpy()` is a read-only memory map of that file, so Flower's own
FedMedian / FedTrimmedAvg read one layer of every update at a time. Krum's
pairwise distances are accumulated layer by layer (`SpillKrum`) instead of
stacking every flattened model. A round's files are removed once it is aggregated.
"""
from __future__ import annotations

import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.serverapp import strategy as S
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedswarm.coordinator.aggregate import DecodedUpdate, MeanFold, UpdateSink, task_round

SPILL_DIR = "spill"


class MappedArray(Array):
    """An Array whose float32 values live in a spill file; `numpy()` maps them read-only, never copies."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...]):
        self.__dict__.update(dtype="float32", shape=tuple(shape), stype=SType.NUMPY, path=path, offset=offset)

    def numpy(self) -> np.ndarray:
        if int(np.prod(self.shape)) == 0:
            return np.zeros(self.shape, dtype=np.float32)
        return np.memmap(self.path, dtype=np.float32, mode="r", offset=self.offset, shape=self.shape)

    @property
    def data(self) -> bytes:  # Flower's serialized form, only built if something asks for it
        return Array(np.ascontiguousarray(self.numpy())).data


class SpillUpdates(UpdateSink):
    """Writes each update's weights to the state dir and hands Flower memory-mapped Arrays."""

    def __init__(self, state_dir: str | Path):
        super().__init__()
        self.root = Path(state_dir) / SPILL_DIR
        shutil.rmtree(self.root, ignore_errors=True)   # left by a coordinator that was killed mid-round
        self._lock = threading.Lock()

    def round_dir(self, server_round: int) -> Path:
        return self.root / f"round-{server_round}"

    def content(self, instruction: Message, fold: MeanFold | None, update: DecodedUpdate) -> RecordDict:
        folder = self.round_dir(task_round(instruction))
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{instruction.metadata.message_id}.f32"
        arrays, offset = ArrayRecord(), 0
        with open(path, "wb") as f:
            for name, w in update.weights():
                values = np.ascontiguousarray(w.detach().cpu().float().numpy())
                f.write(memoryview(values).cast("B"))
                arrays[name] = MappedArray(str(path), offset, tuple(values.shape))
                offset += values.nbytes
        return RecordDict({"arrays": arrays, "metrics": update.metrics, "client": update.client})

    def release_round(self, server_round: int) -> None:
        with self._lock:
            shutil.rmtree(self.round_dir(server_round), ignore_errors=True)


def streamed_distances(records: list[ArrayRecord]) -> np.ndarray:
    """Squared L2 distances between records, as Flower's compute_distances, one layer at a time."""
    n = len(records)
    gram = np.zeros((n, n), dtype=np.float64)
    for key in records[0].keys():
        layer = np.stack([np.asarray(r[key].numpy(), dtype=np.float64).ravel() for r in records])
        gram += layer @ layer.T
    norms = np.diag(gram)
    return norms[:, None] + norms[None, :] - 2 * gram


class SpillKrum(S.Krum):
    """Flower's Krum, selecting with distances accumulated layer by layer (no stack of whole models)."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        record_key = list(contents[0].array_records.keys())[0]
        distances = streamed_distances([c[record_key] for c in contents])
        # From here on exactly flwr's select_multikrum.
        num_closest = max(1, len(contents) - self.num_malicious_nodes - 2)
        closest = [np.argsort(row)[1:num_closest + 1].tolist() for row in distances]
        scores = [np.sum(distances[i, closest[i]]) for i in range(len(distances))]
        chosen = [contents[i] for i in np.argsort(scores)[:self.num_nodes_to_select]]
        return (aggregate_arrayrecords(chosen, self.weighted_by_key),
                self.train_metrics_aggr_fn(chosen, self.weighted_by_key))
