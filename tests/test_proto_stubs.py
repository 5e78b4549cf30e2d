"""The checked-in protobuf/gRPC stubs match proto/fedswarm.proto, and every Codec value has a codec."""
import subprocess
import sys
from pathlib import Path

import pytest

import fedswarm.proto.fedswarm_pb2 as pb
from fedswarm.proto import codec as C

PROTO_DIR = Path(__file__).resolve().parents[1] / "src" / "fedswarm" / "proto"
STUBS = ("fedswarm_pb2.py", "fedswarm_pb2.pyi", "fedswarm_pb2_grpc.py")


def test_stubs_are_regenerated_byte_identical(tmp_path):
    pytest.importorskip("grpc_tools", reason="needs the dev extra (grpcio-tools)")
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, str(PROTO_DIR / "generate.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in STUBS:
        fresh, checked_in = (out / name).read_bytes(), (PROTO_DIR / name).read_bytes()
        assert fresh, f"generate.py wrote an empty {name}"
        assert fresh == checked_in, f"proto/{name} is stale: run `python src/fedswarm/proto/generate.py` and commit the result"
    # --out gets exactly the three stubs (nothing stray that a copy-back would commit)
    assert sorted(p.name for p in out.iterdir()) == sorted(STUBS)


def test_every_codec_enum_value_has_a_codec():
    enum_values = sorted(pb.Codec.values())
    assert enum_values, "the Codec enum is empty"
    assert sorted(C.CODEC_NAMES.values()) == enum_values  # one name per value, no value left out
    for name, value in C.CODEC_NAMES.items():
        assert C.codec_by_name(name) == value
        assert C.codec_name(value) == name
