"""`fedswarm sim --mode swarm` end to end: real processes, an injected SIGKILL, report and plots."""
from __future__ import annotations

import json

import pytest

from fedswarm.sim.processes import run_fedswarm

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_swarm_sim_with_a_kill_writes_report(tmp_path):
    out = tmp_path / "sim"
    proc = run_fedswarm(
        "sim", "--mode", "swarm", "--stages", "2", "--peers", "3",
        "--trainers", "1", "--rounds", "2", "--average-every", "5", "--kill-every", "8", "--rejoin-after", "4",
        "--swarm-traffic", "relayed",   # the chained default runs in test_swarm_chain.py and across hosts
        "--seq-len", "64", "--batch-size", "8", "--out", str(out), timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["config"]["mode"] == "swarm" and report["config"]["stages"] == 2
    assert report["config"]["swarm_traffic"] == "relayed"
    sw = report["swarm"]
    assert sw["microbatches_completed"] > 0 and sw["microbatches_lost"] == 0
    assert any(f["kind"] == "SIGKILL" for f in report["faults"]), "the schedule injected no fault"
    assert report["rounds"][-1]["eval_loss"] < report["rounds"][0]["eval_loss"]
    losses = [r["train_loss"] for r in report["rounds"][1:]]
    assert all(loss is not None and 0 < loss < 6 for loss in losses), losses   # trainers' loss per round
    assert report["timeline"] and "peers_per_stage" in report["timeline"][-1]
    for name in ("tokens_per_s.png", "stage_occupancy.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "0 lost" in proc.stdout
