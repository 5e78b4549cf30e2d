"""DiLoCo's outer momentum is in the checkpoints and survives a coordinator SIGKILL + restart.

From checkpoints r-1 (w, m) and r (w', m'): Nesterov gives m' = mu m + g and
w' = w - lr (g + mu m'), so w' = w - lr ((1 + mu) m' - mu m). A coordinator that
lost m at the restart would instead have m' = g and w' = w - lr (1 + mu) m'.
"""
from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from fedswarm.sim.processes import READY, Proc, client_processes, fedswarm_cmd, fetch_status, wait_until

LR, MU = 0.5, 0.8


def _start(tmp_path, listen: str, n: int) -> tuple[Proc, str]:
    args = ["--listen", listen, "--state-dir", str(tmp_path / "state"), "--rounds", "3", "--min-clients", "2",
            "--local-steps", "5", "--seq-len", "64", "--batch-size", "8", "--strategy", "diloco",
            "--server-lr", str(LR), "--server-momentum", str(MU), "--lease", "8"]
    proc = Proc(f"coordinator-{n}", fedswarm_cmd("coordinator", *args), tmp_path / f"coordinator-{n}.log")
    return proc, proc.wait_for_line(READY, 120).group(1)


def _checkpoint(tmp_path, rnd: int) -> tuple[dict, dict]:
    tensors = load_file(tmp_path / "state" / "checkpoints" / f"round-{rnd:06d}.safetensors")
    prefix = "strategy/momentum_vector/"
    weights = {k: v for k, v in tensors.items() if not k.startswith("strategy/")}
    momentum = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return weights, momentum


def _status_or_none(address):
    try:
        return fetch_status(address, timeout=2)
    except Exception:  # noqa: BLE001 - the coordinator may be restarting
        return None


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_outer_momentum_survives_sigkill(tmp_path):
    coord, address = _start(tmp_path, "127.0.0.1:0", 1)
    try:
        with client_processes(tmp_path, address, 2) as clients:
            wait_until("round 2 to commit", lambda: (s := _status_or_none(address)) and s["round"] >= 2, 200,
                       watch=[coord, *clients])
            coord.signal(signal.SIGKILL)
            coord.popen.wait()
            coord.stop()
            w2, m2 = _checkpoint(tmp_path, 2)
            assert set(m2) == set(w2), "the checkpoint holds DiLoCo's momentum for every tensor"
            coord, _ = _start(tmp_path, address, 2)
            final = wait_until("the run to finish", lambda: (s := _status_or_none(address)) and s["state"] == "done" and s,
                               240, watch=[coord, *clients])
            assert final["round"] == 3
            w3, m3 = _checkpoint(tmp_path, 3)
    finally:
        coord.stop()
    assert final["resumed_from"] == 2
    moved = 0.0
    for k in w3:
        with_momentum = w2[k] - LR * ((1 + MU) * m3[k] - MU * m2[k])
        torch.testing.assert_close(w3[k], with_momentum, rtol=1e-4, atol=1e-5)
        moved = max(moved, float((MU * LR * m2[k]).abs().max()))
    assert moved > 1e-4, "round 2's momentum is large enough that losing it would show"
