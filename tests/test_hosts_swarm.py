"""Across hosts: every process on its own network namespace host (sim/hosts.py), talking over real addresses.

A TLS + --authorized-keys federated run with the coordinator and 3 clients on 4 hosts; a swarm with the
coordinator, 5 peers, 1 trainer and an intruder on 8 hosts: the intruder (who never joined) gets nothing
served, draws no routing and cannot hide a stage; the swarm trains, heals after a replica is SIGKILLed and
after the only peer of a stage loses its link, and loses no micro-batch.
"""
from __future__ import annotations

import functools
import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from fedswarm.sim.hosts import HostNetwork, probe
from fedswarm.sim.processes import READY, fedswarm_cmd, fetch_status, run_fedswarm, wait_until

REASON = probe()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces here: {REASON}")
SMALL = ["--seq-len", "64", "--batch-size", "8"]
INTRUDER = str(Path(__file__).with_name("swarm_intruder.py"))
_until = functools.partial(wait_until, clean_exit_ok=False)


def _coordinator(net: HostNetwork, out: Path, args: list[str], tls_ca: str | None = None, key: str | None = None):
    """The coordinator on host 0; returns (proc, its address on the host network, a status function).
    `key`: the key that signs Status in an authenticated run."""
    ip = net.hosts[0].ip
    proc = net.start(0, "coordinator", fedswarm_cmd("coordinator", "--listen", f"{ip}:0", "--p2p-host", ip, *args),
                     out / "coordinator.log")
    address = proc.wait_for_line(READY, 120).group(1)
    relayed = net.forward(0, int(address.rsplit(":", 1)[1]))   # the test process reaches host 0 through this
    return proc, address, lambda: fetch_status(relayed, tls_ca=tls_ca, key=key)


@pytest.mark.integration
def test_tls_federated_run_across_four_hosts(tmp_path):
    with HostNetwork(4) as net:
        keys = tmp_path / "keys"
        done = run_fedswarm("keygen", str(keys), "--clients", "3", "--hosts", f"{net.hosts[0].ip},127.0.0.1")
        assert done.returncode == 0, done.stderr
        ca = str(keys / "ca.pem")
        coord, address, status = _coordinator(net, tmp_path, [
            "--state-dir", str(tmp_path / "state"), "--rounds", "2", "--min-clients", "3", "--local-steps", "2", *SMALL,
            "--tls-cert", str(keys / "server.pem"), "--tls-key", str(keys / "server.key"),
            "--authorized-keys", str(keys / "authorized_keys")], tls_ca=ca, key=str(keys / "client-0.key"))
        assert address.startswith(net.hosts[0].ip + ":")
        clients = [net.start(i + 1, f"c{i}", fedswarm_cmd(
            "client", "--coordinator", address, "--name", f"c{i}", "--partition", f"{i}/3", "--threads", "1",
            "--tls-ca", ca, "--key", str(keys / f"client-{i}.key")), tmp_path / f"c{i}.log") for i in range(3)]
        seen = _until("3 clients joined", lambda: len((s := status())["clients"]) == 3 and s, 120, [coord])
        assert sorted(c["address"] for c in seen["clients"]) == sorted(h.ip for h in net.hosts[1:])
        final = wait_until("the run done", lambda: (s := status())["state"] == "done" and s, 300, [coord, *clients])
        assert [r["round"] for r in final["rounds"]] == [0, 1, 2]
        assert all(sorted(r["clients"]) == ["c0", "c1", "c2"] for r in final["rounds"][1:])
        assert final["rounds"][-1]["eval_loss"] < final["rounds"][0]["eval_loss"]


def _stage_of(sw: dict, name: str) -> int | None:
    return next((s["stage"] for s in sw["stages"] if name in s["peers"]), None)


