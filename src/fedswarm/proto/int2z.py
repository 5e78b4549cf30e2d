"""The `int2z` codec: int2's levels and scales (proto/lowbit.py), the level bits as two planes, one deflated.

An int2 level of a block's |v|max scale s is a sign and a magnitude: +-s/4 (inner) or +-3s/4 (outer). On
training deltas only 5-13 % of values are outer, so the outer bits deflate to well under a bit a value.
`data` holds, for n values (bits in little-endian order, as int2 packs them, padding bits zero):

    sign plane       ceil(n/8) bytes, bit i set when value i is >= 0 (int2's positive levels)
    zlib stream      of the magnitude plane: ceil(n/8) bytes, bit i set when value i is outer

and `scales` int2's float32 block scales, so decode(int2z) == decode(int2) bit for bit. The data's length
varies: `sizes` gives its bound (the sign plane and zlib's compressBound of the magnitude plane). A stream
is inflated to at most the plane's length plus one byte and must end exactly there, with nothing after it.
The encoder deflates with Huffman coding only (_deflate); the decoder takes any zlib stream.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from fedswarm.proto import lowbit as LB

BITS = {"int2z": 2}


def _plane(count: int) -> int:
    return -(-count // 8)


def _zbound(n: int) -> int:
    """zlib's compressBound(n): the most a deflated n bytes can take."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


def sizes(count: int, block: int, bits: int = 2) -> tuple[int, int]:
    """(most len(data), len(scales)) of `count` values."""
    return _plane(count) + _zbound(_plane(count)), 4 * (-(-count // block))


def _deflate(plane: bytes) -> bytes:
    """Huffman coding of the plane's bytes only: on gpt2-tiny's delta after 100 AdamW steps (7.8 % outer)
    0.340 bits a value against 0.341 with level 9's string matching, which took 20x the time."""
    z = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return z.compress(plane) + z.flush()


def _inflate(stream: bytes, size: int) -> bytes | str:
    """The `size` bytes a zlib stream holds, or why it is not exactly that (never inflates more than size + 1)."""
    z = zlib.decompressobj()
    try:
        out = z.decompress(stream, size + 1)
    except zlib.error as err:
        return f"the magnitude plane is not a valid zlib stream ({err})"
    if len(out) > size:
        return f"the magnitude plane inflates to more than the {size} bytes of {8 * size} values' bits"
    if not z.eof:
        return f"the magnitude plane's zlib stream is cut short ({len(out)} of {size} bytes inflated)"
    if len(out) < size:
        return f"the magnitude plane inflates to {len(out)} bytes, not the {size} bytes of {8 * size} values' bits"
    if z.unused_data:
        return f"{len(z.unused_data)} bytes follow the magnitude plane's zlib stream"
    return out


def _bits(plane: bytes, count: int, what: str) -> np.ndarray | str:
    bits = np.unpackbits(np.frombuffer(plane, dtype=np.uint8), bitorder="little")  # (8 ceil(n/8),)
    if bits[count:].any():
        return f"padding bits after the last value of the {what} plane must be zero"
    return bits[:count]


def _planes(data: bytes, count: int) -> tuple[bytes, bytes] | str:
    """(sign plane, inflated magnitude plane) of int2z data."""
    n = _plane(count)
    if len(data) < n:
        return f"data is {len(data)} bytes, shorter than the {n}-byte sign plane of {count} values"
    mag = _inflate(data[n:], n)
    return mag if isinstance(mag, str) else (data[:n], mag)


def encode(x: torch.Tensor, block: int, bits: int = 2) -> tuple[bytes, bytes]:
    """(n,) finite float32 -> (data, scales), int2's levels and scales."""
    level, scales = LB.levels(x, block, 2)
    sign = np.packbits((level >= 2).numpy(), bitorder="little").tobytes()
    outer = np.packbits(((level == 0) | (level == 3)).numpy(), bitorder="little").tobytes()
    return sign + _deflate(outer), scales


def decode(data: bytes, scales: bytes, count: int, block: int, bits: int = 2) -> torch.Tensor | str:
    """Scales already validated: (count,) float32, or why the data is malformed."""
    planes = _planes(data, count)
    if isinstance(planes, str):
        return planes
    sign, outer = (_bits(p, count, what) for p, what in zip(planes, ("sign", "magnitude")))
    for b in (sign, outer):
        if isinstance(b, str):
            return b
    sign, outer = torch.from_numpy(sign.astype(np.int32)), torch.from_numpy(outer.astype(np.int32))
    level = torch.where(sign == 1, 2 + outer, 1 - outer)   # int2's level: 3 +3s/4, 2 +s/4, 1 -s/4, 0 -3s/4
    return LB.values(level, scales, block, 2)


def cut(data: bytes, count: int, pieces: list[tuple[int, int]]) -> list[bytes] | str:
    """The data of each (offset, count) piece of an encoding, offsets at whole blocks (whole bytes), or why the
    encoding is malformed."""
    planes = _planes(data, count)
    if isinstance(planes, str):
        return planes
    sign, outer = planes
    return [sign[off // 8:off // 8 + _plane(n)] + _deflate(outer[off // 8:off // 8 + _plane(n)])
            for off, n in pieces]


def join(datas: list[bytes], counts: list[int]) -> bytes | str:
    """One encoding's data from consecutive pieces' (each but the last of whole bytes' values), or why a piece
    is malformed."""
    planes = [_planes(d, n) for d, n in zip(datas, counts)]
    bad = next((p for p in planes if isinstance(p, str)), None)
    return bad or b"".join(s for s, _ in planes) + _deflate(b"".join(m for _, m in planes))
