"""Tests for fedswarm.proto.codec."""
import dataclasses

import numpy as np
import pytest
import torch

import fedswarm.proto.fedswarm_pb2 as pb
from fedswarm.proto import codec as C

ALL = [pb.CODEC_NONE, pb.CODEC_FP16, pb.CODEC_BF16, pb.CODEC_INT8, pb.CODEC_INT4, pb.CODEC_INT2Z]


def _x(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3) * 4


def _block_bound(x, bs, levels):
    """Per-element max abs error allowed: half a quantization step of the element's block."""
    pad = -x.numel() % bs
    scale = torch.cat([x, x.new_zeros(pad)]).view(-1, bs).abs().amax(1)  # (nb,)
    return (scale / levels / 2).repeat_interleave(bs)[: x.numel()] * (1 + 1e-5) + 1e-12


def test_registry_complete_and_names():
    assert set(C._REGISTRY) == set(pb.Codec.values())
    assert set(C.CODEC_NAMES.values()) == set(pb.Codec.values())
    for name, code in C.CODEC_NAMES.items():
        assert C.codec_by_name(name) == code and C.codec_name(code) == name
    with pytest.raises(C.CodecError, match="int8"):
        C.codec_by_name("int3")
    with pytest.raises(C.CodecError):
        C.codec_name(99)


def test_none_roundtrip_exact():
    x = _x(1001)
    enc = C.encode(x.double(), pb.CODEC_NONE)
    assert (enc.block_size, enc.scales, len(enc.data)) == (0, b"", 4 * 1001)
    assert torch.equal(C.decode(enc), x)
    assert np.array_equal(np.frombuffer(enc.data, "<f4"), x.numpy())  # little-endian float32


@pytest.mark.parametrize("codec,rel", [(pb.CODEC_FP16, 2 ** -11), (pb.CODEC_BF16, 2 ** -8)])
def test_half_relative_error(codec, rel):
    x = _x(5000)
    x = x + 0.01 * torch.sign(x)  # keep |x| >= 0.01, away from fp16 subnormals
    y = C.decode(C.encode(x, codec))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y - x).abs() <= rel * x.abs() * 1.0001).all()
    assert not torch.equal(y, x)


def test_fp16_overflow_rejected():
    with pytest.raises(C.CodecError, match="fp16"):
        C.encode(torch.tensor([1.0, 70000.0]), pb.CODEC_FP16)


@pytest.mark.parametrize("n,bs", [(1000, 256), (4096, 64), (777, 200)])
def test_int8_blockwise_error(n, bs):
    x = _x(n)
    x[:bs] = 0  # a zero block has scale 0 and decodes to zeros
    enc = C.encode(x, pb.CODEC_INT8, bs)
    C.validate(enc)
    y = C.decode(enc)
    assert torch.equal(y[:bs], torch.zeros(bs)) and np.frombuffer(enc.scales, "<f4")[0] == 0
    assert ((y - x).abs() <= _block_bound(x, bs, 127)).all()
    q = np.frombuffer(enc.data, np.int8)
    assert q.min() >= -127 and q.max() <= 127 and np.abs(q).max() == 127


