"""The as-served state on disk: written tensor by tensor as it is computed, read back one tensor per read.

A served state is a float32 copy of the model that clients reconstruct (downloads.py). Held in memory it is
another whole model on the coordinator; it is persisted every version anyway, so the file is the only copy:

    ServedFile.write(path, shapes, tensor_of, metadata) -> digest          (atomic: temp, fsync, rename)
    ServedFile(path)[name] -> a fresh float32 tensor                         (pread of that tensor only)

The file is safetensors (F32 tensors, contiguous, in name order), so `safetensors` reads it too. An open
ServedFile keeps reading the version it opened after a newer one replaced the path (it holds the descriptor),
so a full copy streaming an older version stays consistent.

A version's encoded step (what a client one version behind downloads) lives on disk too, in a StepFile: an
unnamed temporary file beside the served state, gone once the step is dropped (or the coordinator exits)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from fedswarm.coordinator.store import fsync_dir
from fedswarm.proto import codec as C
from fedswarm.proto import wire

HEADER_LIMIT = 100 << 20   # a header larger than this is not one this module wrote


class ServedFile(Mapping):
    """A read-only name -> float32 tensor mapping over one served-state file (its descriptor held open)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.metadata, self._index, self.shapes = _read_header(self._fd, os.fstat(self._fd).st_size)
        except BaseException:
            os.close(self._fd)
            raise

    def __getitem__(self, name: str) -> torch.Tensor:
        start, end = self._index[name]
        data = bytearray(end - start)
        view, got = memoryview(data), 0
        while got < len(data):
            n = os.preadv(self._fd, [view[got:]], start + got)
            if n == 0:
                raise OSError(f"{self.path} ends inside tensor {name!r}: the download cache is truncated")
            got += n
        return torch.frombuffer(data, dtype=torch.float32).view(self.shapes[name]) if data else \
            torch.zeros(self.shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def digest(self) -> bytes:
        """wire.state_digest of the state, one tensor read at a time."""
        h = hashlib.sha256()
        for name in sorted(self._index):
            wire.digest_update(h, name, self[name])
        return h.digest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    @staticmethod
    def write(path: Path, shapes: Mapping[str, tuple[int, ...]], tensor_of: Callable[[str], torch.Tensor],
              metadata: dict[str, str]) -> bytes:
        """Write `tensor_of(name)` for each name (called in name order, each result dropped once written)
        into `path` atomically; the state's wire.state_digest."""
        names = sorted(shapes)
        header, offset = {"__metadata__": dict(metadata)}, 0
        for name in names:
            size = 4 * math.prod(shapes[name])
            header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp, h = path.with_name(path.name + ".tmp"), hashlib.sha256()
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                t = tensor_of(name).detach().to("cpu", torch.float32).contiguous()
                if tuple(t.shape) != tuple(shapes[name]):
                    raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shapes[name])}")
                wire.digest_update(h, name, t)
                fh.write(_bytes_of(t))
                del t
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return h.digest()


class StepFile(Mapping):
    """name -> C.Encoded of one version's step, held in an unnamed temporary file in `folder`: `add` writes a
    tensor's encoded pieces joined (C.join) as they are made, a read reads one tensor back. Iterates in the
    order of `names` (the model's)."""

    def __init__(self, folder: Path, names: list[str]):
        self._file = tempfile.TemporaryFile(dir=folder)   # unlinked at once: removed when closed
        self._names = names
        self._index: dict[str, tuple[C.Encoded, int, int, int]] = {}   # fields, offset, len(data), len(scales)
        self._end = 0

    def add(self, name: str, pieces: list[C.Encoded]) -> None:
        enc = C.join(pieces)
        self._file.write(enc.data)
        self._file.write(enc.scales)
        self._file.flush()
        self._index[name] = (replace(enc, data=b"", scales=b""), self._end, len(enc.data), len(enc.scales))
        self._end += len(enc.data) + len(enc.scales)

    def __getitem__(self, name: str) -> C.Encoded:
        fields, at, d, n = self._index[name]
        fd = self._file.fileno()
        return replace(fields, data=os.pread(fd, d, at), scales=os.pread(fd, n, at + d))

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._names if n in self._index)

    def __len__(self) -> int:
        return len(self._index)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The float32 bytes of `t`, without a copy (the numpy view of a contiguous tensor, flattened)."""
    return memoryview(t.contiguous().numpy().reshape(-1)).cast("B")


def _read_header(fd: int, size: int) -> tuple[dict, dict[str, tuple[int, int]], dict[str, tuple[int, ...]]]:
    """(metadata, name -> absolute byte range, name -> shape); ValueError naming what is wrong."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", head)
    if not 0 < length <= min(HEADER_LIMIT, size - 8):
        raise ValueError(f"header length {length} does not fit the file's {size} bytes")
    header = json.loads(os.pread(fd, length, 8))
    metadata = header.pop("__metadata__", None) or {}
    index, shapes, base = {}, {}, 8 + length
    for name, info in header.items():
        start, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if info["dtype"] != "F32" or end - start != 4 * math.prod(shape) or not 0 <= start <= end <= size - base:
            raise ValueError(f"tensor {name!r} is not float32 data inside the file")
        index[name], shapes[name] = (base + start, base + end), shape
    return metadata, index, shapes
