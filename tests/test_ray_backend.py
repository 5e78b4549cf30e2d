"""`fedswarm sim --backend ray`: the virtual-client workers as tasks on a (here: local, loopback-only)
Ray instance started by the sim, against a real coordinator process."""
from __future__ import annotations

import json
import os

import pytest

from fedswarm.sim.processes import run_fedswarm

pytest.importorskip("ray", reason="the optional extra fedswarm[ray] is not installed")


@pytest.mark.integration
@pytest.mark.timeout(450)
def test_ray_backend_runs_sampled_rounds(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = run_fedswarm("sim", "--backend", "ray", "--clients", "20", "--clients-per-round", "4",
                        "--rounds", "2", "--workers", "2", "--local-steps", "5", "--seq-len", "64",
                        "--batch-size", "8", "--out", str(tmp_path), "--quiet", timeout=400, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sim"]["backend"] == "ray" and report["sim"]["workers"] == 2
    assert len(report["clients"]) == 20
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert len(set(r["clients"])) == 4, r
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    assert report["virtual"]["trained"] == 8 and report["virtual"]["finished"] == 20
