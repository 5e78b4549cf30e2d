"""Sampled rounds with real processes: 4 connected clients, --clients-per-round 2.

Each round trains exactly 2 of them (Flower's own sampler, seeded per round);
over the rounds more than 2 distinct clients train, and the ones not sampled
stay members (they just long-poll) until the run is done.
"""
from __future__ import annotations

import pytest

from fedswarm.sim.processes import client_processes, coordinator_process, fetch_status, wait_until

ROUNDS, CLIENTS, K = 4, 4, 2


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_each_round_trains_k_of_the_connected(tmp_path):
    args = ["--state-dir", str(tmp_path / "state"), "--rounds", str(ROUNDS), "--min-clients", str(CLIENTS),
            "--clients-per-round", str(K), "--local-steps", "5", "--seq-len", "64", "--batch-size", "8"]
    with coordinator_process(tmp_path, args) as (coordinator, address):
        with client_processes(tmp_path, address, CLIENTS) as clients:
            members_seen = []

            def done():
                status = fetch_status(address)
                if status["round"] >= 1 and status["state"] != "done":
                    members_seen.append(len(status["clients"]))
                return status["state"] == "done" and status
            final = wait_until("the sampled run to finish", done, 240, watch=[coordinator, *clients])
            for client in clients:
                assert client.popen.wait(timeout=60) == 0
    rounds = [r for r in final["rounds"] if r["round"] > 0]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(len(r["clients"]) == K for r in rounds), [r["clients"] for r in rounds]
    used = {name for r in rounds for name in r["clients"]}
    assert len(used) > K, f"the sampler kept picking the same clients: {used}"
    assert members_seen and min(members_seen) == CLIENTS, "clients not sampled stayed connected"
    assert sum(c["rounds_done"] for c in final["clients"]) == K * ROUNDS
    assert final["config"]["clients_per_round"] == K
