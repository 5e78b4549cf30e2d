"""State dicts <-> bounded TensorPart messages, with validation before any decoding."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb

MAX_PART_BYTES = 1 << 20          # data + scales of one TensorPart
MAX_MESSAGE_BYTES = 4 << 20       # gRPC receive limit on both ends: no message near it
MAX_NAME_LEN = 256


def state_digest(state: dict[str, torch.Tensor]) -> bytes:
    """sha256 over names, shapes and float32 bytes, in name order: identifies a set of weights."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        digest_update(h, name, state[name])
    return h.digest()


def digest_update(h, name: str, tensor: torch.Tensor) -> None:
    """Add one tensor to a state_digest hash (callers go in name order)."""
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    h.update(name.encode() + b"\0" + repr(tuple(t.shape)).encode() + b"\0")
    h.update(memoryview(t.numpy().reshape(-1)).cast("B"))


class WireError(ValueError):
    """A malformed message: maps to INVALID_ARGUMENT."""


class TooLarge(WireError):
    """An oversized message or stream: maps to RESOURCE_EXHAUSTED."""


def tensor_parts(name: str, shape: tuple[int, ...], enc: C.Encoded,
                 max_part_bytes: int = MAX_PART_BYTES) -> Iterator[pb.TensorPart]:
    for offset, part in C.split(enc, max_part_bytes):
        yield pb.TensorPart(
            name=name, shape=list(shape), codec=part.codec, block_size=part.block_size,
            offset=offset, count=part.count, data=part.data, scales=part.scales, topk=part.topk, bits=part.bits,
        )


def state_parts(state: dict[str, torch.Tensor], encode: Callable[[str, torch.Tensor], C.Encoded],
                max_part_bytes: int = MAX_PART_BYTES) -> Iterator[pb.TensorPart]:
    """Encode each tensor with `encode(name, tensor)` and cut it into parts."""
    for name, tensor in state.items():
        yield from tensor_parts(name, tuple(tensor.shape), encode(name, tensor), max_part_bytes)


def count_parts(shapes: dict[str, tuple[int, ...]], codec: int | C.CodecSpec, block_size: int | None = None,
                max_part_bytes: int = MAX_PART_BYTES) -> int:
    """How many parts state_parts() yields for tensors of these shapes (without encoding)."""
    spec = codec if isinstance(codec, C.CodecSpec) else C.CodecSpec(int(codec), block_size)
    return sum(len(part_ranges(math.prod(shape), spec, max_part_bytes)) for shape in shapes.values())


