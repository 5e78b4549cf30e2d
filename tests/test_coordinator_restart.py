"""SIGKILL the coordinator after a commit and mid-round; restart it on the same state dir.
The run finishes every round exactly once and the client daemons are never restarted."""
from __future__ import annotations

import re
import signal
import threading
import time

import pytest

from fedswarm.run_config import RunConfig
from fedswarm.schedule import LrSchedule
from fedswarm.sim.processes import READY, Proc, client_processes, fedswarm_cmd, fetch_status
from fedswarm.app.testing import assert_lrs_follow

ROUNDS, STEPS = 5, 15


def _wait(predicate, timeout: float, what: str):
    deadline, tick = time.monotonic() + timeout, threading.Event()
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - the coordinator may be restarting
            value = None
        if value:
            return value
        tick.wait(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def _start(tmp_path, listen: str, n: int) -> tuple[Proc, str]:
    args = ["--listen", listen, "--state-dir", str(tmp_path / "state"), "--rounds", str(ROUNDS),
            "--min-clients", "2", "--local-steps", str(STEPS), "--seq-len", "64", "--batch-size", "8",
            "--strategy", "fedavgm", "--lease", "8", "--lr-schedule", "cosine", "--warmup-steps", "20"]
    proc = Proc(f"coordinator-{n}", fedswarm_cmd("coordinator", *args), tmp_path / f"coordinator-{n}.log")
    return proc, proc.wait_for_line(READY, 120).group(1)


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_sigkill_and_restart_loses_no_round(tmp_path):
    coord, address = _start(tmp_path, "127.0.0.1:0", 1)
    try:
        with client_processes(tmp_path, address, 2) as clients:
            # Kill 1: right after round 2 committed.
            _wait(lambda: fetch_status(address)["round"] >= 2, 180, "round 2 to commit")
            coord.signal(signal.SIGKILL)
            coord.popen.wait()
            coord.stop()
            coord, _ = _start(tmp_path, address, 2)
            status = _wait(lambda: fetch_status(address), 30, "restarted coordinator")
            assert status["round"] >= 2, "committed rounds survive the SIGKILL"
            assert status["resumed_from"] >= 2, "status says where the restarted coordinator took the run up"

            # Kill 2: mid-round, while both clients are training (their uploads will be in flight).
            _wait(lambda: fetch_status(address)["round"] >= 3, 180, "round 3 to commit")
            k = fetch_status(address)["round"] + 1
            for client in clients:
                client.wait_for_line(re.compile(rf"round {k}: training on task"), 120)
            mid = fetch_status(address)
            coord.signal(signal.SIGKILL)
            coord.popen.wait()
            coord.stop()
            coord, _ = _start(tmp_path, address, 3)

            final = _wait(lambda: (s := fetch_status(address))["state"] == "done" and s, 240, "the run to finish")
            assert [r["round"] for r in final["rounds"]] == list(range(ROUNDS + 1)), "each round exactly once"
            assert final["round"] == ROUNDS
            assert final["rounds"][-1]["eval_loss"] < final["rounds"][0]["eval_loss"]
            assert mid["current_round"] <= ROUNDS
            for client in clients:  # the same daemons did all the work and exit cleanly
                assert client.popen.wait(timeout=60) == 0
            names = sorted(client.name for client in clients)
            schedule = LrSchedule(RunConfig.lr, ROUNDS * STEPS, "cosine", warmup_steps=20)
            assert_lrs_follow(final["rounds"], schedule, ROUNDS, STEPS, names)   # on across both restarts
            assert final["resumed_from"] == k - 1, "the third coordinator took the run up after round k - 1"
            # The work in flight at kill 2 was accepted for the re-run of round k, not redone: each upload was sent
            # under the session joined again (before it, or re-sent after it was refused: as the restart's timing has it).
            assert final["rounds"][k]["adopted"] == names and final["rounds"][k]["clients"] == names
    finally:
        coord.stop()
