"""End-to-end: real `fedswarm` processes on 127.0.0.1 (port 0), driven through the CLI.

Kept lean (tiny model, few rounds and local steps, one torch thread per client):
the machine running these may have only a couple of cores.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedswarm.coordinator.store import Store
from fedswarm.sim.processes import Proc, coordinator_process, fetch_status, fedswarm_cmd, run_fedswarm

ROUND_KEYS = {"round", "eval_loss", "train_loss", "clients", "bytes_up", "bytes_up_raw", "seconds"}
SMALL = ["--seq-len", "64", "--batch-size", "8"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def named_clients(out_dir: Path, address: str, names: list[str], extra: list[str] | None = None) -> Iterator[list[Proc]]:
    """`fedswarm client` per name (partition i/len(names), 1 torch thread); always stopped on exit."""
    procs: list[Proc] = []
    try:
        for i, name in enumerate(names):
            argv = fedswarm_cmd("client", "--coordinator", address, "--partition", f"{i}/{len(names)}",
                                "--name", name, "--threads", "1", "--device", "cpu", *(extra or []))
            procs.append(Proc(name, argv, out_dir / f"{name}.log"))
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def wait_for_state(address: str, state: str, deadline_s: float, watch: list[Proc]) -> dict:
    """Poll status until `state`; fail early if a watched process exits with an error."""
    tick, deadline = threading.Event(), time.monotonic() + deadline_s
    while True:
        for proc in watch:
            rc = proc.popen.poll()
            if rc not in (None, 0):
                pytest.fail(f"{proc.name} exited with {rc} while waiting for {state!r}:\n{proc.output()[-3000:]}")
        status = fetch_status(address)
        if status["state"] == state:
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"state still {status['state']!r} (round {status['round']}) after {deadline_s:.0f} s")
        tick.wait(0.5)


run_cli = run_fedswarm   # `fedswarm ARGS` to its end (forked from the suite's fork server)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_clients_train(tmp_path):
    coord_args = ["--state-dir", str(tmp_path / "state"), "--rounds", "3", "--local-steps", "15",
                  "--min-clients", "2", "--upload-codec", "int8", "--evaluate", "both", *SMALL]
    with coordinator_process(tmp_path, coord_args) as (coordinator, address):
        before = fetch_status(address)
        assert before["state"] == "waiting"
        assert before["round"] == 0
        assert before["rounds_total"] == 3
        assert before["clients"] == []

        with named_clients(tmp_path, address, ["c0", "c1"]) as clients:
            wait_for_state(address, "done", 180, [coordinator, *clients])

            cli = run_cli("status", "--coordinator", address, "--json")
            assert cli.returncode == 0, cli.stderr
            status = json.loads(cli.stdout)
            assert status["state"] == "done"
            assert status["round"] == 3
            assert status["rounds_total"] == 3
            assert sorted(c["name"] for c in status["clients"]) == ["c0", "c1"]

            rounds = status["rounds"]
            assert [r["round"] for r in rounds] == [0, 1, 2, 3]
            for r in rounds:
                assert ROUND_KEYS <= set(r), f"round {r.get('round')} lacks {ROUND_KEYS - set(r)}"
            assert rounds[0]["clients"] == [] and rounds[0]["bytes_up"] == 0
            for r in rounds[1:]:
                assert r["clients"] == ["c0", "c1"], r
                assert 0 < r["bytes_up"] < r["bytes_up_raw"], r  # int8 upload is smaller than fp32
                assert r["train_loss"] is not None and r["seconds"] > 0
            first, last = rounds[0]["eval_loss"], rounds[-1]["eval_loss"]
            assert last < first
            assert last <= 0.9 * first, f"eval loss {first:.4f} -> {last:.4f}: not learning"
            check_both_evaluations(rounds)

            # TASK_DONE reaches the daemons: they exit 0 on their own.
            for client in clients:
                try:
                    rc = client.popen.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{client.name} still running 60 s after the run finished:\n{client.output()[-2000:]}")
                assert rc == 0, client.output()[-3000:]
        # --exit-when-done not given: the coordinator keeps serving status after the last round.
        assert coordinator.popen.poll() is None
        assert fetch_status(address)["state"] == "done"


def check_both_evaluations(rounds: list[dict]) -> None:
    """--evaluate both: each round scored by the coordinator (on --eval-data) and by the clients (each on its
    --data's held-out split, here the same stdlib split), weighted by tokens; round N+1 went out before round N
    was committed (its evaluation and checkpoint ran while N+1 trained)."""
    windows, seq_len = 64, 64
    for r in rounds:
        central, clients = ({e["source"]: e for e in r["evals"]}[s] for s in ("central", "clients"))
        assert r["eval_source"] == "central" and r["eval_loss"] == central["loss"]
        assert central["tokens"] == windows * seq_len
        assert clients["tokens"] == windows * seq_len * len(clients["clients"]) and clients["failures"] == 0
        # the clients score the as-served model (int8 delta downloads): the same loss, within its rounding
        tolerance = 1e-4 if r["round"] == 0 else 0.02
        assert abs(clients["loss"] - central["loss"]) <= tolerance * central["loss"], (r["round"], r["evals"])
    for r in rounds[1:]:
        assert {e["source"]: e for e in r["evals"]}["clients"]["clients"] == ["c0", "c1"]
    for done, nxt in zip(rounds[1:], rounds[2:]):
        assert nxt["configured_at"] < done["committed_at"], (done, nxt)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_exit_when_done(tmp_path):
    """--exit-when-done: the coordinator exits 0 after its only round. With --evaluate clients and an evaluator:
    the evaluator scores each round (the coordinator evaluates nothing itself) and never trains; the client only
    trains."""
    state = tmp_path / "state"
    coord_args = ["--state-dir", str(state), "--rounds", "1", "--min-clients", "1", "--local-steps", "5",
                  "--exit-when-done", "--evaluate", "clients", *SMALL]
    with coordinator_process(tmp_path, coord_args) as (coordinator, address):
        with named_clients(tmp_path, address, ["judge"], ["--role", "evaluator"]) as (judge,):
            judge.wait_for_line(re.compile(r"joined run \w+ as judge"), 120)   # before any trainer: deterministic
            with named_clients(tmp_path, address, ["solo"]) as (client,):
                try:
                    rc = coordinator.popen.wait(timeout=180)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"coordinator did not exit after its only round:\n{coordinator.output()[-3000:]}")
                assert rc == 0, coordinator.output()[-3000:]
                assert client.popen.poll() in (None, 0), client.output()[-3000:]
                assert judge.popen.poll() in (None, 0), judge.output()[-3000:]
    assert list(state.glob("*.sqlite3")), f"no sqlite database in {state}: {sorted(p.name for p in state.iterdir())}"
    ckpt = state / "checkpoints" / "round-000001.safetensors"
    assert ckpt.is_file() and ckpt.stat().st_size > 0
    store = Store(state)
    try:
        rounds = store.rounds()
    finally:
        store.close()
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["clients"] == ["solo"]   # the judge never trained
    for r in rounds:
        (ev,) = r["evals"]
        assert (r["eval_source"], ev["clients"], ev["tokens"]) == ("clients", ["judge"], 64 * 64), r   # not solo
        assert r["eval_loss"] == ev["loss"] > 0
    assert rounds[1]["eval_loss"] < rounds[0]["eval_loss"]


@pytest.mark.slow   # every swarm sim starts its clients before the coordinator listens (tests/test_swarm_sim.py)
@pytest.mark.timeout(300)
def test_client_waits_for_coordinator(tmp_path):
    port = free_port()  # nothing listens here until the coordinator below takes it
    address = f"127.0.0.1:{port}"
    with named_clients(tmp_path, address, ["early"]) as (client,):
        retry = re.compile(r"join failed \(UNAVAILABLE[^\n]*retrying in ([0-9.]+) s")
        client.wait_for_line(re.compile(r"(?s)(?:join failed \(UNAVAILABLE.*?retrying in [0-9.]+ s.*?){3}"), timeout=90)
        delays = [float(m.group(1)) for m in retry.finditer(client.output())]
        assert len(delays) >= 3, client.output()[-2000:]
        # jittered exponential backoff: 0.5 s x [0.5, 1.5] first, 2 s x [0.5, 1.5] third
        assert delays[2] > delays[0], delays
        assert client.popen.poll() is None, "the client gave up while the coordinator was unreachable"

        # once a coordinator serves on that address, the waiting client joins it
        coord_args = ["--listen", address, "--state-dir", str(tmp_path / "state"), "--min-clients", "1", *SMALL]
        coordinator = Proc("coordinator", fedswarm_cmd("coordinator", *coord_args), tmp_path / "coordinator.log")
        try:
            served = coordinator.wait_for_line(re.compile(r"listening on (\S+:\d+)"), timeout=120).group(1)
            assert served == address
            client.wait_for_line(re.compile(r"joined run \w+ as early"), timeout=60)
            assert any(c["name"] == "early" for c in fetch_status(address)["clients"])
        finally:
            coordinator.stop()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bad_cli_input(tmp_path):
    state = tmp_path / "state"
    bad_strategy = run_cli("coordinator", "--strategy", "nope", "--state-dir", str(state))
    assert bad_strategy.returncode != 0
    assert "nope" in bad_strategy.stderr and "fedavg" in bad_strategy.stderr, bad_strategy.stderr
    assert "Traceback" not in bad_strategy.stdout + bad_strategy.stderr
    assert not state.exists(), "a refused command line must not create the state dir"

    started = time.monotonic()
    bad_partition = run_cli("client", "--partition", "3/2", "--coordinator", "127.0.0.1:1", timeout=60)
    elapsed = time.monotonic() - started
    output = bad_partition.stdout + bad_partition.stderr
    assert bad_partition.returncode == 2, output
    assert "partition 3/2" in bad_partition.stderr and "invalid" in bad_partition.stderr, output
    assert "Traceback" not in output
    assert "retrying" not in output, "the client must refuse bad input before it connects"
    assert elapsed < 45, f"took {elapsed:.1f} s to refuse a bad --partition"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sim_writes_report_and_evaluates_on_its_datas_split(tmp_path):
    from fedswarm.app.testing import initial_eval_loss, write_corpus

    out, corpus = tmp_path / "sim", write_corpus(tmp_path / "plays.txt")
    argv = fedswarm_cmd("sim", "--clients", "2", "--rounds", "2", "--local-steps", "10", *SMALL, "--data", corpus,
                        "--quiet", "--out", str(out))
    sim = Proc("sim", argv, tmp_path / "sim.log")
    try:
        try:
            rc = sim.popen.wait(timeout=200)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fedswarm sim still running after 200 s:\n{sim.output()[-3000:]}")
        assert rc == 0, sim.output()[-3000:]
    finally:
        if sim.popen.poll() is None:
            # SIGINT lets the sim's own context managers stop its coordinator and clients
            sim.signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                sim.popen.wait(15)
        sim.stop()

    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    for r in report["rounds"]:
        assert ROUND_KEYS <= set(r)
    assert report["config"]["rounds"] == 2
    assert report["config"]["local_steps"] == 10
    assert report["config"]["seq_len"] == 64 and report["config"]["batch_size"] == 8
    assert all(len(r["clients"]) == 2 for r in report["rounds"][1:])
    for name in ("eval_loss.png", "upload_bytes.png"):
        data = (out / name).read_bytes()
        assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC), name
    # the coordinator evaluates on the held-out split of --data, not on the stdlib
    assert report["config"]["eval_data"] == corpus
    on_file, on_stdlib = initial_eval_loss(corpus, seq_len=64), initial_eval_loss("stdlib", seq_len=64)
    assert abs(on_file - on_stdlib) > 1e-3, "the corpus must be distinguishable from stdlib"
    assert math.isclose(report["rounds"][0]["eval_loss"], on_file, rel_tol=1e-4), (report["rounds"][0], on_file)
