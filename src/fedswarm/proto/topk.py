"""The `topk` codec: per chunk, the k largest values by magnitude, as positions and low-bit levels.

SparseLoCo's (arXiv 2508.15706) and Covenant-72B's message: a flat tensor is cut into chunks of
`block_size` values (the last may be shorter); each chunk keeps its `topk` largest by magnitude. A kept
value travels as one entry of `ib + bits` bits, where ib = ceil(log2(block_size)):

    entry = position in the chunk  |  level << ib        (little-endian bit order, entries back to back)

Each chunk's entries are padded with zero bits to a whole byte, so every full chunk is the same number of
bytes and a tensor can be split at chunk boundaries (codec.split). Positions are strictly increasing in a
chunk (one canonical encoding: duplicates or disorder are refused). A level is a sign and a magnitude step
of the chunk's float32 scale s, midrise with L = 2^(bits-1) steps:

    value = +-(j + 0.5) / L * s,   j in [0, L)            level = L + j (positive) or L - 1 - j (negative)

with s = |v|max (bits >= 2) or 2 mean |v| (bits 1: every value is +-mean |v|). At 4,096-value chunks,
top 64, 2 bits: 112 + 4 bytes per 16,384 bytes of float32, 141x smaller.
"""
from __future__ import annotations

import numpy as np
import torch

MIN_CHUNK, MAX_CHUNK = 64, 1 << 16
BITS = (1, 2, 4, 8)
DEFAULT_CHUNK, DEFAULT_DENSITY, DEFAULT_BITS = 4096, 1 / 64, 2


def index_bits(chunk: int) -> int:
    """Bits of one position within a chunk: 12 for 4,096."""
    return max(1, (chunk - 1).bit_length())


def k_for(chunk: int, density: float) -> int:
    """Values kept per chunk at this density (at least one)."""
    return max(1, min(chunk, round(density * chunk)))


