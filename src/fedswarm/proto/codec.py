"""Tensor codecs for model-update deltas: float32, fp16, bf16, blockwise int8 / int4 / int2 / int2z / sign, sparse topk.

Modelled on hivemind's compression/serialization.py: one codec object per
``pb.Codec`` value in a registry that is checked complete at import. All byte
layouts are little-endian; int8/int4 carry one float32 absmax scale per block, int2/sign
(proto/lowbit.py) one per block of up to 65,536 values; topk (proto/topk.py) one float32
scale per chunk of its kept values. int2z (proto/int2z.py) is int2 with its magnitude bits deflated: the
one codec whose data varies in length (up to expected_sizes()); split and join re-deflate its pieces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import int2z as Z
from fedswarm.proto import lowbit as LB
from fedswarm.proto import topk as T

__all__ = [
    "CodecError", "Encoded", "CODEC_NAMES", "DEFAULT_BLOCK_SIZE", "MIN_BLOCK_SIZE", "MAX_BLOCK_SIZE",
    "codec_by_name", "codec_name", "expected_sizes", "variable_length", "validate", "encode", "decode", "split",
    "join", "ErrorFeedback", "CodecSpec", "masked_encoded", "masked_values",
]

MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 256
# int8: (1 + 4/256) / 4 = 0.254x of fp32; int4: (0.5 + 4/128) / 4 = 0.133x; int2: (0.25 + 4/1024) / 4 =
# 0.0635x; sign: (0.125 + 4/1024) / 4 = 0.0322x (31x smaller); int2z: int2's blocks.
DEFAULT_BLOCK_SIZE: dict[int, int] = {pb.CODEC_INT8: 256, pb.CODEC_INT4: 128, pb.CODEC_INT2: 1024,
                                      pb.CODEC_SIGN: 1024, pb.CODEC_INT2Z: 1024}
CODEC_NAMES: dict[str, int] = {
    "none": pb.CODEC_NONE, "fp16": pb.CODEC_FP16, "bf16": pb.CODEC_BF16,
    "int8": pb.CODEC_INT8, "int4": pb.CODEC_INT4, "topk": pb.CODEC_TOPK, "int2": pb.CODEC_INT2,
    "sign": pb.CODEC_SIGN, "masked": pb.CODEC_MASKED, "int2z": pb.CODEC_INT2Z,
}
_NAME_OF = {v: k for k, v in CODEC_NAMES.items()}


class CodecError(ValueError):
    """Malformed encoded data or an input that cannot be encoded."""


@dataclass(frozen=True)
class Encoded:
    """One encoded flat tensor, as it travels in the proto."""
    codec: int  # pb.Codec value
    count: int  # number of float elements encoded
    block_size: int  # 0 for none/fp16/bf16; topk: values per chunk
    data: bytes
    scales: bytes  # float32 LE, one per block (chunk); b"" for none/fp16/bf16
    topk: int = 0  # topk only: values kept per chunk
    bits: int = 0  # topk only: bits per kept value


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

    def sizes(self, count: int, bs: int, *_) -> tuple[int, int]:
        return 4 * count, 0

    def encode(self, x: torch.Tensor, bs: int, *_) -> tuple[bytes, bytes]:
        return _f32_bytes(x), b""

    def decode(self, data: bytes, scales: bytes, count: int, bs: int, *_) -> torch.Tensor:
        return _f32_tensor(data)


class _HalfCodec:
    blocked = False

    def __init__(self, dtype: torch.dtype, name: str):
        self.dtype, self.name = dtype, name

    def sizes(self, count: int, bs: int, *_) -> tuple[int, int]:
        return 2 * count, 0

    def encode(self, x: torch.Tensor, bs: int, *_) -> tuple[bytes, bytes]:
        h = x.to(self.dtype)  # (n,) half
        if not bool(torch.isfinite(h).all()):
            big = x.abs().max().item()
            raise CodecError(f"{self.name} overflow: |x| up to {big:.3g} exceeds the {self.name} range "
                             f"(max {torch.finfo(self.dtype).max:.3g}); use another codec")
        return h.view(torch.int16).numpy().astype("<i2", copy=False).tobytes(), b""

    def decode(self, data: bytes, scales: bytes, count: int, bs: int, *_) -> torch.Tensor:
        bits = torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.int16))  # (n,) int16
        return bits.view(self.dtype).float()


class _Int8Codec:
    blocked = True
    levels = 127

    def sizes(self, count: int, bs: int, *_) -> tuple[int, int]:
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

    def encode(self, x: torch.Tensor, bs: int, *_) -> tuple[bytes, bytes]:
        q, scale = self._quantize(x, bs)
        return q.numpy().tobytes(), _f32_bytes(scale)

    def decode(self, data: bytes, scales: bytes, count: int, bs: int, *_) -> torch.Tensor:
        q = _u8_tensor(data).view(torch.int8)  # (n,)
        return self._dequantize(q, scales, count, bs)


class _Int4Codec(_Int8Codec):
    levels = 7

    def sizes(self, count: int, bs: int, *_) -> tuple[int, int]:
        return (count + 1) // 2, 4 * (-(-count // bs))

    def encode(self, x: torch.Tensor, bs: int, *_) -> tuple[bytes, bytes]:
        q, scale = self._quantize(x, bs)
        nib = (q.to(torch.int16) + 8).to(torch.uint8)  # (n,) in 1..15
        nib = torch.cat([nib, nib.new_zeros(nib.numel() % 2)]).view(-1, 2)  # (ceil(n/2), 2)
        packed = nib[:, 0] | (nib[:, 1] << 4)  # even index in the low nibble
        return packed.numpy().tobytes(), _f32_bytes(scale)

    def decode(self, data: bytes, scales: bytes, count: int, bs: int, *_) -> torch.Tensor:
        b = _u8_tensor(data)  # (ceil(n/2),)
        nib = torch.stack([b & 0x0F, b >> 4], dim=1).flatten()[:count]  # (n,)
        return self._dequantize(nib.to(torch.int16) - 8, scales, count, bs)


class _TopkCodec:
    blocked = True

    def sizes(self, count: int, bs: int, topk: int, bits: int) -> tuple[int, int]:
        return T.sizes(count, bs, topk, bits)

    def encode(self, x: torch.Tensor, bs: int, topk: int, bits: int) -> tuple[bytes, bytes]:
        return T.encode(x, bs, topk, bits)

    def decode(self, data: bytes, scales: bytes, count: int, bs: int, topk: int, bits: int) -> torch.Tensor:
        out = T.decode(data, scales, count, bs, topk, bits)
        if isinstance(out, str):
            raise CodecError(f"topk: {out}")
        return out


class _LowBitCodec:
    """int2 / sign: every value a `bits`-bit level of its block's scale (proto/lowbit.py); int2z (proto/int2z.py):
    int2's, of variable length, cut and joined by its module."""
    blocked = True

    def __init__(self, name: str, impl=LB):
        self.name, self.impl, self.bits = name, impl, impl.BITS[name]
        self.variable = impl is Z

    def sizes(self, count: int, bs: int, *_) -> tuple[int, int]:
        return self.impl.sizes(count, bs, self.bits)

    def encode(self, x: torch.Tensor, bs: int, *_) -> tuple[bytes, bytes]:
        return self.impl.encode(x, bs, self.bits)

    def decode(self, data: bytes, scales: bytes, count: int, bs: int, *_) -> torch.Tensor:
        return self._checked(self.impl.decode(data, scales, count, bs, self.bits))

    def cut(self, enc: Encoded, pieces: list[tuple[int, int]]) -> list[bytes]:
        return self._checked(self.impl.cut(bytes(enc.data), enc.count, pieces))

    def join(self, pieces: list[Encoded]) -> bytes:
        return self._checked(self.impl.join([bytes(p.data) for p in pieces], [p.count for p in pieces]))

    def _checked(self, out):
        if isinstance(out, str):
            raise CodecError(f"{self.name}: {out}")
        return out