def _recovery(status, fault, deadline_s: float, watch) -> float:
    """Run `fault()`; seconds until a micro-batch completes after it (judged against the trainer's first
    heartbeat after the fault, as tests/test_swarm.py does on loopback; an upper bound)."""
    fault()
    t_fault = time.monotonic()

    def first_beat_after():
        s = status()
        seen = next(c["seen_s_ago"] for c in s["clients"] if c["name"] == "t0")
        return time.monotonic() - seen > t_fault + 0.02 and [s["swarm"]["microbatches_completed"]]
    baseline = _until("a trainer heartbeat after the fault", first_beat_after, 10, watch, poll_s=0.02)[0]
    _until("a micro-batch after the fault", lambda: status()["swarm"]["microbatches_completed"] > baseline,
           deadline_s, watch, poll_s=0.02)
    return time.monotonic() - t_fault


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_swarm_across_hosts_admits_only_members_and_heals(tmp_path):
    with HostNetwork(8) as net:   # 0 coordinator, 1-5 peers, 6 trainer, 7 intruder
        coord, address, status = _coordinator(net, tmp_path, [
            "--state-dir", str(tmp_path / "state"), "--mode", "swarm", "--stages", "3", "--rounds", "50",
            "--average-every", "5", *SMALL])
        bootstrap = re.search(r"swarm bootstrap peers: (.+)", coord.output()).group(1).split()
        assert all(f"/ip4/{net.hosts[0].ip}/" in m for m in bootstrap), bootstrap

        def client(host: int, name: str, *extra: str):
            argv = fedswarm_cmd("client", "--coordinator", address, "--name", name, "--threads", "1",
                                "--p2p-host", net.hosts[host].ip, *extra)
            return net.start(host, name, argv, tmp_path / f"{name}.log")
        run_id = status()["run_id"]

        def intrude(mode: str):   # a process on host 7 that never joined
            return net.start(7, f"intruder-{mode}", [sys.executable, INTRUDER, mode, run_id, net.hosts[7].ip, "3",
                                                     *bootstrap], tmp_path / f"intruder-{mode}.log")
        # all five start at once; each joins the stage with the fewest peers, so stages 0 and 1 get two, stage 2 one
        peers = {f"p{i}": client(i + 1, f"p{i}", "--role", "peer") for i in range(5)}
        calls = intrude("calls")   # for step 1, started now: it waits for the peers' records itself
        host_of = {f"p{i}": i + 1 for i in range(5)}
        watch = [coord, *peers.values()]
        placed = _until("five peers serving", lambda: (sw := status()["swarm"]) and sum(
            len(s["peers"]) for s in sw["stages"]) == 5 and {s["stage"]: sorted(s["peers"]) for s in sw["stages"]},
            120, watch)
        assert [len(placed[s]) for s in range(3)] == [2, 2, 1], placed
        replica, only = placed[0][1], placed[2][0]   # a stage-0 replica to SIGKILL; stage 2's only peer to cut off

        # 1. An intruder that never joined calls a peer of every stage: nothing is served, no weight moves.
        outcomes = json.loads(calls.wait_for_line(re.compile(r"^\[.*\]$", re.M), 120).group(0))
        refused = ("not a member of this run", "not a trainer of this run")   # before / after reading the request
        assert len(outcomes) == 6 and all(any(r in o for r in refused) for o in outcomes), outcomes
        fake = intrude("records")   # for step 2, started now: its start-up overlaps the checks and the trainer's
        sw = _until("the refusals reported", lambda: (s := status()["swarm"])["refused"].get("not_member", 0) >= 6
                    and s, 30, watch)
        assert all(s["optimizer_steps"] == 0 for s in sw["stages"]), sw["stages"]

        # 2. A member trainer trains while the intruder announces a 1e300-throughput replica of every stage and
        #    tries to bury stage 2's records under junk of one-year expiry (the honest peers' signed subkeys
        #    refuse it; under bare peer ids it is ignored): it draws no call, stage 2 stays served.
        trainer = client(6, "t0", "--role", "trainer", "--inflight", "1")
        watch.append(trainer)
        fake.wait_for_line(re.compile(r"calls 0"), 120)
        at_fake = status()["swarm"]["microbatches_completed"]
        _until("15 micro-batches beside the fake records",
               lambda: status()["swarm"]["microbatches_completed"] >= at_fake + 15, 180, watch)
        reports = re.findall(r"calls (\d+)", fake.output())
        assert reports and int(reports[-1]) == 0, fake.output()[-500:]
        refused = _until("the ignored records reported", lambda: (r := status()["swarm"]["refused"]).get(
            "record_not_member", 0) >= 1 and r.get("record_unsigned", 0) >= 1 and r, 30, watch)
        print("\nrefused:", refused)

        # 3. SIGKILL a replica of stage 0: the trainer replays on the other one.
        watch.remove(peers[replica])
        killed = _recovery(status, lambda: peers[replica].signal(signal.SIGKILL), 30, watch)
        print(f"recovery after SIGKILL of a replica on another host: {killed:.2f} s")
        assert killed <= 2.5   # the 2 s + up to one 0.5 s heartbeat of reporting lag

        # 4. Cut the link of stage 2's only peer: the coordinator re-assigns a peer to stage 2.
        _until(f"{replica} dropped", lambda: _stage_of(status()["swarm"], replica) is None, 30, watch)
        watch.remove(peers[only])
        rounds_before = status()["rounds"]
        cut = _recovery(status, lambda: net.set_link(host_of[only], up=False), 60, watch)
        print(f"recovery after cutting the link of stage 2's only peer: {cut:.2f} s")
        assert cut <= 10.0
        sw = status()["swarm"]
        assert only not in sw["stages"][2]["peers"] and len(sw["stages"][2]["peers"]) == 1, sw["stages"]

        # 5. Training goes on and the loss falls; nothing was lost.
        last = rounds_before[-1]

        def rounds_after():
            rounds = status()["rounds"]
            return rounds[-1]["round"] >= last["round"] + 1 and rounds
        rounds = _until("a round after the link cut", rounds_after, 120, watch)
        assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"], rounds
        sw = status()["swarm"]
        assert sw["microbatches_lost"] == 0, sw
        assert "micro-batch lost" not in trainer.output()
        assert int(re.findall(r"calls (\d+)", fake.output())[-1]) == 0


@pytest.mark.integration
def test_sim_hosts_reports_each_process_on_its_own_host(tmp_path):
    import subprocess
    bad = run_fedswarm("sim", "--hosts", "--host-bandwidth", "fast", "--out", str(tmp_path / "bad"), timeout=120)
    assert bad.returncode == 2 and "error: --host-bandwidth" in bad.stderr and "Traceback" not in bad.stderr
    out = tmp_path / "sim"
    done = run_fedswarm("sim", "--hosts", "--host-bandwidth", "50mbit", "--clients", "2", "--rounds", "1",
                        "--local-steps", "2", *SMALL, "--out", str(out), "--quiet", timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    hosts = report["sim"]["hosts"]
    assert [h["name"] for h in hosts] == ["coordinator", "client-0", "client-1"]
    assert len({h["ip"] for h in hosts}) == 3 and len({h["netns"] for h in hosts}) == 3
    assert report["sim"]["address"].startswith(hosts[0]["ip"] + ":")
    assert report["socket_bytes"]["up"] >= report["rounds"][1]["bytes_up"] > 0
    assert not {h["netns"] for h in hosts} & set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                                text=True).stdout.split())
