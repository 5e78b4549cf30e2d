"""Tensor codecs for model-update deltas: float32, fp16, bf16, blockwise int8 / int4.

Modelled on hivemind's compression/serialization.py: one codec object per
``pb.Codec`` value in a registry that is checked complete at import. All byte
layouts are little-endian; int8/int4 carry one float32 absmax scale per block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedswarm.proto import fedswarm_pb2 as pb

__all__ = [
    "CodecError", "Encoded", "CODEC_NAMES", "DEFAULT_BLOCK_SIZE", "MIN_BLOCK_SIZE", "MAX_BLOCK_SIZE",
    "codec_by_name", "codec_name", "expected_sizes", "validate", "encode", "decode", "split",
    "ErrorFeedback",
]

MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 256
# int8: (1 + 4/256) / 4 = 0.254x of fp32; int4: (0.5 + 4/128) / 4 = 0.133x of fp32.
DEFAULT_BLOCK_SIZE: dict[int, int] = {pb.CODEC_INT8: 256, pb.CODEC_INT4: 128}
CODEC_NAMES: dict[str, int] = {
    "none": pb.CODEC_NONE, "fp16": pb.CODEC_FP16, "bf16": pb.CODEC_BF16,
    "int8": pb.CODEC_INT8, "int4": pb.CODEC_INT4,
}
_NAME_OF = {v: k for k, v in CODEC_NAMES.items()}


class CodecError(ValueError):
    """Malformed encoded data or an input that cannot be encoded."""


@dataclass(frozen=True)
class Encoded:
    """One encoded flat tensor, as it travels in the proto."""
    codec: int  # pb.Codec value
    count: int  # number of float elements encoded
    block_size: int  # 0 for none/fp16/bf16
    data: bytes
    scales: bytes  # float32 LE, one per block; b"" for none/fp16/bf16


def _f32_bytes(x: torch.Tensor) -> bytes:
    return x.numpy().astype("<f4", copy=False).tobytes()


def _f32_tensor(buf: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype="<f4").astype(np.float32))


def _u8_tensor(buf: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())


def _blocks(x: torch.Tensor, bs: int) -> torch.Tensor:
    """(n,) -> (ceil(n/bs), bs), zero-padded at the end."""
    pad = -x.numel() % bs
    return torch.cat([x, x.new_zeros(pad)]).view(-1, bs)


class _Float32Codec:
    blocked = False

    def sizes(self, count: int, bs: int) -> tuple[int, int]:
        return 4 * count, 0

    def encode(self, x: torch.Tensor, bs: int) -> tuple[bytes, bytes]:
        return _f32_bytes(x), b""

    def decode(self, data: bytes, scales: bytes, count: int, bs: int) -> torch.Tensor:
        return _f32_tensor(data)


class _HalfCodec:
    blocked = False

    def __init__(self, dtype: torch.dtype, name: str):
        self.dtype, self.name = dtype, name

    def sizes(self, count: int, bs: int) -> tuple[int, int]:
        return 2 * count, 0

    def encode(self, x: torch.Tensor, bs: int) -> tuple[bytes, bytes]:
        h = x.to(self.dtype)  # (n,) half
        if not bool(torch.isfinite(h).all()):
            big = x.abs().max().item()
            raise CodecError(f"{self.name} overflow: |x| up to {big:.3g} exceeds the {self.name} range "
                             f"(max {torch.finfo(self.dtype).max:.3g}); use another codec")
        return h.view(torch.int16).numpy().astype("<i2", copy=False).tobytes(), b""

    def decode(self, data: bytes, scales: bytes, count: int, bs: int) -> torch.Tensor:
        bits = torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.int16))  # (n,) int16
        return bits.view(self.dtype).float()


class _Int8Codec:
    blocked = True
    levels = 127

    def sizes(self, count: int, bs: int) -> tuple[int, int]:
        return count, 4 * (-(-count // bs))

    def _quantize(self, x: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) float32 -> q (n,) int in [-L, L], scale (nb,) float32 absmax."""
        xb = _blocks(x, bs)  # (nb, bs)
        scale = xb.abs().amax(dim=1)  # (nb,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]  # (nb, 1)
        q = torch.round(xb / safe * self.levels).clamp_(-self.levels, self.levels)  # (nb, bs)
        return q.flatten()[: x.numel()].to(torch.int8), scale

    def _dequantize(self, q: torch.Tensor, scales: bytes, count: int, bs: int) -> torch.Tensor:
        scale = _f32_tensor(scales)[:, None]  # (nb, 1)
        xb = _blocks(q.float(), bs) / self.levels * scale  # (nb, bs)
        return xb.flatten()[:count]

    def encode(self, x: torch.Tensor, bs: int) -> tuple[bytes, bytes]:
        q, scale = self._quantize(x, bs)
        return q.numpy().tobytes(), _f32_bytes(scale)

    def decode(self, data: bytes, scales: bytes, count: int, bs: int) -> torch.Tensor:
        q = _u8_tensor(data).view(torch.int8)  # (n,)
        return self._dequantize(q, scales, count, bs)


