"""The int2z codec: int2's values bit for bit at about 1.3-1.6 bits a value, its variable length through
split / join / part counts, and every hostile stream refused (bombs, trailing bytes, cut streams, padding)."""
import dataclasses
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

import fedswarm.proto.fedswarm_pb2 as pb
from fedswarm.proto import codec as C
from fedswarm.proto import int2z as Z
from fedswarm.proto import wire

INT2, INT2Z = pb.CODEC_INT2, pb.CODEC_INT2Z


def _x(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3) * 4


def _inputs():
    yield _x(5000, 1)
    yield torch.randn(1 << 16, generator=torch.Generator().manual_seed(2))
    yield torch.zeros(3000)                      # scale 0: every value +0
    yield torch.full((1031,), -2.5)              # every value outer
    yield torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 1.5, -1.5, 1.4999])
    yield torch.zeros(0)


@pytest.mark.parametrize("bs", [64, 1024, 4096])
def test_decodes_exactly_as_int2(bs):
    for x in _inputs():
        a, z = C.encode(x, INT2, bs), C.encode(x, INT2Z, bs)
        assert z.scales == a.scales and z.block_size == a.block_size == bs
        assert torch.equal(C.decode(z), C.decode(a))
        assert len(z.data) <= C.expected_sizes(INT2Z, x.numel(), bs)[0]


def test_bits_a_value_on_gaussian_deltas():
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(3))   # about 10 % outer at |v|max scales
    enc = C.encode(x, INT2Z)
    bits = 8 * (len(enc.data) + len(enc.scales)) / x.numel()
    assert 1.3 < bits < 1.6, bits          # int2: 2.03
    assert len(enc.data) + len(enc.scales) < 0.8 * sum(C.expected_sizes(INT2, x.numel(), 1024))


def test_bound_holds_for_an_incompressible_magnitude_plane():
    g = torch.Generator().manual_seed(4)
    n = 1 << 17
    x = torch.where(torch.rand(n, generator=g) < 0.5, 0.9, 0.1) * torch.sign(torch.randn(n, generator=g))
    x[::1024] = 1.0                        # each block's scale 1: half the values outer, at random
    enc = C.encode(x, INT2Z)
    assert n / 8 * 2 < len(enc.data) <= Z.sizes(n, 1024)[0] == C.expected_sizes(INT2Z, n, 1024)[0]
    assert torch.equal(C.decode(enc), C.decode(C.encode(x, INT2)))


def test_split_and_join_keep_every_value():
    x = _x(10_000, 5)
    enc = C.encode(x, INT2Z, 64)
    parts = C.split(enc, 300)
    assert len(parts) == wire.count_parts({"w": (10_000,)}, INT2Z, 64, max_part_bytes=300) > 1
    assert all(off % 64 == 0 and len(p.data) + len(p.scales) <= 300 for off, p in parts)
    assert torch.equal(torch.cat([C.decode(p) for _, p in parts]), C.decode(enc))
    joined = C.join([p for _, p in parts])   # pieces encoded apart join into the whole tensor's bytes
    assert (joined.data, joined.scales, joined.count) == (enc.data, enc.scales, enc.count)
    pieces = [C.encode(x[i:i + 1024], INT2Z, 64) for i in range(0, 10_000, 1024)]
    assert C.join(pieces).data == enc.data


def _with_stream(enc, stream):
    return dataclasses.replace(enc, data=enc.data[:-(-enc.count // 8)] + stream)


def _refused(enc, match):
    with pytest.raises(C.CodecError, match=match):
        C.decode(enc)


def test_hostile_streams_are_refused():
    enc = C.encode(_x(3001, 6), INT2Z, 64)   # 3001 values: 376-byte planes, the last byte with padding
    plane = zlib.decompress(enc.data[376:])
    stream = enc.data[376:]
    _refused(_with_stream(enc, zlib.compress(plane + b"\0")), "more than")
    _refused(_with_stream(enc, zlib.compress(plane[:-1])), "375 bytes, not")
    _refused(_with_stream(enc, stream + b"\0"), "1 bytes follow")
    _refused(_with_stream(enc, stream + zlib.compress(b"")), "bytes follow")
    _refused(_with_stream(enc, stream[:-1]), "cut short")
    _refused(_with_stream(enc, stream[:2]), "cut short")
    _refused(_with_stream(enc, b""), "cut short")
    _refused(_with_stream(enc, stream[:-1] + bytes([stream[-1] ^ 1])), "not a valid zlib stream")
    _refused(_with_stream(enc, b"\x78\x9c" + bytes(40)), "not a valid zlib stream|cut short")
    _refused(_with_stream(enc, zlib.compress(plane[:-1] + bytes([plane[-1] | 0x80]))), "magnitude plane must be zero")
    _refused(dataclasses.replace(enc, data=enc.data[:375] + bytes([enc.data[375] | 0x80]) + stream), "sign plane must")
    _refused(dataclasses.replace(enc, data=enc.data[:300]), "shorter than the 376-byte sign plane")
    _refused(dataclasses.replace(enc, data=enc.data + bytes(C.expected_sizes(INT2Z, 3001, 64)[0])), "at most")
    _refused(dataclasses.replace(enc, scales=np.array([1, -1] + [1] * 45, "<f4").tobytes()), ">= 0")
    _refused(dataclasses.replace(enc, scales=b"\0\0\xc0\x7f" + enc.scales[4:]), "finite")


def _bomb(mib: int) -> bytes:
    """A zlib stream of `mib` MiB of zeros (about 1 KiB a MiB), made without holding them."""
    z, zeros = zlib.compressobj(9), bytes(1 << 20)
    return b"".join(z.compress(zeros) for _ in range(mib)) + z.flush()


def test_a_bomb_is_never_inflated():
    bomb = _bomb(64)
    n = 8 * len(bomb)   # a count whose bound admits the bomb
    enc = C.Encoded(INT2Z, n, 1024, bytes(n // 8) + bomb, bytes(4 * -(-n // 1024)))
    C.validate(enc)
    tracemalloc.start()
    try:
        _refused(enc, "more than")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(enc.data) < (16 << 20)   # the plane's length was inflated at most, not 64 MiB
    part = pb.TensorPart(name="w", shape=[n], codec=INT2Z, block_size=1024, count=n, data=enc.data, scales=enc.scales)
    with pytest.raises(wire.WireError, match="more than"):
        wire.PartAssembler({"w": (n,)}, {INT2Z}).add(part)


def test_error_feedback_and_settings_take_int2z():
    d = _x(4096, 7)
    ef, ef2 = C.ErrorFeedback(INT2Z), C.ErrorFeedback(INT2)
    for _ in range(5):
        (_, a), (_, b) = ef.compress("w", d), ef2.compress("w", d)
        assert torch.equal(a, b) and torch.equal(ef.residuals["w"], ef2.residuals["w"])
    assert C.CodecSpec.of({"upload_codec": "int2z", "codec_block_size": None}, "upload") == C.CodecSpec(INT2Z)
