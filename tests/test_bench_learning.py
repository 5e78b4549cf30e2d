"""`fedswarm bench learning` end to end on a tiny budget: same tokens for every run, ratios computed from them."""
from __future__ import annotations

import argparse
import json

import pytest

from fedswarm.sim import bench
from fedswarm.sim.bench_learning import client_batch_size, parse_strategy, plan_runs
from fedswarm.sim.processes import run_fedswarm

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
    assert {r["label"] for r in runs if r["codec"] != "topk"} == {"fedavg", "fedavgm", "diloco", "diloco/0.7/0.8"}
    sparse = {(r["label"], r["local_steps"], r["topk_density"], r["download_topk_density"])
              for r in runs if r["codec"] == "topk"}  # both ways
    assert sparse == {("sparseloco", 25, 1 / 16, 1 / 16), ("sparseloco", 25, 1 / 64, 1 / 64)}
    swept = plan_runs(bench_args("--sparse-strategies", "sparseloco,diloco/0.7/0.8", "--sparse-local-steps", "25,50",
                                 "--sparse-densities", "1/64:0.0625"))
    assert {(r["label"], r["local_steps"], r["topk_density"], r["download_topk_density"])
            for r in swept if r["codec"] == "topk"} == {
        (s, k, 1 / 64, 1 / 16) for s in ("sparseloco", "diloco/0.7/0.8") for k in (25, 50)}
    for bad, match in (("1/0", "not a fraction"), ("two", "not a fraction"), ("1.5", r"\(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            plan_runs(bench_args("--sparse-densities", bad))
    assert not [r for r in plan_runs(bench_args("--sparse-strategies", "")) if r["codec"] == "topk"]
    assert {(r["local_steps"], r["codec"]) for r in runs if r["label"] == "fedavgm"} == {(10, "int8"), (50, "int8")}
    last = [r for r in runs if r["label"] == "diloco/0.7/0.8"]
    assert {r["codec"] for r in last if r["local_steps"] == 10} == {"int8", "none", "int4"}
    assert all((r["strategy"], r["server_lr"], r["server_momentum"]) == ("diloco", 0.7, 0.8) for r in last)
    assert parse_strategy("fedavgm/1.5")["server_lr"] == 1.5 and parse_strategy("fedavg")["server_lr"] is None
    with pytest.raises(ValueError, match="unknown"):
        plan_runs(bench_args("--strategies", "fedavg,nope"))
    with pytest.raises(ValueError, match="must be numbers"):
        parse_strategy("diloco/fast")
    with pytest.raises(ValueError, match="momentum < 1"):
        parse_strategy("diloco/0.7/1.2")
    rows = [r for r in plan_runs(bench_args("--extra-rows", "diloco/0.7/0.8@50@sign,fedavg@10@sign:int2",
                                            "--codec-list", "int4,int4:int2", "--sparse-strategies", ""))]
    assert [(r["label"], r["local_steps"], r["codec"]) for r in rows[-2:]] == [
        ("diloco/0.7/0.8", 50, "sign"), ("fedavg", 10, "sign:int2")]
    assert {r["codec"] for r in rows if r["label"] == "fedavg" and r["local_steps"] == 25} == {"int4", "int4:int2"}
    muon = plan_runs(bench_args("--extra-rows", "diloco/0.7/0.8@50@int2@muon", "--sparse-strategies", ""))[-1]
    assert (muon["label"], muon["local_steps"], muon["codec"], muon["inner_optimizer"]) == (
        "diloco/0.7/0.8", 50, "int2", "muon")
    for flags, match in ((("--extra-rows", "diloco@fifty@sign"), "STRATEGY@LOCAL_STEPS@CODEC"),
                         (("--extra-rows", "diloco@50@int2@lion"), "optimizers"),
                         (("--extra-rows", "diloco@50@int3"), "int3"), (("--codec-list", "int4:int9"), "int9"),
                         (("--codec-list", "int4:int4:int4"), "UP:DOWN")):
        with pytest.raises(ValueError, match=match):
            plan_runs(bench_args(*flags))
    assert client_batch_size(bench_args()) == 3   # 12 sequences over 4 clients
    assert client_batch_size(bench_args("--client-batch-size", "5")) == 5
    with pytest.raises(ValueError, match="does not split over --clients 4"):
        client_batch_size(bench_args("--batch-size", "10"))


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_bench_learning_tiny_budget(tmp_path):
    out = tmp_path / "bench"
    done = run_fedswarm("bench", "learning", "--tokens", "1024", "--clients", "2", "--strategies", "fedavg",
                        "--local-steps-list", "4", "--codec-list", "int8", "--extra-codecs", "", "--sparse-strategies", "",
                        "--extra-rows", "fedavg@4@int8@muon", "--seq-len", "32", "--batch-size", "4", "--precision", "fp32", "--threads", "1",
                        "--out", str(out), timeout=380)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "bench-learning.json").read_text())
    single, (fed, muon) = result["single"], result["runs"]
    # a row with its own inner optimizer is measured against a one process with that optimizer
    assert set(result["singles"]) == {"adamw", "muon"} and muon["inner_optimizer"] == "muon"
    assert muon["loss_vs_single"] == pytest.approx(
        muon["final_eval_loss"] / result["singles"]["muon"]["final_eval_loss"] - 1)
    assert result["singles"]["muon"]["final_eval_loss"] != single["final_eval_loss"]
    assert "| one process (muon) |" in done.stdout and "| fedavg (muon) | 2 x 2 | 4 x 2 | int8 |" in done.stdout
    # the one process's batch of 4 splits as data-parallel training splits it: 2 clients of 2, same steps
    assert (single["clients"], single["batch_size"], single["rounds"]) == (1, 4, 2)
    assert (fed["clients"], fed["batch_size"], fed["rounds"]) == (2, 2, 2)
    assert single["tokens"] == fed["tokens"] == 1024, "every run trains the same tokens"
    assert fed["loss_vs_single"] == pytest.approx(fed["final_eval_loss"] / single["final_eval_loss"] - 1)
    assert fed["allreduce_over_socket"] > 0 and single["allreduce_over_socket"] is None
    assert fed["socket_bytes"] == fed["socket_bytes_up"] + fed["socket_bytes_down"] and fed["socket_bytes_down"] > 0
    assert 1 <= fed["socket_bytes_up"] / fed["codec_bytes_up"] < 2   # int8 payloads + framing, heartbeats, polls
    assert "| one process |" in done.stdout and "| fedavg | 2 x 2 | 4 x 2 | int8 |" in done.stdout, done.stdout
    assert "largest reduction within 5%" in done.stdout or "no run within 5%" in done.stdout
    assert (out / "loss_vs_bytes.png").read_bytes().startswith(PNG_MAGIC)
