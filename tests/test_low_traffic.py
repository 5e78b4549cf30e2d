"""The low-traffic recipe (examples/low-traffic.toml): the file stays valid for `fedswarm sim` and
`fedswarm coordinator`, and a real run with it moves topk deltas both ways that every client reconstructs
bit for bit (digests agree, no full copy after the first), at the codec's arithmetic."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedswarm.app import config_file
from fedswarm.app.cli import build_parser
from fedswarm.coordinator.config import RunConfig
from fedswarm.models import build_model, trainable_state
from fedswarm.proto import codec as C

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "low-traffic.toml"
LINE = re.compile(r"downloaded model version (\d+) as (a full copy|nothing \(already held\)|\d+ delta step\(s\)), (\d+) bytes")


def _parse(command: str, *argv: str):
    """What `fedswarm COMMAND --config examples/low-traffic.toml ARGV` parses."""
    parser = build_parser(only=command)
    config_file.apply(parser.commands[command], command, str(RECIPE))
    return parser.parse_args([command, *argv])


def _run_config(command: str, *argv: str) -> RunConfig:
    args = _parse(command, *argv)
    return RunConfig(**{k: getattr(args, k) for k in RunConfig.__dataclass_fields__ if hasattr(args, k)})


@pytest.mark.parametrize("command,argv", [("sim", ()), ("coordinator", ("--listen", "127.0.0.1:0", "--state-dir", "state"))])
def test_the_recipe_is_a_valid_run(command, argv):
    cfg = _run_config(command, *argv)
    cfg.check()
    assert (cfg.upload_codec, cfg.download_codec) == ("topk", "topk")
    assert cfg.strategy in ("sparseloco", "diloco") and 0 < cfg.ef_decay <= 1
    up = C.CodecSpec.of(cfg, "upload")
    assert 4 * up.block_size / sum(C.expected_sizes(up.codec, up.block_size, up.block_size, up.topk, up.bits)) > 100


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_run_of_the_recipe_moves_sparse_deltas_both_ways(tmp_path):
    from fedswarm.sim.launcher import run_sim

    report = run_sim(_parse("sim", "--out", str(tmp_path), "--quiet", "--precision", "fp32", "--clients", "2",
                            "--rounds", "3", "--local-steps", "3", "--seq-len", "32", "--batch-size", "4",
                            "--eval-windows", "8"), log=lambda *_: None)
    assert report["config"]["upload_codec"] == "topk" and report["rejections"] == {}
    rounds = report["rounds"]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    shapes = [t.numel() for t in trainable_state(build_model("gpt2-tiny", seed=0)).values()]
    spec = C.CodecSpec.of(report["config"], "upload")
    arithmetic = sum(sum(C.expected_sizes(spec.codec, n, spec.block_size, spec.topk, spec.bits)) for n in shapes)
    for r in rounds[1:]:
        per_client = r["bytes_up"] / len(r["clients"])
        assert arithmetic <= per_client <= 1.25 * arithmetic + 200 * len(shapes), (per_client, arithmetic)
        assert r["bytes_up_raw"] / r["bytes_up"] > 50   # float32 updates would be this much larger
    for i in range(2):
        log = (tmp_path / f"client-{i}.log").read_text()
        got = [(int(m[1]), m[2]) for m in LINE.finditer(log)]
        assert got == [(0, "nothing (already held)"), (1, "1 delta step(s)"), (2, "1 delta step(s)")], got
        assert "does not match" not in log   # the topk steps rebuilt the coordinator's weights bit for bit
    served = C.CodecSpec.of(report["config"], "download")   # the mean, at its own density
    arithmetic_down = sum(sum(C.expected_sizes(served.codec, n, served.block_size, served.topk, served.bits))
                          for n in shapes)
    for r in rounds[2:]:
        per_client = r["bytes_down"] / len(r["clients"])
        assert arithmetic_down <= per_client <= 1.25 * arithmetic_down + 200 * len(shapes), (per_client, arithmetic_down)
        assert r["bytes_down_raw"] / r["bytes_down"] > 25   # 1/16 of each chunk at 2 bits + 12-bit positions
