"""The topk codec: what it keeps, its byte arithmetic, error feedback with decay, and every malformed input
refused (structured cases and a fuzz of mutated encodings and wire parts)."""
import dataclasses
import math

import pytest
import torch

import fedswarm.proto.fedswarm_pb2 as pb
from fedswarm.proto import codec as C
from fedswarm.proto import topk as T
from fedswarm.proto import wire

from fedswarm.app.testing import decoded

TOPK = pb.CODEC_TOPK


def _x(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3) * 4


def _enc(n=10_000, chunk=256, k=8, bits=2, seed=0):
    return C.encode(_x(n, seed), TOPK, chunk, k, bits)


@pytest.mark.parametrize("bits", T.BITS)
@pytest.mark.parametrize("n,chunk,k", [(10_000, 4096, 64), (777, 64, 5), (50, 64, 8), (4096, 4096, 4096)])
def test_keeps_each_chunks_largest_within_half_a_step(n, chunk, k, bits):
    x = _x(n, bits)
    enc = C.encode(x, TOPK, chunk, k, bits)
    y = C.decode(enc)
    assert (len(enc.data), len(enc.scales)) == T.sizes(n, chunk, k, bits) == C.expected_sizes(TOPK, n, chunk, k, bits)
    levels = 1 << (bits - 1)
    for start in range(0, n, chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        kept = min(k, xc.numel())
        top = set(torch.topk(xc.abs(), kept).indices.tolist())
        assert set(yc.nonzero().flatten().tolist()) <= top and (yc != 0).sum() >= kept - (xc == 0).sum()
        assert torch.equal(torch.sign(yc[list(top)]), torch.sign(xc[list(top)]))
        if bits > 1:   # midrise levels of |v|max: within half a step of every kept value
            step = xc.abs().max() / levels
            assert ((yc - xc)[list(top)].abs() <= step / 2 * (1 + 1e-4) + 1e-7).all()
        else:          # one level: the kept values' mean magnitude
            assert torch.allclose(yc[list(top)].abs(), xc[list(top)].abs().mean().expand(kept), rtol=1e-5)


def test_byte_arithmetic_at_the_default():
    # 4,096-value chunks, 64 kept at 2 bits: 64 x (12 + 2) bits = 112 bytes + one float32 scale, 141x below fp32
    assert T.index_bits(4096) == 12 and T.k_for(4096, 1 / 64) == 64
    assert T.sizes(4096 * 10, 4096, 64, 2) == (1120, 40)
    assert 4 * 4096 / (112 + 4) == pytest.approx(141.2, abs=0.1)
    assert T.sizes(4096 + 10, 4096, 64, 2) == (112 + math.ceil(10 * 14 / 8), 8)   # the short last chunk keeps 10


def test_empty_and_all_zero_and_deterministic():
    assert C.decode(C.encode(torch.zeros(0), TOPK, 64, 4, 2)).shape == (0,)
    z = C.decode(C.encode(torch.zeros(300), TOPK, 64, 4, 2))
    assert not z.any()
    a, b = _enc(seed=3), _enc(seed=3)
    assert a == b   # one canonical encoding (positions sorted)


def test_split_at_chunk_boundaries():
    enc = _enc(10_000, 256, 8, 2)
    parts = C.split(enc, 100)
    assert len(parts) > 1 and all(off % 256 == 0 for off, _ in parts)
    assert torch.equal(torch.cat([C.decode(p) for _, p in parts]), C.decode(enc))
    shapes = {"w": (10_000,)}
    spec = C.CodecSpec(TOPK, 256, 8, 2)
    assert wire.count_parts(shapes, spec, max_part_bytes=100) == len(parts)


def _refused(enc, match=None):
    with pytest.raises(C.CodecError, match=match):
        C.decode(enc)


def _entries(enc):
    """The (chunks, k) entries of an encoding with only full chunks."""
    ib = T.index_bits(enc.block_size)
    return T._unpack(enc.data, enc.count // enc.block_size, enc.topk, ib + enc.bits)


def _with_entries(enc, entries):
    return dataclasses.replace(enc, data=T._pack(entries, T.index_bits(enc.block_size) + enc.bits))


def test_malformed_encodings_are_refused():
    enc = _enc(1024, 256, 8, 2)
    C.decode(enc)
    entries = _entries(enc)
    swapped = entries.clone()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    _refused(_with_entries(enc, swapped), "increasing")
    repeated = entries.clone()
    repeated[1, 1] = repeated[1, 0]
    _refused(_with_entries(enc, repeated), "increasing")
    short = C.encode(_x(300), TOPK, 256, 8, 2)   # a last chunk of 44 values: position 50 is outside it
    ib = T.index_bits(256)
    tail = T._unpack(short.data[T.sizes(256, 256, 8, 2)[0]:], 1, 8, ib + 2)
    tail[0, -1] = (tail[0, -1] & ~((1 << ib) - 1)) | 50
    bad = dataclasses.replace(short, data=short.data[:T.sizes(256, 256, 8, 2)[0]] + T._pack(tail, ib + 2))
    _refused(bad, "outside")
    odd = C.encode(_x(256), TOPK, 256, 3, 2)   # 3 x 10 bits = 30 bits: 2 padding bits must be zero
    _refused(dataclasses.replace(odd, data=odd.data[:-1] + bytes([odd.data[-1] | 0x80])), "padding")
    for kw, says in [({"data": enc.data[:-1]}, "expected"), ({"scales": enc.scales[:-4]}, "scales"),
                     ({"topk": 0}, "topk"), ({"topk": 300}, "topk"), ({"bits": 3}, "bits"),
                     ({"block_size": 32}, "block_size"), ({"block_size": 1 << 17}, "block_size"),
                     ({"scales": b"\0\0\xc0\x7f" + enc.scales[4:]}, "finite")]:
        _refused(dataclasses.replace(enc, **kw), says)
    with pytest.raises(C.CodecError, match="topk and bits"):
        C.validate(dataclasses.replace(C.encode(_x(300), pb.CODEC_INT8), topk=4))


def test_fuzzed_encodings_decode_or_are_refused():
    """Bit flips, truncations, extensions and changed parameters: CodecError or a finite tensor with at most
    topk values per chunk, never another exception."""
    accepted, refused = decoded(_enc(3000, 256, 8, 4), seed=0)
    for enc, y in accepted:
        per_chunk = torch.nn.functional.pad(y, (0, -y.numel() % enc.block_size)).view(-1, enc.block_size)
        assert ((per_chunk != 0).sum(1) <= enc.topk).all()
    assert 200 < refused < 600   # most mutations are caught, some flips only move a value


def _part(enc, name="w", shape=(3000,), offset=0):
    return pb.TensorPart(name=name, shape=list(shape), codec=enc.codec, block_size=enc.block_size, offset=offset,
                         count=enc.count, data=enc.data, scales=enc.scales, topk=enc.topk, bits=enc.bits)


def test_the_coordinator_takes_only_the_runs_topk_parameters():
    run = C.CodecSpec(TOPK, 256, 8, 2)
    ok = C.encode(_x(3000), TOPK, 256, 8, 2)
    for other in (C.encode(_x(3000), TOPK, 256, 256, 8),   # denser: every value, 8 bits
                  C.encode(_x(3000), TOPK, 512, 8, 2), C.encode(_x(3000), TOPK, 256, 8, 4)):
        assembler = wire.PartAssembler({"w": (3000,)}, {run})
        with pytest.raises(wire.WireError, match="not this run's"):
            assembler.add(_part(other))
    assembler = wire.PartAssembler({"w": (3000,)}, {run})
    assembler.add(_part(ok))
    assert torch.equal(assembler.finish()["w"], C.decode(ok))
    first, second = C.encode(_x(3000)[:100], TOPK, 256, 8, 2), C.encode(_x(3000)[100:], TOPK, 256, 8, 2)
    assembler = wire.PartAssembler({"w": (3000,)}, {run})
    assembler.add(_part(first))
    with pytest.raises(wire.WireError, match="multiple of its block_size"):   # many short parts would be denser
        assembler.add(_part(second, offset=100))
    with pytest.raises(wire.WireError, match="topk parameters"):
        wire.PartAssembler({"w": (3000,)}, {TOPK}).add(_part(ok))


def test_error_feedback_sends_everything_eventually_and_decays():
    d = _x(4096, 5)
    ef = C.ErrorFeedback(C.CodecSpec(TOPK, 256, 4, 2))
    sent = torch.zeros_like(d)
    for _ in range(400):
        sent += ef.compress("w", d)[1]
    assert torch.allclose(sent + ef.residuals["w"], 400 * d, rtol=1e-4, atol=1e-3)   # nothing lost
    assert (sent / 400 - d).norm() < 0.1 * d.norm()                             # the mean converges to d
    decayed = C.ErrorFeedback(C.CodecSpec(TOPK, 256, 4, 2), decay=0.5)
    for _ in range(50):
        decayed.compress("w", d)
    assert decayed.residuals["w"].norm() < ef.residuals["w"].norm() / 10   # bounded by ~2 x |d| at decay 0.5
    with pytest.raises(C.CodecError, match="decay"):
        C.ErrorFeedback(pb.CODEC_INT8, decay=1.5)


def test_spec_of_the_run_settings():
    spec = C.CodecSpec.of({"upload_codec": "topk", "topk_chunk": 1024, "topk_density": 0.03, "topk_bits": 1}, "upload")
    assert spec == C.CodecSpec(TOPK, 1024, 31, 1)
    assert C.CodecSpec.of({"download_codec": "int8", "codec_block_size": 128}, "download") == C.CodecSpec(
        pb.CODEC_INT8, 128)
    from fedswarm.run_config import RunConfig

    cfg = RunConfig(upload_codec="topk", download_codec="topk")
    cfg.check()
    assert C.CodecSpec.of(cfg, "download") == C.CodecSpec(TOPK, 4096, 64, 2)
    for bad, says in [({"topk_bits": 3}, "topk-bits"), ({"topk_density": 0}, "topk-density"),
                      ({"topk_chunk": 8}, "topk-chunk"), ({"ef_decay": 1.2}, "ef-decay"),
                      ({"strategy": "sparseloco", "server_momentum": 0.9}, "sparseloco")]:
        with pytest.raises(ValueError, match=says):
            RunConfig(**bad).check()


def test_client_momentum_is_diloco_nesterov_and_restores():
    """Uncompressed, what a client with --client-momentum mu sends is DiLoCo's Nesterov step on its own delta
    (m = mu m + delta; sent delta + mu m), so outer SGD on the mean of the sends is DiLoCo's outer step."""
    mu, deltas = 0.8, [_x(100, s) for s in range(4)]
    ef = C.ErrorFeedback(pb.CODEC_NONE, momentum=mu)
    m = None
    for d in deltas:
        m = d.clone() if m is None else mu * m + d
        assert torch.allclose(ef.compress("w", d)[1], d + mu * m, atol=1e-6)
    snap = ef.snapshot()
    ef.compress("w", deltas[0])
    ef.restore(snap)   # an upload that was not applied moves neither the momentum nor the residual
    assert torch.allclose(ef.momenta["w"], m, atol=1e-6)
    with pytest.raises(C.CodecError, match="momentum"):
        C.ErrorFeedback(pb.CODEC_NONE, momentum=1.0)
    assert C.ErrorFeedback.for_run({"upload_codec": "topk", "client_momentum": 0.8, "ef_decay": 0.9}).momentum == 0.8