def _chunk_bytes(kept: int, width: int) -> int:
    return -(-kept * width // 8)


def sizes(count: int, chunk: int, k: int, bits: int) -> tuple[int, int]:
    """(len(data), len(scales)) of `count` values."""
    full, rest = divmod(count, chunk)
    width = index_bits(chunk) + bits
    data = full * _chunk_bytes(k, width) + (_chunk_bytes(min(k, rest), width) if rest else 0)
    return data, 4 * (full + (1 if rest else 0))


def check_params(chunk: int, k: int, bits: int) -> str | None:
    """Why these parameters are invalid, or None."""
    if not isinstance(chunk, int) or not MIN_CHUNK <= chunk <= MAX_CHUNK:
        return f"block_size (values per chunk) must be an int in [{MIN_CHUNK}, {MAX_CHUNK}], got {chunk!r}"
    if not isinstance(k, int) or not 1 <= k <= chunk:
        return f"topk (values kept per chunk) must be an int in [1, block_size={chunk}], got {k!r}"
    if bits not in BITS:
        return f"bits must be one of {BITS}, got {bits!r}"
    return None


def quantize(vals: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, k) values -> levels (m, k) int32 in [0, 2L), scales (m,) float32."""
    levels = 1 << (bits - 1)
    mag = vals.abs()
    scale = 2 * mag.mean(dim=1) if bits == 1 else mag.amax(dim=1)  # (m,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    j = torch.floor(mag / safe * levels).clamp_(0, levels - 1).to(torch.int32)  # (m, k)
    level = torch.where(vals >= 0, levels + j, levels - 1 - j)
    return level, scale


def dequantize(level: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 1 << (bits - 1)
    positive = level >= levels
    j = torch.where(positive, level - levels, levels - 1 - level).float()
    return torch.where(positive, 1.0, -1.0) * (j + 0.5) / levels * scale[:, None]  # (m, k)


def _pack(entries: torch.Tensor, width: int) -> bytes:
    """(m, k) int32 entries of `width` bits -> m byte-padded rows."""
    m, k = entries.shape
    shifts = torch.arange(width, dtype=torch.int32)
    bitmap = ((entries[..., None] >> shifts) & 1).to(torch.uint8).reshape(m, k * width)  # (m, k * width)
    pad = -(k * width) % 8
    if pad:
        bitmap = torch.cat([bitmap, bitmap.new_zeros(m, pad)], dim=1)
    return np.packbits(bitmap.numpy(), axis=1, bitorder="little").tobytes()


def _unpack(data: bytes, m: int, k: int, width: int) -> torch.Tensor | str:
    """m byte-padded rows -> (m, k) int32 entries, or why the bytes are malformed."""
    rows = np.frombuffer(data, dtype=np.uint8).reshape(m, _chunk_bytes(k, width))
    bitmap = np.unpackbits(rows, axis=1, bitorder="little")  # (m, bytes * 8)
    if bitmap[:, k * width:].any():
        return "padding bits after a chunk's entries must be zero"
    bitmap = torch.from_numpy(bitmap[:, :k * width].reshape(m, k, width).astype(np.int32))
    return (bitmap << torch.arange(width, dtype=torch.int32)).sum(dim=2, dtype=torch.int32)  # (m, k)


def _encode_rows(rows: torch.Tensor, k: int, bits: int, ib: int) -> tuple[bytes, torch.Tensor]:
    """(m, c) float32 chunks -> (entry bytes, (m,) scales)."""
    idx = torch.topk(rows.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values  # (m, k) ascending
    level, scale = quantize(torch.gather(rows, 1, idx), bits)
    return _pack(idx.to(torch.int32) | (level << ib), ib + bits), scale


def encode(x: torch.Tensor, chunk: int, k: int, bits: int) -> tuple[bytes, bytes]:
    """(n,) finite float32 -> (data, scales)."""
    ib, (full, rest) = index_bits(chunk), divmod(x.numel(), chunk)
    data, scales = [], []
    if full:
        d, s = _encode_rows(x[:full * chunk].view(full, chunk), k, bits, ib)
        data.append(d), scales.append(s)
    if rest:
        d, s = _encode_rows(x[full * chunk:].view(1, rest), min(k, rest), bits, ib)
        data.append(d), scales.append(s)
    scale = torch.cat(scales) if scales else torch.zeros(0)
    return b"".join(data), scale.numpy().astype("<f4", copy=False).tobytes()


def _decode_rows(data: bytes, scale: torch.Tensor, length: int, k: int, bits: int, ib: int) -> torch.Tensor | str:
    m = scale.numel()
    entries = _unpack(data, m, k, ib + bits)
    if isinstance(entries, str):
        return entries
    idx = (entries & ((1 << ib) - 1)).long()  # (m, k)
    if bool((idx >= length).any()):
        return f"a position is outside its chunk of {length} values"
    if k > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        return "positions in a chunk must be strictly increasing (no repeats)"
    out = torch.zeros(m, length)
    out.scatter_(1, idx, dequantize(entries >> ib, scale, bits))
    return out.flatten()


def decode(data: bytes, scales: bytes, count: int, chunk: int, k: int, bits: int) -> torch.Tensor | str:
    """Sizes already validated: (count,) float32, or why the data is malformed."""
    ib, (full, rest) = index_bits(chunk), divmod(count, chunk)
    scale = torch.from_numpy(np.frombuffer(scales, dtype="<f4").astype(np.float32))
    split = full * _chunk_bytes(k, ib + bits)
    parts = []
    if full:
        parts.append(_decode_rows(data[:split], scale[:full], chunk, k, bits, ib))
    if rest:
        parts.append(_decode_rows(data[split:], scale[full:], rest, min(k, rest), bits, ib))
    for p in parts:
        if isinstance(p, str):
            return p
    return torch.cat(parts) if parts else torch.zeros(0)
