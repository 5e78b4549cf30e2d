"""Virtual clients: many real sessions per worker process (sim/virtual.py), sampled rounds, and the
data partitions a thousand clients need. The simulations run real coordinator and worker processes
on 127.0.0.1 through the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedswarm.run_config import RunConfig
from fedswarm.coordinator.grid import SessionGrid
from fedswarm.coordinator.strategies import build_strategy
from fedswarm.data import load_train_tokens
from fedswarm.sim.processes import run_fedswarm
from fedswarm.sim.virtual import _roll

SMALL = ["--local-steps", "5", "--seq-len", "64", "--batch-size", "8"]


def run_sim(out, *args: str, timeout: float = 400) -> dict:
    proc = run_fedswarm("sim", "--out", str(out), "--quiet", *SMALL, *args, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "report.json").read_text())


def test_more_partitions_than_groups_cut_the_train_stream():
    n = 1000  # the standard library has ~180 train groups
    pieces = [load_train_tokens("stdlib", i, n) for i in (0, 1, 500, 999)]
    assert all(len(p) >= 129 for p in pieces)   # one window of the default seq_len, at least
    sizes = {len(p) for p in pieces}
    assert max(sizes) - min(sizes) <= 2          # equal cuts (a separator byte may differ)
    assert not np.array_equal(pieces[0][:64], pieces[1][:64])
    # the cuts are contiguous: piece 0 and piece 1 of a 500-way split cover piece 0 of the 1000-way one
    assert np.array_equal(load_train_tokens("stdlib", 0, 500)[:len(pieces[0])], pieces[0])
    with pytest.raises(ValueError, match="partition 1000/1000"):
        load_train_tokens("stdlib", 1000, n)




def test_clients_per_round_samples_k_distinct_connected_nodes(task_identity):
    nodes = list(range(1, 21))
    strategy = build_strategy(RunConfig(min_clients=20, clients_per_round=4))
    grid = SessionGrid(7, live_nodes=lambda: nodes)
    arrays = ArrayRecord(torch_state_dict={"w": torch.zeros(3)})
    for rnd in (1, 2):
        sent = list(strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), grid))
        targets = [m.metadata.dst_node_id for m in sent]
        assert len(targets) == 4 and len(set(targets)) == 4 and set(targets) <= set(nodes)
    with pytest.raises(ValueError, match="clients-per-round"):
        RunConfig(clients_per_round=-1).check()


@pytest.mark.slow   # virtual clients on two workers, sampled: also test_dropouts_leave_and_stragglers_still_count
@pytest.mark.timeout(450)
def test_forty_virtual_clients_on_two_workers(tmp_path):
    report = run_sim(tmp_path, "--clients", "40", "--clients-per-round", "4", "--rounds", "2", "--workers", "2")
    assert report["sim"]["virtual"] and report["sim"]["workers"] == 2
    assert len(report["clients"]) == 40   # every virtual client held its own session to the end
    assert len({c["id"] for c in report["clients"]}) == 40
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert len(r["clients"]) == 4 and len(set(r["clients"])) == 4, r
        assert all(name.startswith("v00") for name in r["clients"])
        assert math.isfinite(r["eval_loss"]) and r["bytes_up"] > 0
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    v = report["virtual"]
    assert v["trained"] == 8 and v["finished"] == 40 and v["dropped"] == [] and v["lost_leases"] == 0
    assert (tmp_path / "worker-0.log").exists() and (tmp_path / "worker-1.log").exists()


@pytest.mark.integration
@pytest.mark.timeout(450)
def test_dropouts_leave_and_stragglers_still_count(tmp_path):
    # 6 clients, 4 sampled, and (seed 1) clients 0, 2 and 4 leave when sampled in round 1: any sample
    # holds 1 to 3 of them, so round 1 commits with the others, once each dropout's lease ran out.
    seed, clients = 1, 6
    would_drop = {f"v{i:04d}" for i in range(clients) if _roll(seed, i, 1, "dropout") < 0.5}
    assert would_drop == {"v0000", "v0002", "v0004"}
    report = run_sim(tmp_path, "--clients", str(clients), "--clients-per-round", "4", "--rounds", "1",
                     "--workers", "2", "--seed", str(seed), "--dropout-rate", "0.5",
                     "--straggler-rate", "1", "--straggler-delay", "1", "--lease", "6")
    v = report["virtual"]
    assert 1 <= len(v["dropped"]) <= 3 and set(v["dropped"]) <= would_drop
    (r1,) = [r for r in report["rounds"] if r["round"] == 1]
    assert not set(r1["clients"]) & set(v["dropped"])        # a client that left never reported
    assert len(r1["clients"]) == 4 - len(v["dropped"]) == v["trained"]
    assert v["stragglers"] == v["trained"]                    # late uploads were still accepted
    assert v["finished"] == clients - len(v["dropped"])
    assert {c["name"] for c in report["clients"]} == {f"v{i:04d}" for i in range(clients)} - set(v["dropped"])


def _held(version: int, mib: float, steps: int = 0):
    from fedswarm.client.daemon import Held

    state = {"w": torch.zeros(int(mib * (1 << 20)) // 4)}
    return Held(version, state, bytes([version]) * 32, steps=steps, wire_bytes=1)


def test_a_worker_keeps_versions_for_its_clients_within_its_budget():
    from fedswarm.sim.version_cache import VersionCache

    cache = VersionCache(budget_bytes=2 << 20)      # two 1 MiB versions
    first = cache.downloaded(0, _held(1, 1))
    assert cache.downloaded(1, _held(1, 1)).state is not first.state   # the caller keeps what it downloaded ...
    assert cache.held(1).state is first.state                          # ... the cache one copy per version
    cache.downloaded(0, _held(2, 1, steps=1))
    assert cache.held(0).version == 2           # (1 is now the least recently used)
    cache.downloaded(2, _held(3, 1, steps=1))       # a third version: the least recently used (1) goes
    assert cache.held(1) is None and cache.held(0).version == 2 and cache.held(2).version == 3
    assert (cache.stats.full, cache.stats.deltas, cache.stats.evicted) == (2, 2, 1)
    none = VersionCache(budget_bytes=0)             # no budget: every client holds nothing, every download full
    none.downloaded(0, _held(1, 1))
    assert none.held(0) is None


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_virtual_clients_download_deltas_from_the_version_they_hold(tmp_path):
    report = run_sim(tmp_path, "--clients", "3", "--workers", "1", "--rounds", "2", "--download-codec", "int8")
    v = report["virtual"]
    assert (v["downloads_full"], v["downloads_delta"]) == (3, 3), v   # round 1 full copies, round 2 deltas
    r1, r2 = [r for r in report["rounds"] if r["round"] in (1, 2)]
    assert 0 < r2["bytes_down"] < 0.3 * r1["bytes_down"], (r1["bytes_down"], r2["bytes_down"])
    assert r2["eval_loss"] < r1["eval_loss"]
