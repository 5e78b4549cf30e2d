"""Dense low-bit codecs: `int2` (2 bits a value) and `sign` (1 bit), each value a level of its block's scale.

EF-signSGD's and 1-bit Adam's message, with a float32 scale per block of `block_size` values (the last
block may be shorter). Every value travels as a `bits`-bit level, the same midrise levels as the topk
codec's kept values (proto/topk.py: a sign and a magnitude step), packed back to back in little-endian bit
order; only the bits after the last value, up to a whole byte, are padding and must be zero. The scale is
|v|max for int2 (values +-s/4, +-3s/4: nothing is clipped, so error feedback's residual stays within half
a step; scaled by the mean |v| instead, heavy-tailed deltas grew residuals of 20x the delta) and 2 mean |v|
for sign (every value +-mean |v|, the scale that minimizes the block's squared error). Block sizes are multiples of 8, so a tensor splits at block
boundaries into whole bytes. At 1,024-value blocks: 1.03 bits a value (sign), 2.03 (int2).
"""
from __future__ import annotations

import numpy as np
import torch

from fedswarm.proto import topk as T

BITS = {"int2": 2, "sign": 1}
MIN_BLOCK, MAX_BLOCK = 64, 1 << 16


def sizes(count: int, block: int, bits: int) -> tuple[int, int]:
    """(len(data), len(scales)) of `count` values."""
    return -(-count * bits // 8), 4 * (-(-count // block))


def check_block(block: int) -> str | None:
    """Why this block size is invalid, or None."""
    if not isinstance(block, int) or not MIN_BLOCK <= block <= MAX_BLOCK or block % 8:
        return f"block_size must be a multiple of 8 in [{MIN_BLOCK}, {MAX_BLOCK}], got {block!r}"
    return None


def _rows(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    """(n,) -> the full blocks as one (m, block) view and the shorter last block as (1, rest)."""
    full = x.numel() // block * block
    return [r for r in (x[:full].view(-1, block), x[full:].view(1, -1)) if r.numel()]


def levels(x: torch.Tensor, block: int, bits: int) -> tuple[torch.Tensor, bytes]:
    """(n,) finite float32 -> its levels (n,) int32 in [0, 2^bits) and the float32 block scales' bytes."""
    levels_, scales = [], []
    for rows in _rows(x, block):
        level, scale = T.quantize(rows, bits)
        levels_.append(level.flatten()), scales.append(scale)
    level = torch.cat(levels_) if levels_ else torch.zeros(0, dtype=torch.int32)   # (n,)
    scale = torch.cat(scales) if scales else torch.zeros(0)
    return level, scale.numpy().astype("<f4", copy=False).tobytes()


def encode(x: torch.Tensor, block: int, bits: int) -> tuple[bytes, bytes]:
    """(n,) finite float32 -> (data, scales)."""
    level, scales = levels(x, block, bits)
    bitmap = ((level[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1).to(torch.uint8).flatten()
    return np.packbits(bitmap.numpy(), bitorder="little").tobytes(), scales


def decode(data: bytes, scales: bytes, count: int, block: int, bits: int) -> torch.Tensor | str:
    """Sizes already validated: (count,) float32, or why the data is malformed."""
    bitmap = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")  # (8 len(data),)
    if bitmap[count * bits:].any():
        return "padding bits after the last value must be zero"
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int32)
    level = (torch.from_numpy(bitmap[:count * bits].astype(np.int32)).view(count, bits) * weights).sum(1)  # (n,)
    return values(level, scales, block, bits)


def values(level: torch.Tensor, scales: bytes, block: int, bits: int) -> torch.Tensor:
    """Levels (n,) int32 and the block scales' bytes (sizes already validated) -> (n,) float32."""
    scale = torch.from_numpy(np.frombuffer(scales, dtype="<f4").astype(np.float32))  # (nb,)
    out, start = [], 0
    for rows in _rows(level, block):
        m = rows.shape[0]
        out.append(T.dequantize(rows, scale[start:start + m], bits).flatten())
        start += m
    return torch.cat(out) if out else torch.zeros(0)
