"""Prometheus metrics (`--metrics-port`) scraped from a real coordinator and client during a short run."""
from __future__ import annotations

import pytest

import re
import urllib.request

from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status, run_fedswarm, wait_until

METRICS_AT = re.compile(r"metrics on http://(\S+:\d+)/metrics")
SMALL = ["--seq-len", "64", "--batch-size", "8", "--local-steps", "3"]


def scrape(address: str) -> dict[str, float]:
    """name{labels} -> value for every sample line."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.mark.integration
def test_metrics_move_during_a_run(tmp_path):
    args = ["--rounds", "3", "--min-clients", "1", "--metrics-port", "0", *SMALL]
    with coordinator_process(tmp_path, ["--state-dir", str(tmp_path / "state"), *args]) as (coord, address):
        coord_metrics = coord.wait_for_line(METRICS_AT, 30).group(1)
        wait_until("round 0 (the initial model) evaluated", lambda: fetch_status(address)["rounds"], 120, watch=[coord])
        before = scrape(coord_metrics)
        assert before["fedswarm_round"] == 0
        assert before['fedswarm_clients_connected{role="client"}'] == 0
        client = Proc("client-0", fedswarm_cmd("client", "--coordinator", address, "--name", "c0", "--threads", "1",
                                               "--device", "cpu", "--metrics-port", "0"), tmp_path / "client-0.log")
        try:
            client_metrics = client.wait_for_line(METRICS_AT, 60).group(1)
            wait_until("round 2 committed", lambda: fetch_status(address)["round"] >= 2, 240, watch=[coord, client])
            during = scrape(coord_metrics)
            own = scrape(client_metrics)
            wait_until("the last round", lambda: fetch_status(address)["state"] == "done", 240, watch=[coord])
            after = scrape(coord_metrics)
        finally:
            client.stop()
    assert before["fedswarm_round"] == 0 < 2 <= during["fedswarm_round"] <= after["fedswarm_round"] == 3
    assert during['fedswarm_clients_connected{role="client"}'] == 1
    assert during["fedswarm_round_duration_seconds_count"] >= 2 and during["fedswarm_round_duration_seconds_sum"] > 0
    assert 0 < after["fedswarm_eval_loss"] < before["fedswarm_eval_loss"]
    assert after["fedswarm_upload_bytes_total"] >= during["fedswarm_upload_bytes_total"] > 0
    assert during["fedswarm_download_bytes_total"] > 0
    assert own["fedswarm_client_rounds_total"] >= 1
    assert own["fedswarm_client_tokens_total"] == own["fedswarm_client_rounds_total"] * 3 * 8 * 64
    assert own["fedswarm_client_tokens_per_second"] > 0 and own["fedswarm_client_upload_seconds_count"] >= 1
    assert own["fedswarm_client_upload_bytes_total"] > 0


@pytest.mark.integration
def test_a_metrics_port_in_use_is_a_clear_error(tmp_path):
    import socket
    
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_fedswarm("client", "--coordinator", "127.0.0.1:1", "--metrics-port", str(port), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr and "--metrics-port" in proc.stderr


def test_coordinator_counters_cover_every_round_not_only_those_status_lists():
    from fedswarm.coordinator.status import StatusLimits
    from fedswarm.metrics import coordinator_registry
    from fedswarm.sim.bench_status import build_service, old_run

    rounds = old_run(300, 3)
    service = build_service(rounds, 12, limits=StatusLimits(recent_rounds=5, clients=4))
    try:
        registry = coordinator_registry(service.status_dict)
        value = lambda name, **labels: registry.get_sample_value(name, labels or None)  # noqa: E731
        assert len(service.status_dict()["rounds"]) == 5
        assert value("fedswarm_round") == 300
        assert value("fedswarm_round_duration_seconds_count") == 300
        assert value("fedswarm_upload_bytes_total") == sum(r["bytes_up"] for r in rounds)
        assert value("fedswarm_tokens_total") == sum(r["tokens"] for r in rounds)
        assert value("fedswarm_clients_connected", role="client") == 12   # every session, not the 4 listed
    finally:
        service.members.close()