class _MaskedCodec:
    """--secure-aggregation's masked vectors (fedswarm/secagg.py): uint32 LE values mod 2^32, exact in float64.
    Not a codec of floats: clients build its parts with `masked_encoded`, never `encode`."""
    blocked = False

    def sizes(self, count: int, bs: int, *_) -> tuple[int, int]:
        return 4 * count, 0

    def encode(self, x: torch.Tensor, bs: int, *_) -> tuple[bytes, bytes]:
        raise CodecError("masked: a masked vector is made by fedswarm.secagg and sent with masked_encoded()")

    def decode(self, data: bytes, scales: bytes, count: int, bs: int, *_) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(data, dtype="<u4").astype(np.float64))


def masked_encoded(values: np.ndarray) -> Encoded:
    """A masked vector's flat uint32 values as an Encoded of the masked codec."""
    flat = np.ascontiguousarray(values, dtype="<u4").ravel()
    return Encoded(codec=pb.CODEC_MASKED, count=flat.size, block_size=0, data=flat.tobytes(), scales=b"")


def masked_values(parts: list[Encoded]) -> np.ndarray:
    """The flat uint32 values of one tensor's masked parts, in order (each already validated)."""
    if any(p.codec != pb.CODEC_MASKED for p in parts):
        raise CodecError("masked: every part of a masked vector must use the masked codec")
    return np.concatenate([np.frombuffer(bytes(p.data), dtype="<u4") for p in parts]).astype(np.uint32)