def part_ranges(count: int, spec: C.CodecSpec, max_part_bytes: int = MAX_PART_BYTES) -> list[tuple[int, int]]:
    """(offset, count) of each part C.split cuts a tensor of `count` elements encoded with `spec` into, so a
    tensor may be encoded part by part (blocks never straddle a cut)."""
    block = spec.block_size or C.DEFAULT_BLOCK_SIZE.get(spec.codec, 0)
    params = (block, spec.topk, spec.bits)
    if count == 0 or sum(C.expected_sizes(spec.codec, count, *params)) <= max_part_bytes:
        return [(0, count)]
    align = block or 1  # mirrors C.split: parts are cut at whole blocks, not at max_part_bytes
    per_part = max(1, max_part_bytes // sum(C.expected_sizes(spec.codec, align, *params))) * align
    return [(offset, min(per_part, count - offset)) for offset in range(0, count, per_part)]


class PartAssembler:
    """Rebuilds tensors from parts, checking every part against the expected spec before decoding.

    spec: name -> shape of every tensor expected; each must arrive completely,
    in order of offsets, with an allowed codec (a pb.Codec value, or a CodecSpec whose parameters a topk
    part must match exactly: a client cannot send denser parts than the run's).
    """

    def __init__(self, spec: dict[str, tuple[int, ...]], allowed_codecs: Iterable[int | C.CodecSpec],
                 keep_encoded: bool = False):
        self.spec = spec
        allowed = list(allowed_codecs)
        self.specs = {a.codec: a for a in allowed if isinstance(a, C.CodecSpec)}
        self.allowed = {a.codec if isinstance(a, C.CodecSpec) else int(a) for a in allowed}
        self.keep_encoded = keep_encoded   # hold parts as they came (int8: 1/4 of fp32), decode in finish()'s mapping
        self.buffers: dict[str, torch.Tensor] = {}
        self.encoded: dict[str, list[C.Encoded]] = {}
        self.filled: dict[str, int] = {}

    def add(self, part: pb.TensorPart) -> None:
        if len(part.name) > MAX_NAME_LEN or part.name not in self.spec:
            raise WireError(f"unknown tensor name {part.name[:64]!r}: not in the run's model")
        shape = self.spec[part.name]
        if tuple(part.shape) != tuple(shape):
            raise WireError(f"{part.name}: shape {tuple(part.shape)} != model's {tuple(shape)}")
        if part.codec not in self.allowed:
            raise WireError(f"{part.name}: codec {part.codec} not allowed in this run "
                            f"(allowed: {sorted(self.allowed)})")
        if part.codec == C.CODEC_NAMES["topk"]:
            wrong = self.specs[part.codec].expect(part.codec, part.block_size, part.topk, part.bits) \
                if part.codec in self.specs else "topk parts need the run's topk parameters"
            if wrong:
                raise WireError(f"{part.name}: {wrong}")
        numel = math.prod(shape)
        expected_offset = self.filled.get(part.name, 0)
        if part.offset != expected_offset:
            raise WireError(f"{part.name}: part at offset {part.offset}, expected {expected_offset}")
        if part.block_size and part.offset % part.block_size:
            raise WireError(f"{part.name}: part at offset {part.offset}, not a multiple of its block_size "
                            f"{part.block_size}")
        if part.count == 0 or part.offset + part.count > numel:
            raise WireError(f"{part.name}: part [{part.offset}, {part.offset + part.count}) "
                            f"outside the tensor's {numel} elements")
        enc = C.Encoded(codec=part.codec, count=part.count, block_size=part.block_size,
                        data=part.data, scales=part.scales, topk=part.topk, bits=part.bits)
        try:
            values = C.decode(enc)  # validates sizes and codec params first, then finiteness
        except C.CodecError as err:
            raise WireError(f"{part.name}: {err}") from err
        if self.keep_encoded:
            self.encoded.setdefault(part.name, []).append(enc)
        else:
            buf = self.buffers.get(part.name)
            if buf is None:
                buf = self.buffers[part.name] = torch.empty(numel, dtype=torch.float32)
            buf[part.offset:part.offset + part.count] = values
        self.filled[part.name] = part.offset + part.count

    def complete(self) -> bool:
        return all(self.filled.get(n, 0) == math.prod(s) for n, s in self.spec.items())

    def finish(self) -> dict[str, torch.Tensor]:
        missing = [n for n, s in self.spec.items() if self.filled.get(n, 0) != math.prod(s)]
        if missing:
            raise WireError(f"stream ended with {len(missing)} incomplete tensors, e.g. {missing[:3]}")
        if self.keep_encoded:
            return DecodeOnRead(self.spec, self.encoded)
        return {n: self.buffers[n].view(self.spec[n]) for n in self.spec}


class DecodeOnRead(Mapping):
    """Tensors kept as their validated encoded parts; each read decodes a fresh float32 tensor."""

    def __init__(self, spec: dict[str, tuple[int, ...]], encoded: dict[str, list[C.Encoded]]):
        self.spec, self.encoded = spec, encoded

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = self.encoded[name]
        flat = C.decode(parts[0]) if len(parts) == 1 else torch.cat([C.decode(p) for p in parts])
        return flat.view(self.spec[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.spec)

    def __len__(self) -> int:
        return len(self.spec)