class _Int4Codec(_Int8Codec):
    levels = 7

    def sizes(self, count: int, bs: int) -> tuple[int, int]:
        return (count + 1) // 2, 4 * (-(-count // bs))

    def encode(self, x: torch.Tensor, bs: int) -> tuple[bytes, bytes]:
        q, scale = self._quantize(x, bs)
        nib = (q.to(torch.int16) + 8).to(torch.uint8)  # (n,) in 1..15
        nib = torch.cat([nib, nib.new_zeros(nib.numel() % 2)]).view(-1, 2)  # (ceil(n/2), 2)
        packed = nib[:, 0] | (nib[:, 1] << 4)  # even index in the low nibble
        return packed.numpy().tobytes(), _f32_bytes(scale)

    def decode(self, data: bytes, scales: bytes, count: int, bs: int) -> torch.Tensor:
        b = _u8_tensor(data)  # (ceil(n/2),)
        nib = torch.stack([b & 0x0F, b >> 4], dim=1).flatten()[:count]  # (n,)
        return self._dequantize(nib.to(torch.int16) - 8, scales, count, bs)


_REGISTRY: dict[int, object] = {
    pb.CODEC_NONE: _Float32Codec(),
    pb.CODEC_FP16: _HalfCodec(torch.float16, "fp16"),
    pb.CODEC_BF16: _HalfCodec(torch.bfloat16, "bf16"),
    pb.CODEC_INT8: _Int8Codec(),
    pb.CODEC_INT4: _Int4Codec(),
}
_ALL = set(pb.Codec.values())
_missing = sorted((_ALL - set(_REGISTRY)) | (_ALL - set(_NAME_OF)))
if _missing or set(_REGISTRY) - _ALL:
    raise RuntimeError("fedswarm.proto.codec: registry out of sync with pb.Codec; missing "
                       f"{[pb.Codec.Name(c) for c in _missing]}, unknown {sorted(set(_REGISTRY) - _ALL)}")


def _codec(codec: int):
    try:
        return _REGISTRY[int(codec)]
    except (KeyError, TypeError, ValueError):
        raise CodecError(f"unknown codec {codec!r}; expected one of {sorted(_REGISTRY)} "
                         f"({', '.join(CODEC_NAMES)})") from None


def codec_by_name(name: str) -> int:
    """'int8' -> pb.CODEC_INT8."""
    try:
        return CODEC_NAMES[str(name).lower()]
    except KeyError:
        raise CodecError(f"unknown codec name {name!r}; valid names: {', '.join(CODEC_NAMES)}") from None


def codec_name(codec: int) -> str:
    """pb.CODEC_INT8 -> 'int8'."""
    _codec(codec)
    return _NAME_OF[int(codec)]


def _check_block_size(codec: int, bs: int) -> None:
    name = codec_name(codec)
    if not _REGISTRY[codec].blocked:
        if bs != 0:
            raise CodecError(f"{name}: block_size must be 0, got {bs}")
        return
    if not isinstance(bs, int) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise CodecError(f"{name}: block_size must be an int in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {bs!r}")
    if codec == pb.CODEC_INT4 and bs % 2:
        raise CodecError(f"int4: block_size must be even, got {bs}")


def expected_sizes(codec: int, count: int, block_size: int) -> tuple[int, int]:
    """(len(data), len(scales)) of a valid Encoded with these parameters."""
    c = _codec(codec)
    _check_block_size(int(codec), block_size)
    if not isinstance(count, int) or count < 0:
        raise CodecError(f"count must be an int >= 0, got {count!r}")
    return c.sizes(count, block_size)