_REGISTRY: dict[int, object] = {
    pb.CODEC_NONE: _Float32Codec(),
    pb.CODEC_FP16: _HalfCodec(torch.float16, "fp16"),
    pb.CODEC_BF16: _HalfCodec(torch.bfloat16, "bf16"),
    pb.CODEC_INT8: _Int8Codec(),
    pb.CODEC_INT4: _Int4Codec(),
    pb.CODEC_TOPK: _TopkCodec(),
    pb.CODEC_INT2: _LowBitCodec("int2"),
    pb.CODEC_SIGN: _LowBitCodec("sign"),
    pb.CODEC_MASKED: _MaskedCodec(),
    pb.CODEC_INT2Z: _LowBitCodec("int2z", Z),
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


def _check_params(codec: int, bs: int, topk: int = 0, bits: int = 0) -> None:
    name = codec_name(codec)
    if codec == pb.CODEC_TOPK:
        why = T.check_params(bs, topk, bits)
        if why:
            raise CodecError(f"topk: {why}")
        return
    if topk or bits:
        raise CodecError(f"{name}: topk and bits must be 0 (they are the topk codec's), got {topk}, {bits}")
    if not _REGISTRY[codec].blocked:
        if bs != 0:
            raise CodecError(f"{name}: block_size must be 0, got {bs}")
        return
    if isinstance(_REGISTRY[codec], _LowBitCodec):
        if why := LB.check_block(bs):
            raise CodecError(f"{name}: {why}")
        return
    if not isinstance(bs, int) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise CodecError(f"{name}: block_size must be an int in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {bs!r}")
    if codec == pb.CODEC_INT4 and bs % 2:
        raise CodecError(f"int4: block_size must be even, got {bs}")


def expected_sizes(codec: int, count: int, block_size: int, topk: int = 0, bits: int = 0) -> tuple[int, int]:
    """(len(data), len(scales)) of a valid Encoded with these parameters."""
    c = _codec(codec)
    _check_params(int(codec), block_size, topk, bits)
    if not isinstance(count, int) or count < 0:
        raise CodecError(f"count must be an int >= 0, got {count!r}")
    return c.sizes(count, block_size, topk, bits)


def variable_length(codec: int) -> bool:
    """Whether the codec's data varies in length (int2z), up to expected_sizes()."""
    return getattr(_REGISTRY[int(codec)], "variable", False)


def validate(enc: Encoded) -> None:
    """Check structure (codec, its parameters, lengths, scales); does not decode the data."""
    dlen, slen = expected_sizes(enc.codec, enc.count, enc.block_size, enc.topk, enc.bits)
    name = codec_name(enc.codec)
    if len(enc.data) != dlen and not (variable_length(enc.codec) and len(enc.data) <= dlen):
        at_most = "at most " if variable_length(enc.codec) else ""
        raise CodecError(f"{name}: data is {len(enc.data)} bytes, expected {at_most}{dlen} for count={enc.count} "
                         f"block_size={enc.block_size}" + (f" topk={enc.topk} bits={enc.bits}" if enc.topk else ""))
    if len(enc.scales) != slen:
        raise CodecError(f"{name}: scales is {len(enc.scales)} bytes, expected {slen} "
                         f"({slen // 4} float32 scales) for count={enc.count} block_size={enc.block_size}")
    if slen:
        s = np.frombuffer(enc.scales, dtype="<f4")  # (nb,)
        if not np.isfinite(s).all() or (s < 0).any():
            raise CodecError(f"{name}: scales must be finite and >= 0; got NaN/Inf or negative values")


def encode(flat: torch.Tensor, codec: int, block_size: int | None = None, topk: int = 0, bits: int = 0) -> Encoded:
    """Encode a 1-D float tensor; block_size defaults per codec and is ignored for none/fp16/bf16;
    topk needs block_size (values per chunk), topk (kept per chunk) and bits."""
    c = _codec(codec)
    codec = int(codec)
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or not flat.is_floating_point():
        raise CodecError(f"encode expects a 1-D float tensor, got {getattr(flat, 'shape', type(flat))} "
                         f"{getattr(flat, 'dtype', '')}")
    default = T.DEFAULT_CHUNK if codec == pb.CODEC_TOPK else DEFAULT_BLOCK_SIZE.get(codec, 0)
    bs = (default if block_size is None else block_size) if c.blocked else 0
    _check_params(codec, bs, topk, bits)
    x = flat.detach().to(device="cpu", dtype=torch.float32).contiguous()  # (n,)
    if not bool(torch.isfinite(x).all()):
        raise CodecError("input contains NaN/Inf, which cannot be encoded")
    data, scales = c.encode(x, bs, topk, bits)
    return Encoded(codec=codec, count=x.numel(), block_size=bs, data=data, scales=scales, topk=topk, bits=bits)


def decode(enc: Encoded) -> torch.Tensor:
    """validate(), then return the (count,) float32 CPU tensor; raises CodecError on malformed data or
    non-finite output."""
    validate(enc)
    out = _REGISTRY[enc.codec].decode(bytes(enc.data), bytes(enc.scales), enc.count, enc.block_size,
                                      enc.topk, enc.bits)
    if not bool(torch.isfinite(out).all()):
        raise CodecError(f"{codec_name(enc.codec)}: decoded tensor contains NaN/Inf")
    return out


def split(enc: Encoded, max_part_bytes: int) -> list[tuple[int, Encoded]]:
    """Cut enc at block (chunk) boundaries into (element_offset, part) pairs of <= ~max_part_bytes each."""
    validate(enc)
    if max_part_bytes <= 0:
        raise CodecError(f"max_part_bytes must be > 0, got {max_part_bytes}")
    params = (enc.block_size, enc.topk, enc.bits)
    if sum(expected_sizes(enc.codec, enc.count, *params)) <= max_part_bytes or enc.count == 0:
        return [(0, enc)]   # int2z: by its bound, as wire.part_ranges counts parts
    align = enc.block_size or 1  # elements per indivisible unit (blocks are even for int4)
    unit_bytes = sum(expected_sizes(enc.codec, align, *params))
    chunk = max(1, max_part_bytes // unit_bytes) * align  # elements per part (at least one unit)
    cuts = [(off, min(chunk, enc.count - off)) for off in range(0, enc.count, chunk)]  # parts, not elements
    datas = _REGISTRY[enc.codec].cut(enc, cuts) if variable_length(enc.codec) else None
    parts = []
    for i, (off, n) in enumerate(cuts):
        d0, s0 = expected_sizes(enc.codec, off, *params)  # byte offsets of an aligned start
        dn, sn = expected_sizes(enc.codec, n, *params)
        data = datas[i] if datas else enc.data[d0:d0 + dn]
        parts.append((off, Encoded(enc.codec, n, enc.block_size, data, enc.scales[s0:s0 + sn], enc.topk, enc.bits)))
    return parts


def join(pieces: list[Encoded]) -> Encoded:
    """One tensor's consecutive encoded pieces (each cut at whole blocks) as one Encoded."""
    first = pieces[0]
    data = _REGISTRY[first.codec].join(pieces) if variable_length(first.codec) else b"".join(p.data for p in pieces)
    return Encoded(first.codec, sum(p.count for p in pieces), first.block_size, data,
                   b"".join(p.scales for p in pieces), first.topk, first.bits)


@dataclass(frozen=True)
class CodecSpec:
    """One direction's codec and its parameters, as a run's settings name them."""
    codec: int
    block_size: int | None = None  # int8/int4 block or topk chunk; None: the codec's default
    topk: int = 0                  # topk: values kept per chunk
    bits: int = 0                  # topk: bits per kept value

    @classmethod
    def of(cls, settings, direction: str) -> "CodecSpec":
        """The `upload` or `download` codec of a run's settings (a RunConfig or its JSON as a dict)."""
        get = settings.get if isinstance(settings, dict) else (lambda key, d=None: getattr(settings, key, d))
        codec = codec_by_name(get(f"{direction}_codec"))
        if codec != pb.CODEC_TOPK:
            return cls(codec, get("codec_block_size") or None)
        chunk = int(get("topk_chunk") or T.DEFAULT_CHUNK)
        density = (direction == "download" and get("download_topk_density")) or get("topk_density")
        k = T.k_for(chunk, T.DEFAULT_DENSITY if density is None else float(density))
        spec = cls(codec, chunk, k, int(get("topk_bits") or T.DEFAULT_BITS))
        _check_params(codec, chunk, k, spec.bits)
        return spec

    def encode(self, flat: torch.Tensor) -> Encoded:
        return encode(flat, self.codec, self.block_size, self.topk, self.bits)

    def expect(self, part_codec: int, block_size: int, topk: int, bits: int) -> str | None:
        """Why a received part's parameters are not this run's (topk's must match exactly), or None."""
        if part_codec != self.codec:
            return f"codec {part_codec} is not this run's ({self.codec}, {codec_name(self.codec)})"
        if self.codec == pb.CODEC_TOPK and (block_size, topk, bits) != (self.block_size, self.topk, self.bits):
            return (f"topk parameters (block_size {block_size}, topk {topk}, bits {bits}) are not this run's "
                    f"({self.block_size}, {self.topk}, {self.bits})")
        return None


class ErrorFeedback:
    """Per-tensor residual so what a codec drops this round is sent next round; `decay` < 1 (SparseLoCo's
    beta) shrinks what is carried over: target = delta + decay x residual. With `momentum` mu > 0 the client
    first takes DiLoCo's Nesterov step on its own delta (m = mu m + delta; sent: delta + mu m), so an outer
    SGD on the mean of what clients send is DiLoCo's outer step, and the momentum travels inside the
    (sparse) upload rather than in a dense server-side buffer."""

    def __init__(self, codec: int | CodecSpec, block_size: int | None = None, decay: float = 1.0,
                 momentum: float = 0.0):
        self.spec = codec if isinstance(codec, CodecSpec) else CodecSpec(int(codec), block_size)
        _codec(self.spec.codec)
        if not 0 <= decay <= 1:
            raise CodecError(f"error-feedback decay must be in [0, 1], got {decay}")
        if not 0 <= momentum < 1:
            raise CodecError(f"client momentum must be in [0, 1), got {momentum}")
        self.codec, self.block_size, self.decay = self.spec.codec, self.spec.block_size, float(decay)
        self.momentum = float(momentum)
        self.residuals: dict[str, torch.Tensor] = {}  # name -> float32 CPU tensor shaped like the delta
        self.momenta: dict[str, torch.Tensor] = {}    # name -> the client's outer momentum (momentum > 0 only)

    @classmethod
    def for_run(cls, settings) -> "ErrorFeedback":
        """The upload codec and --ef-decay of a run's settings (a RunConfig or its JSON as a dict)."""
        get = settings.get if isinstance(settings, dict) else (lambda key, d=None: getattr(settings, key, d))
        decay = get("ef_decay")
        return cls(CodecSpec.of(settings, "upload"), decay=1.0 if decay is None else float(decay),
                   momentum=float(get("client_momentum") or 0.0))

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Copies of the residuals and momenta, to restore() when an upload was not applied."""
        return ({n: r.clone() for n, r in self.residuals.items()}, {n: m.clone() for n, m in self.momenta.items()})

    def restore(self, snapshot: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        self.residuals, self.momenta = snapshot

    def compress(self, name: str, delta: torch.Tensor) -> tuple[Encoded, torch.Tensor]:
        """Encode delta (after the momentum step) + residual; returns (enc, decoded float32 CPU tensor shaped
        like delta)."""
        target = delta.detach().to(device="cpu", dtype=torch.float32)
        if self.momentum:
            m = self.momenta.get(name)
            m = target.clone() if m is None or m.shape != target.shape else m.mul_(self.momentum).add_(target)
            self.momenta[name] = m
            target = target + self.momentum * m
        prev = self.residuals.get(name)
        if prev is not None and prev.shape == target.shape:
            target = target + (prev if self.decay == 1 else self.decay * prev)
        enc = self.spec.encode(target.flatten())
        decoded = decode(enc).reshape(delta.shape)
        if self.codec == pb.CODEC_NONE:
            self.residuals[name] = torch.zeros_like(target)
        else:
            self.residuals[name] = target - decoded
        return enc, decoded

    def reset(self) -> None:
        """Drop all residuals and momenta."""
        self.residuals.clear()
        self.momenta.clear()
