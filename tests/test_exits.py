"""Honest exits and typed refusals, with real processes: a crashed round driver exits non-zero with its
cause; rounds that bring no usable reply back off and the run gives up (exit 3); a client daemon whose
session was dropped re-joins because of the refusal's typed reason."""
from __future__ import annotations

import re
import signal

import grpc
import pytest

from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.sim.processes import READY, Proc, coordinator_process, fedswarm_cmd, fetch_status, wait_until

SMALL = ["--rounds", "1", "--local-steps", "1", "--seq-len", "32", "--batch-size", "2"]


@pytest.mark.timeout(180)
def test_a_crashed_round_driver_exits_non_zero_with_its_cause(tmp_path):
    state = tmp_path / "state"
    args = ["--state-dir", str(state), "--min-clients", "1", *SMALL]
    with coordinator_process(tmp_path, args, name="coordinator-1") as (coord, address):
        wait_until("the round-0 checkpoint", lambda: list((state / "checkpoints").glob("*.safetensors")), 120, [coord])
        assert coord.stop() == 0
    for ckpt in (state / "checkpoints").glob("*.safetensors"):   # the driver thread fails loading it on restart
        ckpt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    proc = Proc("coordinator-2", fedswarm_cmd("coordinator", "--listen", "127.0.0.1:0", *args),
                tmp_path / "coordinator-2.log")
    try:
        proc.wait_for_line(READY, 120)
        assert proc.popen.wait(timeout=60) == 1
    finally:
        proc.stop()
    assert "error: the round driver crashed:" in proc.output()


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
