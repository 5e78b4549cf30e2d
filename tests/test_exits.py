"""Honest exits and typed refusals, with real processes: a crashed round driver exits non-zero with its
cause; bad state on disk falls back to a good checkpoint or exits 2 naming the file; rounds that bring no
usable reply back off and the run gives up (exit 3); a client daemon whose session was dropped re-joins
because of the refusal's typed reason."""
from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
import torch

from fedswarm.run_config import RunConfig
from fedswarm.coordinator.store import Store
from fedswarm.lora import build_run_model
from fedswarm.models import trainable_state
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.sim.processes import READY, Proc, coordinator_process, fedswarm_cmd, fetch_status, run_fedswarm, wait_until

SMALL = ["--rounds", "1", "--local-steps", "1", "--seq-len", "32", "--batch-size", "2"]


def prepared_state(state: Path, rounds: int, strategy: str = "fedavg", extra: dict | None = None) -> list[Path]:
    """A state dir holding a run (SMALL's settings) with rounds 0 .. rounds-1 committed through the Store, each
    checkpoint the run's model (+ `extra` tensors); the checkpoint files, oldest first."""
    cfg = RunConfig(rounds=rounds + 2, min_clients=1, local_steps=1, seq_len=32, batch_size=2, strategy=strategy)
    initial = trainable_state(build_run_model(cfg))
    store = Store(state)
    store.set_meta("run_config", cfg.to_json())
    store.set_meta("run_id", "00c0ffee00c0ffee")
    for rnd in range(rounds):
        store.commit_round({"round": rnd, "eval_loss": 5.0 - rnd, "clients": []},
                           {**{k: v + rnd for k, v in initial.items()}, **(extra or {})})
    store.close()
    return sorted((state / "checkpoints").glob("round-*.safetensors"))


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_crashed_round_driver_exits_non_zero_with_its_cause(tmp_path):
    """The checkpoint loads and fits the model (so the coordinator starts), but its FedAvgM momentum names a
    tensor the model lacks: restoring it fails in the driver thread, after the server is up."""
    state = tmp_path / "state"
    prepared_state(state, 1, "fedavgm", {"strategy/momentum_vector/no.such.tensor": torch.zeros(3)})
    proc = Proc("coordinator", fedswarm_cmd("coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(state)),
                tmp_path / "coordinator.log")
    try:
        proc.wait_for_line(READY, 120)
        assert proc.popen.wait(timeout=60) == 1
    finally:
        proc.stop()
    assert "error: the round driver crashed: ValueError: checkpoint's momentum_vector" in proc.output()


def started(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def read_only(folder: Path, *argv: str) -> list[str]:
    """`argv` in a mount namespace of its own where `folder` is a read-only bind mount of itself."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, str(folder), *argv]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_bad_state_on_disk_falls_back_or_exits_2_naming_the_file(tmp_path):
    """A truncated latest checkpoint: the real coordinator names it and resumes from the round before (status
    says so). No kept checkpoint that loads, or a read-only --state-dir: exit 2 with one line (the client's bad
    flags and files: tests/test_bad_state.py, in-process). The read-only one starts beside the
    coordinator (a fresh interpreter's start is mostly imports)."""
    truncated = prepared_state(tmp_path / "fallback", 3)[-1]
    truncated.write_bytes(truncated.read_bytes()[:4096])
    for ckpt in prepared_state(tmp_path / "none-good", 2):
        ckpt.write_bytes(ckpt.read_bytes()[:-8])
    prepared_state(tmp_path / "read-only", 1)
    read_only_run = started(read_only(tmp_path / "read-only", *fedswarm_cmd(   # a fresh interpreter: its own mounts
        "coordinator", "--state-dir", str(tmp_path / "read-only"))))
    with coordinator_process(tmp_path, ["--state-dir", str(tmp_path / "fallback")]) as (coord, address):
        status = fetch_status(address)
        assert status["round"] == 1 and [r["round"] for r in status["rounds"]] == [0, 1]
        assert [r["eval_loss"] for r in status["rounds"]] == [5.0, 4.0]
        assert status["resumed_from"] == 1
    log = coord.output()
    assert f"checkpoint {truncated} of round 2 cannot be used (SafetensorError" in log
    assert "falling back to the checkpoint of round 1: dropped round(s) 2" in log and "Traceback" not in log
    none_good = run_fedswarm("coordinator", "--state-dir", str(tmp_path / "none-good"), timeout=120)
    out, err = read_only_run.communicate(timeout=120)
    refused = {
        "none-good": ((none_good.returncode, none_good.stdout, none_good.stderr),
                      ["no kept checkpoint of", "round-000001.safetensors (SafetensorError", "round-000000"]),
        "read-only": ((read_only_run.returncode, out, err), ["cannot write to", "Read-only file system"]),
    }
    for name, ((code, out, err), says) in refused.items():
        lines = err.strip().splitlines()
        assert code == 2, (name, out + err)
        assert "Traceback" not in out + err and lines[-1].startswith("error: "), (name, err)
        assert [line for line in lines if line.startswith("error")] == lines[-1:], (name, err)
        assert all(s in lines[-1] for s in says), (name, lines[-1])
    assert len(list((tmp_path / "none-good" / "checkpoints").glob("*.safetensors"))) == 2   # nothing dropped


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_rounds_without_usable_reply_back_off_then_the_run_fails(tmp_path):
    args = ["--state-dir", str(tmp_path / "state"), "--min-clients", "1", "--round-timeout", "1",
            "--max-failed-rounds", "3", "--lease", "120", *SMALL]
    with coordinator_process(tmp_path, args) as (coord, address):
        with grpc.insecure_channel(address) as channel:   # a member that never answers its task
            pb_grpc.CoordinatorStub(channel).Join(pb.JoinRequest(name="mute", device="cpu", precision="fp32"),
                                                  timeout=10)
            coord.popen.wait(timeout=120)
    assert coord.stop() == 3       # stop() also reads the output to its end
    out = coord.output()
    delays = [float(d) for d in re.findall(r"repeating it in ([\d.]+) s", out)]
    assert delays == [1.0, 2.0], out[-3000:]           # exponential backoff between attempts
    assert "no usable reply 3 times in a row" in out and "error: the run failed (state failed)" in out


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_client_rejoins_on_the_typed_reason(tmp_path):
    """SIGSTOP a client past its lease: the coordinator drops it; on SIGCONT its heartbeat is refused with
    reason bad_session and it joins again (it never reads the error text)."""
    args = ["--state-dir", str(tmp_path / "state"), "--min-clients", "2", "--lease", "3", *SMALL]
    with coordinator_process(tmp_path, args) as (coord, address):
        client = Proc("client", fedswarm_cmd("client", "--coordinator", address, "--name", "sleeper", "--threads", "1",
                                             "--device", "cpu"), tmp_path / "client.log")
        try:
            client.wait_for_line(re.compile(r"joined run \S+ as sleeper"), 120)
            wait_until("the client as member", lambda: fetch_status(address)["clients"], 30, [coord, client])
            client.signal(signal.SIGSTOP)
            wait_until("the lease to expire", lambda: not fetch_status(address)["clients"], 30, [coord])
            client.signal(signal.SIGCONT)
            client.wait_for_line(re.compile(r"(?s)refused \(bad_session\).*joining again.*joined run \S+ as sleeper"), 60)
            wait_until("the client back", lambda: [c["name"] for c in fetch_status(address)["clients"]] == ["sleeper"],
                       60, [coord, client])
        finally:
            client.stop()
        assert fetch_status(address)["rejections"]["bad_session"] >= 1