def validate(enc: Encoded) -> None:
    """Check structure (codec, block size, lengths, scales); does not decode the data."""
    dlen, slen = expected_sizes(enc.codec, enc.count, enc.block_size)
    name = codec_name(enc.codec)
    if len(enc.data) != dlen:
        raise CodecError(f"{name}: data is {len(enc.data)} bytes, expected {dlen} for count={enc.count} "
                         f"block_size={enc.block_size}")
    if len(enc.scales) != slen:
        raise CodecError(f"{name}: scales is {len(enc.scales)} bytes, expected {slen} "
                         f"({slen // 4} float32 scales) for count={enc.count} block_size={enc.block_size}")
    if slen:
        s = np.frombuffer(enc.scales, dtype="<f4")  # (nb,)
        if not np.isfinite(s).all() or (s < 0).any():
            raise CodecError(f"{name}: scales must be finite and >= 0; got NaN/Inf or negative values")


def encode(flat: torch.Tensor, codec: int, block_size: int | None = None) -> Encoded:
    """Encode a 1-D float tensor; block_size defaults per codec and is ignored for none/fp16/bf16."""
    c = _codec(codec)
    codec = int(codec)
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or not flat.is_floating_point():
        raise CodecError(f"encode expects a 1-D float tensor, got {getattr(flat, 'shape', type(flat))} "
                         f"{getattr(flat, 'dtype', '')}")
    bs = (DEFAULT_BLOCK_SIZE[codec] if block_size is None else block_size) if c.blocked else 0
    _check_block_size(codec, bs)
    x = flat.detach().to(device="cpu", dtype=torch.float32).contiguous()  # (n,)
    if not bool(torch.isfinite(x).all()):
        raise CodecError("input contains NaN/Inf, which cannot be encoded")
    data, scales = c.encode(x, bs)
    return Encoded(codec=codec, count=x.numel(), block_size=bs, data=data, scales=scales)


def decode(enc: Encoded) -> torch.Tensor:
    """validate(), then return the (count,) float32 CPU tensor; raises CodecError on non-finite output."""
    validate(enc)
    out = _REGISTRY[enc.codec].decode(bytes(enc.data), bytes(enc.scales), enc.count, enc.block_size)
    if not bool(torch.isfinite(out).all()):
        raise CodecError(f"{codec_name(enc.codec)}: decoded tensor contains NaN/Inf")
    return out


def split(enc: Encoded, max_part_bytes: int) -> list[tuple[int, Encoded]]:
    """Cut enc at block boundaries into (element_offset, part) pairs of <= ~max_part_bytes each."""
    validate(enc)
    if max_part_bytes <= 0:
        raise CodecError(f"max_part_bytes must be > 0, got {max_part_bytes}")
    if len(enc.data) + len(enc.scales) <= max_part_bytes or enc.count == 0:
        return [(0, enc)]
    align = enc.block_size or 1  # elements per indivisible unit (blocks are even for int4)
    unit_bytes = sum(expected_sizes(enc.codec, align, enc.block_size))
    chunk = max(1, max_part_bytes // unit_bytes) * align  # elements per part (at least one unit)
    parts = []
    for off in range(0, enc.count, chunk):  # loop over parts, not elements
        n = min(chunk, enc.count - off)
        d0, s0 = expected_sizes(enc.codec, off, enc.block_size)  # byte offsets of an aligned start
        dn, sn = expected_sizes(enc.codec, n, enc.block_size)
        parts.append((off, Encoded(enc.codec, n, enc.block_size, enc.data[d0:d0 + dn], enc.scales[s0:s0 + sn])))
    return parts


class ErrorFeedback:
    """Per-tensor residual so what quantization drops this round is sent next round."""

    def __init__(self, codec: int, block_size: int | None = None):
        _codec(codec)
        self.codec, self.block_size = int(codec), block_size
        self.residuals: dict[str, torch.Tensor] = {}  # name -> float32 CPU tensor shaped like the delta

    def compress(self, name: str, delta: torch.Tensor) -> tuple[Encoded, torch.Tensor]:
        """Encode delta + residual; returns (enc, decoded float32 CPU tensor shaped like delta)."""
        target = delta.detach().to(device="cpu", dtype=torch.float32)
        prev = self.residuals.get(name)
        if prev is not None and prev.shape == target.shape:
            target = target + prev
        enc = encode(target.flatten(), self.codec, self.block_size)
        decoded = decode(enc).reshape(delta.shape)
        if self.codec == pb.CODEC_NONE:
            self.residuals[name] = torch.zeros_like(target)
        else:
            self.residuals[name] = target - decoded
        return enc, decoded

    def reset(self) -> None:
        """Drop all residuals."""
        self.residuals.clear()
