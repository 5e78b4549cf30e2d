"""The low-traffic recipe (examples/low-traffic.toml): the file stays valid for `fedswarm sim` and
`fedswarm coordinator`, its codecs' bound moves 750x fewer bytes than fp32 data-parallel training, and a
real run with it moves deltas both ways that every client reconstructs bit for bit (digests agree, no full copy
after the first), at the codec's arithmetic."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedswarm.app import config_file
from fedswarm.app.cli import build_parser
from fedswarm.run_config import RunConfig
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


def _bytes(spec: C.CodecSpec, shapes: list[int]) -> int:
    """What one update of tensors of these sizes weighs by the codec's arithmetic (data + scales)."""
    block = spec.block_size or C.DEFAULT_BLOCK_SIZE.get(spec.codec, 0)
    return sum(sum(C.expected_sizes(spec.codec, n, block, spec.topk, spec.bits)) for n in shapes)


@pytest.mark.parametrize("command,argv", [("sim", ()), ("coordinator", ("--listen", "127.0.0.1:0", "--state-dir", "state"))])
def test_the_recipe_is_a_valid_run_at_low_traffic(command, argv):
    cfg = _run_config(command, *argv)
    cfg.check()
    assert cfg.strategy == "diloco" and cfg.server_lr and cfg.server_momentum and cfg.inner_optimizer == "muon"
    n = 1 << 20
    per_round = _bytes(C.CodecSpec.of(cfg, "upload"), [n]) + _bytes(C.CodecSpec.of(cfg, "download"), [n])
    allreduce = 2 * 3 / 4 * 4 * n * cfg.local_steps   # fp32 ring all-reduce over 4 workers, per worker
    # by int2z's bound (int2's 2.03 bits a value, before its magnitude bits deflate to about 1.4 in all)
    assert allreduce / per_round > 750


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_run_of_the_recipe_moves_deltas_both_ways(tmp_path):
    from fedswarm.sim.launcher import run_sim

    report = run_sim(_parse("sim", "--out", str(tmp_path), "--quiet", "--precision", "fp32", "--clients", "2",
                            "--rounds", "3", "--local-steps", "3", "--seq-len", "32", "--batch-size", "4",
                            "--eval-windows", "8"), log=lambda *_: None)
    assert report["rejections"] == {}
    rounds = report["rounds"]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    shapes = [t.numel() for t in trainable_state(build_model("gpt2-tiny", seed=0)).values()]
    for direction, first in (("up", 1), ("down", 2)):
        spec = C.CodecSpec.of(report["config"], f"{direction}load")
        arithmetic = _bytes(spec, shapes)   # int2z: its bound; at least a sign bit a value and the scales
        least = sum(-(-n // 8) + 4 * -(-n // 1024) for n in shapes) if C.variable_length(spec.codec) else arithmetic
        for r in rounds[first:]:
            per_client = r[f"bytes_{direction}"] / len(r["clients"])
            assert least <= per_client <= 1.25 * arithmetic + 200 * len(shapes), (direction, per_client, arithmetic)
            # float32 would be this much larger (the codec's ratio, less framing)
            assert r[f"bytes_{direction}_raw"] / r[f"bytes_{direction}"] > 0.8 * 4 * sum(shapes) / arithmetic
    for i in range(2):
        log = (tmp_path / f"client-{i}.log").read_text()
        got = [(int(m[1]), m[2]) for m in LINE.finditer(log)]
        assert got == [(0, "nothing (already held)"), (1, "1 delta step(s)"), (2, "1 delta step(s)")], got
        assert "does not match" not in log   # the delta steps rebuilt the coordinator's weights bit for bit
