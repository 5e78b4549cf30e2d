"""`fedswarm bench load` smoke test: 20 sessions against a real coordinator for ~10 s."""
from __future__ import annotations

import json

import pytest

from fedswarm.sim.processes import run_fedswarm


@pytest.mark.integration
@pytest.mark.timeout(450)
def test_bench_load_holds_twenty_sessions(tmp_path):
    proc = run_fedswarm("bench", "load", "--clients", "20", "--seconds", "10", "--clients-per-round", "4",
                        "--out", str(tmp_path), timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "| sessions | held (min / end)" in proc.stdout
    (row,) = json.loads((tmp_path / "load.json").read_text())
    assert row["sessions"] == 20 and row["joined"] == 20
    assert row["members_min"] == 20 and row["members_end"] == 20 and row["lost_leases"] == 0
    assert row["heartbeats"] > 0 and row["heartbeat_p50_ms"] is not None
    assert row["status_calls"] >= 5 and row["status_p99_ms"] < 1000
    assert row["uploads"] > 0 and row["rounds_per_min"] > 0     # sampled rounds commit under the load
    assert row["coordinator_rss_mb"] > 0 and row["holds"]


@pytest.mark.integration
def test_bench_load_refuses_bad_counts(tmp_path):
    proc = run_fedswarm("bench", "load", "--clients", "ten", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "--clients 'ten'" in proc.stderr
