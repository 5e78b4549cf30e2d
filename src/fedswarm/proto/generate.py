"""Regenerate the protobuf/gRPC stubs from proto/fedswarm.proto.

Run `python src/fedswarm/proto/generate.py` after editing the .proto (needs the `dev`
extra: grpcio-tools). The stubs are checked in; tests/test_proto_stubs.py
fails when they are stale. `--out DIR` writes elsewhere (used by that test).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("fedswarm_pb2.py", "fedswarm_pb2.pyi", "fedswarm_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile fedswarm.proto so that the stubs import as `fedswarm.proto.*`."""
    from grpc_tools import protoc  # dev extra

    with tempfile.TemporaryDirectory() as tmp:
        src_root = Path(tmp) / "src"
        pkg = src_root / "fedswarm" / "proto"
        pkg.mkdir(parents=True)
        shutil.copy(HERE / "fedswarm.proto", pkg / "fedswarm.proto")
        gen = Path(tmp) / "gen"
        gen.mkdir()
        include = str(Path(protoc.__file__).parent / "_proto")
        rc = protoc.main([
            "protoc", f"-I{src_root}", f"-I{include}",
            f"--python_out={gen}", f"--pyi_out={gen}", f"--grpc_python_out={gen}",
            "fedswarm/proto/fedswarm.proto",
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in OUTPUTS:
            target = out_dir / name
            shutil.copy(gen / "fedswarm" / "proto" / name, target)
            written.append(target)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
