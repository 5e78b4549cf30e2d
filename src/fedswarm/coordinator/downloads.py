"""Model downloads as codec-encoded deltas from the version a client already holds.

Every committed version v of the global model G_v has one *as-served* state
S_v: what a client holding v has, bit for bit, however it got there:

    S_v = S_{v-1} + decode(encode(G_v - S_{v-1}))        (S at a chain start = G)

The delta is taken from S_{v-1}, what the clients actually hold, not from
G_{v-1}: whatever quantization dropped from one delta is in the next one
(error feedback on the server side), so S never drifts from G by more than
one delta's quantization error. A full copy is S_v in float32, so a client
that joins late holds the same bits as one that followed every delta.
Clients train from S_v; their uploaded deltas are applied to G_v.

Only the newest version's state is held, with the digests and encoded steps
of the last `keep` versions (a step is the codec's fraction of the model); a
client whose version was evicted, or whose digest does not match, gets a
full copy.
With `persist`, the newest state lives in that file alone (served_file.py):
written as it is computed, read back a tensor at a time, so the coordinator
holds no second copy of the model for it, and a restarted coordinator serves
the same S (and accepts uploads trained from it); the encoded steps live in
temporary files beside it. A step is encoded and applied a piece (whole codec
blocks) at a time, in place: the same bytes as encoding the tensor whole.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedswarm.coordinator.served_file import ServedFile, StepFile
from fedswarm.errors import why
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire

log = logging.getLogger(__name__)
DEFAULT_KEEP_VERSIONS = 8
PIECE = 1 << 20   # values of a tensor encoded (and applied) at a time, rounded down to whole codec blocks


@dataclass
class Served:
    version: int
    state: Mapping[str, torch.Tensor] | None  # S_version, float32 CPU: a dict or its file (None once a newer exists)
    shapes: dict[str, tuple[int, ...]]
    digest: bytes                            # wire.state_digest(state)
    step: Mapping[str, C.Encoded] | None     # encode(G_version - S_{version-1}); None at a chain start
    step_bytes: int                          # encoded size of `step` (data + scales)


class ServedVersions:
    """The newest as-served state, and the digests and encoded steps of the last few versions; thread-safe."""

    def __init__(self, codec: int | C.CodecSpec, block_size: int | None = None, keep: int = DEFAULT_KEEP_VERSIONS,
                 persist: Path | None = None):
        if keep < 1:
            raise ValueError("keep must be >= 1 version")
        self.spec = codec if isinstance(codec, C.CodecSpec) else C.CodecSpec(int(codec), block_size or None)
        self.codec, self.keep, self.persist = self.spec.codec, keep, persist
        block = self.spec.encode(torch.zeros(0)).block_size
        self.piece = max(1, PIECE // block) * block if block else PIECE   # whole blocks: encoding is blockwise
        self._lock = threading.Lock()
        self._versions: OrderedDict[int, Served] = OrderedDict()
        if persist is not None and persist.is_file():
            self._load(persist)

    @property
    def deltas(self) -> bool:
        """False for codec none: a float32 delta is as large as a full copy, so everyone gets G itself."""
        return self.codec != C.CODEC_NAMES["none"]

    def served(self, version: int, global_state: dict[str, torch.Tensor]) -> Served:
        """S_version (computed from G_version the first time it is asked for)."""
        with self._lock:
            have = self._versions.get(version)
            if have is not None and have.shapes == _shapes(global_state):
                if have.state is None:
                    raise RuntimeError(f"model version {version} is older than the newest served one")
                return have
            prev = self._versions.get(version - 1)
            if not self.deltas or prev is None or prev.state is None or prev.shapes != _shapes(global_state):
                entry = self._chain_start(version, global_state)
            else:
                entry = self._next(version, global_state, prev)
            for older in self._versions.values():
                older.state = None   # only the newest is served in full or built on
            self._versions[version] = entry
            self._versions.move_to_end(version)
            while len(self._versions) > self.keep:
                self._versions.popitem(last=False)
            self._drop_unservable_steps()
            return entry

    def _chain_start(self, version: int, global_state: dict[str, torch.Tensor]) -> Served:
        """S = G, as float32 (a copy: G's tensors are the strategy's)."""
        state, digest = self._store(version, global_state, lambda n: global_state[n].detach().to("cpu", torch.float32))
        return Served(version, state, _shapes(global_state), digest, None, 0)

    def _next(self, version: int, global_state: dict[str, torch.Tensor], prev: Served) -> Served:
        """S_version = S_prev + decode(encode(G_version - S_prev)), tensor by tensor and a piece at a time: a
        tensor read from the file is built on in place; S_prev's tensors in memory are freed as soon as each has
        been built on (a full copy streaming it holds its own, model_chunks). The steps go to a StepFile when
        the state is persisted."""
        held, prev.state = prev.state, None
        if isinstance(held, dict):
            held = dict(held)
        names = list(global_state)
        step = StepFile(self.persist.parent, names) if self.persist is not None else MemorySteps()
        size = 0

        def built(name: str) -> torch.Tensor:
            nonlocal size
            if isinstance(held, dict):   # its tensors may be streaming: build a copy
                out = held.pop(name).clone(memory_format=torch.contiguous_format)
            else:
                out = held[name]          # a fresh tensor, read from the file
            flat, target = out.view(-1), global_state[name].detach().to("cpu", torch.float32).reshape(-1)
            pieces = []
            for start in range(0, max(flat.numel(), 1), self.piece):
                part = flat[start:start + self.piece]
                enc = self.spec.encode(target[start:start + self.piece] - part)
                part.add_(C.decode(enc))   # exactly what the client computes
                pieces.append(enc)
            step.add(name, pieces)
            size += sum(len(e.data) + len(e.scales) for e in pieces)
            return out

        state, digest = self._store(version, global_state, built)
        return Served(version, state, _shapes(global_state), digest, step, size)

    def _store(self, version: int, global_state: dict[str, torch.Tensor], tensor_of) -> tuple[Mapping, bytes]:
        """The state made of `tensor_of(name)` for each of the model's names, and its digest. Persisted, it
        lives in the file alone (written as each tensor is made, read back one tensor per read): the coordinator
        then holds no second copy of the model for it. In memory otherwise."""
        if self.persist is None:
            state = {n: tensor_of(n).clone() for n in global_state}
            return state, wire.state_digest(state)
        digest = ServedFile.write(self.persist, _shapes(global_state), tensor_of,
                                  {"version": str(version), "codec": C.codec_name(self.codec)})
        return ServedFile(self.persist), digest

    def _drop_unservable_steps(self) -> None:
        """Keep a version's step only while the steps from it to the newest are smaller than a full copy: a
        client further behind gets a full copy anyway (chain), so older steps would only hold memory (eight
        int8 steps held twice the model's fp32 size)."""
        newest = next(reversed(self._versions.values()))
        full, behind = 4 * sum(math.prod(shape) for shape in newest.shapes.values()), 0
        for entry in reversed(self._versions.values()):
            if entry.step is None:
                continue
            behind += entry.step_bytes
            if behind >= full:
                entry.step = None

    def forget_newer(self, version: int) -> int:
        """Drop the versions after `version` (served before a crash, never committed: the re-run makes them
        again from other weights); how many were dropped. Their clients get a full copy next time."""
        with self._lock:
            newer = [v for v in self._versions if v > version]
            for v in newer:
                del self._versions[v]
            return len(newer)

    def digest(self, version: int) -> bytes | None:
        with self._lock:
            entry = self._versions.get(version)
            return entry.digest if entry is not None else None

    def chain(self, version: int, held_version: int, held_digest: bytes) -> list[Served] | None:
        """The steps that take a client from held_version (with that digest) to `version` ([] when it holds
        that version already, e.g. the initial model it built from the run's seed), or None when it needs a
        full copy: unknown or evicted version, wrong digest, or steps larger than a copy."""
        with self._lock:
            held = self._versions.get(held_version)
            if held is None or held.digest != held_digest or held_version > version:
                return None
            if held_version == version:
                return []
            if not self.deltas:
                return None
            steps = [self._versions.get(v) for v in range(held_version + 1, version + 1)]
            if any(s is None or s.step is None for s in steps):
                return None
            full = 4 * sum(math.prod(shape) for shape in steps[-1].shapes.values())
            return steps if sum(s.step_bytes for s in steps) < full else None

    def _load(self, path: Path) -> None:
        """The newest served state a previous coordinator persisted; a cache that does not load is dropped
        (logged): the next download is then served as a full copy and the cache is written again."""
        try:
            state = ServedFile(path)
            meta = state.metadata
            if meta.get("codec") != C.codec_name(self.codec) or "version" not in meta:
                return  # another codec's chain: start a new one
            version, digest = int(meta["version"]), state.digest()
        except (OSError, ValueError, KeyError, TypeError) as err:   # truncated or garbled
            log.warning("dropping the download cache %s, which does not load (%s); it is rebuilt", path, why(err))
            path.unlink(missing_ok=True)
            return
        self._versions[version] = Served(version, state, state.shapes, digest, None, 0)


class MemorySteps(dict):
    """name -> C.Encoded of a step held in memory (no persisted state): each tensor's pieces joined."""

    def add(self, name: str, pieces: list[C.Encoded]) -> None:
        self[name] = C.join(pieces)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in state.items()}