@pytest.mark.parametrize("n,bs", [(1001, 128), (129, 64), (1, 64), (255, 256)])
def test_int4_odd_count_and_partial_block(n, bs):
    x = _x(n, 3)
    enc = C.encode(x, pb.CODEC_INT4, bs)
    assert len(enc.data) == (n + 1) // 2 and len(enc.scales) == 4 * -(-n // bs)
    y = C.decode(enc)
    assert y.shape == (n,)
    assert ((y - x).abs() <= _block_bound(x, bs, 7)).all()
    nib = np.frombuffer(enc.data, np.uint8)
    lo, hi = nib & 15, nib >> 4
    assert lo.min() >= 1 and (hi[: n // 2].min() >= 1 if n > 1 else True)
    if n % 2:
        assert hi[-1] == 0  # the pad nibble


def test_int4_nibble_order():
    enc = C.encode(torch.tensor([1.0, -1.0, 0.0]), pb.CODEC_INT4, 64)
    assert enc.data == bytes([15 | (1 << 4), 8])  # even index low nibble; odd count pads a zero nibble


def test_empty_tensor_all_codecs():
    for codec in ALL:
        enc = C.encode(torch.zeros(0), codec)
        assert C.decode(enc).shape == (0,)


def test_size_ratios_1m():
    x = _x(1 << 20)
    fp32 = 4 * x.numel()
    sizes = {c: (lambda e: len(e.data) + len(e.scales))(C.encode(x, c)) for c in (pb.CODEC_INT8, pb.CODEC_INT4)}
    assert sizes[pb.CODEC_INT8] / fp32 <= 0.26
    assert sizes[pb.CODEC_INT4] / fp32 <= 0.14
    assert C.expected_sizes(pb.CODEC_INT8, 1 << 20, 256) == (1 << 20, 4 * 4096)


@pytest.mark.parametrize("codec", ALL)
@pytest.mark.parametrize("n", [3001, 3000, 5])
def test_split(codec, n):
    enc = C.encode(_x(n, 7), codec)
    whole = C.decode(enc)
    parts = C.split(enc, 700)
    bs = enc.block_size
    if n == 5:
        assert parts == [(0, enc)]
    else:
        assert len(parts) > 1
    offs = [o for o, _ in parts]
    assert offs[0] == 0 and sum(p.count for _, p in parts) == n
    for (o, p), nxt in zip(parts, offs[1:] + [n]):
        C.validate(p)
        assert o + p.count == nxt
        assert len(p.data) + len(p.scales) <= 700 or p.count == max(bs, 1)
        if bs:
            assert o % bs == 0 and o % 2 == 0
    assert torch.equal(torch.cat([C.decode(p) for _, p in parts]), whole)


def test_split_tiny_budget_one_block_per_part():
    enc = C.encode(_x(1000), pb.CODEC_INT8, 64)
    parts = C.split(enc, 10)
    assert [p.count for _, p in parts] == [64] * 15 + [40]


def _bad(enc, **kw):
    with pytest.raises(C.CodecError):
        C.validate(dataclasses.replace(enc, **kw))


def test_validate_rejects():
    e8 = C.encode(_x(300), pb.CODEC_INT8, 128)
    e4 = C.encode(_x(300), pb.CODEC_INT4, 128)
    C.validate(e8), C.validate(e4)
    _bad(e8, data=e8.data[:-1])
    _bad(e4, data=e4.data + b"\0")
    _bad(e8, scales=e8.scales[:-4])
    _bad(e8, scales=np.array([1, np.nan, 1], "<f4").tobytes())
    _bad(e8, scales=np.array([1, -1, 1], "<f4").tobytes())
    _bad(e8, scales=np.array([1, np.inf, 1], "<f4").tobytes())
    _bad(e8, block_size=32)
    _bad(e8, block_size=300)
    _bad(e8, block_size=0)
    _bad(e4, block_size=127)
    _bad(e8, codec=99)
    _bad(e8, count=-1)
    en = C.encode(_x(10), pb.CODEC_NONE)
    _bad(en, block_size=64)
    with pytest.raises(C.CodecError, match="expected"):
        C.validate(dataclasses.replace(e8, data=e8.data[:-1]))
    with pytest.raises(C.CodecError, match="even"):
        C.encode(_x(10), pb.CODEC_INT4, 65)


def test_decode_rejects_nan_payload():
    enc = C.encode(_x(8), pb.CODEC_FP16)
    bad = dataclasses.replace(enc, data=enc.data[:2] + np.array([np.nan], "<f2").tobytes() + enc.data[4:])
    C.validate(bad)  # structurally fine
    with pytest.raises(C.CodecError, match="NaN"):
        C.decode(bad)


@pytest.mark.parametrize("codec", ALL)
def test_encode_rejects_nonfinite(codec):
    for v in (float("nan"), float("inf")):
        with pytest.raises(C.CodecError, match="NaN/Inf"):
            C.encode(torch.tensor([0.0, v, 1.0]), codec)


def test_error_feedback_int4():
    d = _x(1000, 11).view(10, 100)
    D = d.abs().max().item()
    ef = C.ErrorFeedback(pb.CODEC_INT4)
    total = torch.zeros_like(d)
    for _ in range(50):
        enc, dec = ef.compress("w", d)
        assert dec.shape == d.shape
        total += dec
        r = ef.residuals["w"]
        assert r.shape == d.shape and r.abs().max().item() <= D / 12  # bounded: r <= (D + r) / 14
    assert torch.allclose(total + ef.residuals["w"], 50 * d, atol=1e-4 * 50 * D)
    one_shot = (C.decode(C.encode(d.flatten(), pb.CODEC_INT4)).view_as(d) - d).abs().max()
    assert (total / 50 - d).abs().max() <= one_shot / 10  # feedback averages the error away
    ef.compress("w", torch.ones(7))  # shape changed: residual restarts from zero
    assert ef.residuals["w"].shape == (7,)
    ef.reset()
    assert ef.residuals == {}


def test_error_feedback_none_residual_zero():
    ef = C.ErrorFeedback(pb.CODEC_NONE)
    d = _x(50).double()
    enc, dec = ef.compress("b", d)
    assert torch.equal(dec, d.float()) and not ef.residuals["b"].any()
