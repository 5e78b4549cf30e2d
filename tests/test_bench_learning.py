"""`fedswarm bench learning` end to end on a tiny budget: same tokens for every run, ratios computed from them."""
from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from fedswarm.coordinator.strategies import STRATEGIES
from fedswarm.sim import bench
from fedswarm.sim.bench_learning import plan_runs
from fedswarm.sim.processes import fedswarm_cmd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()   # what `fedswarm bench learning` parses (its kind is a subcommand)
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.which = "learning"
    bench._fill_defaults(args)
    return args


def test_plan_covers_strategies_steps_and_codecs():
    runs = plan_runs(bench_args("--local-steps-list", "10,50", "--codec-list", "int8", "--extra-codecs", "none,int4"))
    expected = ["fedavg", "fedavgm"] + (["diloco"] if "diloco" in STRATEGIES else [])
    assert sorted({r["strategy"] for r in runs}) == sorted(expected)
    assert {(r["local_steps"], r["codec"]) for r in runs if r["strategy"] == "fedavgm"} == {(10, "int8"), (50, "int8")}
    assert {r["codec"] for r in runs if (r["strategy"], r["local_steps"]) == ("fedavg", 10)} == {"int8", "none", "int4"}
    with pytest.raises(ValueError, match="unknown"):
        plan_runs(bench_args("--strategies", "fedavg,nope"))


@pytest.mark.timeout(400)
def test_bench_learning_tiny_budget(tmp_path):
    out = tmp_path / "bench"
    argv = fedswarm_cmd("bench", "learning", "--tokens", "2048", "--clients", "2", "--strategies", "fedavg",
                        "--local-steps-list", "4", "--extra-codecs", "", "--seq-len", "32", "--batch-size", "4",
                        "--precision", "fp32", "--threads", "1", "--out", str(out))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=380, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "bench-learning.json").read_text())
    single, (fed,) = result["single"], result["runs"]
    assert single["clients"] == 1 and single["rounds"] == 4 and fed["clients"] == 2 and fed["rounds"] == 2
    assert single["tokens"] == fed["tokens"] == 2048, "every run trains the same tokens"
    assert fed["loss_vs_single"] == pytest.approx(fed["final_eval_loss"] / single["final_eval_loss"] - 1)
    assert fed["allreduce_over_socket"] > 0 and single["allreduce_over_socket"] is None
    assert "| one process |" in done.stdout and "| fedavg | 2 | 4 x 2 | int8 |" in done.stdout, done.stdout
    assert "largest reduction within 5%" in done.stdout or "no run within 5%" in done.stdout
    assert (out / "loss_vs_bytes.png").read_bytes().startswith(PNG_MAGIC)