def full_copy(name: str, tensor: torch.Tensor) -> C.Encoded:
    return C.encode(tensor.flatten(), C.CODEC_NAMES["none"])


def model_chunks(served: Served, steps: list[Served] | None, max_part_bytes: int) -> Iterator[pb.ModelChunk]:
    """A FetchModel stream: `steps` (encoded deltas, in order), or a float32 copy of `served` when None.
    The first chunk of each version carries the digest of the weights it reconstructs. A full copy takes its
    own reference to each tensor now, so the next version may replace the state while it streams."""
    if steps is None:
        state = served.state
        if state is None:
            raise RuntimeError(f"model version {served.version} is older than the newest served one")
        # a file-backed state is read a tensor at a time from the version it opened; a dict is copied (its
        # tensors, not their data) so the next version may replace it while this streams
        own = state if isinstance(state, ServedFile) else dict(state)
        return _versioned(wire.state_parts(own, full_copy, max_part_bytes), served, delta=False)
    return _steps(steps, max_part_bytes)


def _steps(steps: list[Served], max_part_bytes: int) -> Iterator[pb.ModelChunk]:
    for step in steps:
        parts = (p for name, enc in step.step.items()
                 for p in wire.tensor_parts(name, step.shapes[name], enc, max_part_bytes))
        yield from _versioned(parts, step, delta=True)


def _versioned(parts: Iterator[pb.TensorPart], served: Served, delta: bool) -> Iterator[pb.ModelChunk]:
    for i, part in enumerate(parts):
        yield pb.ModelChunk(part=part, version=served.version, delta=delta, digest=served.digest if i == 0 else b"")
