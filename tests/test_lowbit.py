"""The dense low-bit codecs int2 and sign: their levels, byte arithmetic, splits, error feedback, and every
malformed input refused (structured cases and a fuzz of mutated encodings and wire parts); int2z (int2 with
its magnitude bits deflated, tests/test_int2z.py) through the splits, fuzz, wire parts and error feedback."""
import dataclasses

import numpy as np
import pytest
import torch

import fedswarm.proto.fedswarm_pb2 as pb
from fedswarm.proto import codec as C
from fedswarm.proto import lowbit as LB
from fedswarm.proto import wire

from fedswarm.app.testing import decoded

LOWBIT = [pb.CODEC_INT2, pb.CODEC_SIGN]
WITH_Z = LOWBIT + [pb.CODEC_INT2Z]
BITS = {pb.CODEC_INT2: 2, pb.CODEC_SIGN: 1, pb.CODEC_INT2Z: 2}


def _x(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3) * 4


@pytest.mark.parametrize("codec", LOWBIT)
@pytest.mark.parametrize("n,bs", [(5000, 1024), (777, 64), (50, 64), (4096, 4096), (0, 1024)])
def test_levels_of_each_blocks_scale(codec, n, bs):
    x = _x(n, codec)
    enc = C.encode(x, codec, bs)
    bits = LB.BITS[C.codec_name(codec)]
    assert (len(enc.data), len(enc.scales)) == C.expected_sizes(codec, n, bs) == (-(-n * bits // 8), 4 * -(-n // bs))
    y = C.decode(enc)
    assert y.shape == (n,)
    for start in range(0, n, bs):
        xb, yb = x[start:start + bs], y[start:start + bs]
        mean = xb.abs().mean()
        assert torch.equal(torch.sign(yb), torch.where(xb >= 0, 1.0, -1.0))   # every value keeps its sign
        if codec == pb.CODEC_SIGN:   # +-mean |v|
            assert torch.allclose(yb.abs(), mean.expand_as(yb), rtol=1e-5)
        else:   # +-s/4 or +-3s/4 of s = |v|max: the nearer one
            s = xb.abs().max()
            want = torch.where(xb.abs() < s / 2, s / 4, 3 * s / 4)
            assert torch.allclose(yb.abs(), want, rtol=1e-5)


def test_int2_beats_sign_and_int4_beats_int2_on_gaussian_values():
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(1))
    err = {c: ((C.decode(C.encode(x, c)) - x).norm() / x.norm()).item()
           for c in (pb.CODEC_SIGN, pb.CODEC_INT2, pb.CODEC_INT4)}
    assert 0.59 < err[pb.CODEC_SIGN] < 0.62      # sqrt(1 - 2/pi) = 0.603
    assert err[pb.CODEC_INT2] < 0.55             # levels of |v|max (the 4-level Lloyd-Max quantizer: 0.34)
    assert err[pb.CODEC_INT4] < 0.15


def test_size_ratios_1m():
    n = 1 << 20
    for codec, ratio in ((pb.CODEC_SIGN, 31), (pb.CODEC_INT2, 15.7)):
        assert 4 * n / sum(C.expected_sizes(codec, n, C.DEFAULT_BLOCK_SIZE[codec])) > ratio


@pytest.mark.parametrize("codec", WITH_Z)
def test_split_at_block_boundaries(codec):
    enc = C.encode(_x(3001, 7), codec, 64)
    parts = C.split(enc, 40)
    assert len(parts) > 1 and all(off % 64 == 0 for off, _ in parts)
    assert torch.equal(torch.cat([C.decode(p) for _, p in parts]), C.decode(enc))
    assert wire.count_parts({"w": (3001,)}, codec, 64, max_part_bytes=40) == len(parts)


def _refused(enc, match=None):
    with pytest.raises(C.CodecError, match=match):
        C.decode(enc)


@pytest.mark.parametrize("codec", LOWBIT)
def test_malformed_encodings_are_refused(codec):
    enc = C.encode(_x(301), codec, 64)   # 301 values: the last byte has padding bits
    C.decode(enc)
    _refused(dataclasses.replace(enc, data=enc.data[:-1] + bytes([enc.data[-1] | 0x80])), "padding")
    for kw, says in [({"data": enc.data[:-1]}, "expected"), ({"data": enc.data + b"\0"}, "expected"),
                     ({"scales": enc.scales[:-4]}, "scales"), ({"block_size": 0}, "block_size"),
                     ({"block_size": 56}, "block_size"), ({"block_size": 68}, "multiple of 8"),
                     ({"block_size": 1 << 17}, "block_size"), ({"topk": 4}, "topk and bits"),
                     ({"bits": 2}, "topk and bits"), ({"count": -1}, "count"),
                     ({"scales": np.array([1, -1, 1, 1, 1], "<f4").tobytes()}, ">= 0"),
                     ({"scales": b"\0\0\xc0\x7f" + enc.scales[4:]}, "finite")]:
        _refused(dataclasses.replace(enc, **kw), says)
    for v in (float("nan"), float("inf")):
        with pytest.raises(C.CodecError, match="NaN/Inf"):
            C.encode(torch.tensor([0.0, v, 1.0]), codec)


@pytest.mark.parametrize("codec", WITH_Z)
def test_fuzzed_encodings_decode_or_are_refused(codec):
    """Bit flips, truncations, extensions and changed parameters: CodecError or a finite tensor whose values
    are levels of their block's scale, never another exception (int2z: a flip in its zlib stream fails the
    stream's checksum or its length, one in the sign plane only moves a value)."""
    bits = BITS[codec]
    accepted, refused = decoded(C.encode(_x(3001), codec, 128), seed=codec)
    for enc, y in accepted:
        scale = torch.from_numpy(np.frombuffer(enc.scales, "<f4").copy()).repeat_interleave(enc.block_size)[:enc.count]
        levels = 1 << (bits - 1)
        steps = y.abs() / torch.where(scale > 0, scale, 1) * levels - 0.5   # j in [0, L) for every value
        assert torch.allclose(steps, steps.round(), atol=1e-3) and (steps.round() >= 0).all()
        assert (steps.round() < levels).all()
    assert 200 < refused < 600   # length and parameter changes are caught; flips of data bits only move values
    assert codec != pb.CODEC_INT2Z or refused > 300


def _part(enc, offset=0, shape=(3000,)):
    return pb.TensorPart(name="w", shape=list(shape), codec=enc.codec, block_size=enc.block_size, offset=offset,
                         count=enc.count, data=enc.data, scales=enc.scales, topk=enc.topk, bits=enc.bits)


@pytest.mark.parametrize("codec", WITH_Z)
def test_wire_parts_assemble_or_are_refused(codec):
    x = _x(3000)
    first, second = C.encode(x[:1024], codec, 512), C.encode(x[1024:], codec, 512)
    asm = wire.PartAssembler({"w": (3000,)}, {codec})
    asm.add(_part(first)), asm.add(_part(second, offset=1024))
    assert torch.equal(asm.finish()["w"], torch.cat([C.decode(first), C.decode(second)]))
    with pytest.raises(wire.WireError):   # another codec than the run's
        wire.PartAssembler({"w": (3000,)}, {pb.CODEC_INT8}).add(_part(first))
    with pytest.raises(wire.WireError):   # a malformed part is refused before it is assembled
        wire.PartAssembler({"w": (3000,)}, {codec}).add(_part(dataclasses.replace(first, data=first.data[:-1])))


@pytest.mark.parametrize("codec", WITH_Z)
def test_error_feedback_sends_everything_eventually(codec):
    d = _x(4096, 5)
    ef = C.ErrorFeedback(codec)
    sent = torch.zeros_like(d)
    for _ in range(200):
        sent += ef.compress("w", d)[1]
    assert torch.allclose(sent + ef.residuals["w"], 200 * d, rtol=1e-4, atol=1e-2)   # nothing lost
    one_shot = (C.decode(C.encode(d, codec)) - d).norm()
    # the mean converges to d; sign's residual holds the heavy tail (a block's outliers travel at its mean |v|)
    assert (sent / 200 - d).norm() < {pb.CODEC_INT2: 0.02, pb.CODEC_INT2Z: 0.02, pb.CODEC_SIGN: 0.25}[codec] * one_shot
    assert C.CodecSpec.of({"upload_codec": "sign", "codec_block_size": 256}, "upload") == C.CodecSpec(codec=pb.CODEC_SIGN,
                                                                                                      block_size=256)
