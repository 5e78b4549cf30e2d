"""--secure-aggregation end to end: settings refused with a reason, and one small sim where a client drops
before masking and one after, while the coordinator's observer shows it held nothing like a client's update."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedswarm.run_config import RunConfig
from fedswarm.secagg import OBSERVE_ENV
from fedswarm.sim.processes import run_fedswarm


@pytest.mark.parametrize("settings, message", [
    ({"strategy": "krum"}, "needs every client's update"),
    ({"strategy": "fedmedian"}, "needs every client's update"),
    ({"strategy": "fedtrimmedavg"}, "needs every client's update"),
    ({"clip_update_norm": 1.0}, "--clip-update-norm"),
    ({"strategy": "sparseloco"}, "error feedback"),
    ({"client_momentum": 0.9}, "error feedback"),
    ({"dp_clip": 1.0}, "--dp-mode distributed"),
    ({"mode": "swarm"}, "--mode federated"),
    ({"min_clients": 2}, "at least 3 clients"),
    ({"upload_codec": "masked"}, "masked codec"),
])
def test_settings_that_need_individual_updates_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**{"min_clients": 5, "secure_aggregation": True, **settings}).check()


def test_it_combines_with_distributed_dp_and_sampling():
    RunConfig(min_clients=5, clients_per_round=4, secure_aggregation=True, dp_clip=1.0, dp_noise_multiplier=0.5,
              dp_mode="distributed").check()
    assert RunConfig(dp_clip=0.5, secure_aggregation=True).masking_range() == 0.5


@pytest.mark.integration   # a process, if a short one
def test_sim_refuses_a_robust_strategy_with_exit_2(tmp_path):
    done = run_fedswarm("sim", "--secure-aggregation", "--strategy", "krum", "--clients", "5",
                        "--out", str(tmp_path / "sim"), timeout=120)
    assert done.returncode == 2 and "needs every client's update" in done.stderr, done.stderr[-2000:]


def _flat(path) -> np.ndarray:
    with np.load(path) as z:
        return np.concatenate([z[k].ravel() for k in z.files]).astype(np.float64)


@pytest.mark.integration
def test_sim_with_dropouts_holds_only_masked_vectors(tmp_path):
    """5 virtual clients, seed 11 at --dropout-rate 0.2: in round 1 client v0002 drops before masking and v0000
    after (it is recovered); round 2 has none. The run completes, the loss falls, and no vector the coordinator
    held correlates with any client's true update."""
    seen = tmp_path / "observed"
    seen.mkdir()
    out = tmp_path / "sim"
    done = run_fedswarm("sim", "--secure-aggregation", "--clients", "5", "--dropout-rate", "0.2", "--seed", "11",
                        "--rounds", "2", "--local-steps", "3", "--batch-size", "4", "--seq-len", "32",
                        "--eval-windows", "8", "--lease", "3", "--out", str(out), "--quiet", timeout=300,
                        env={OBSERVE_ENV: str(seen)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rounds = json.loads((out / "report.json").read_text())["rounds"]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    first = rounds[1]["secure_aggregation"]
    assert first["dropped_before_masking"] == 1 and first["dropped_after_masking"] == 1, first
    assert first["masked"] == 4 and first["recovered"] == 1 and len(rounds[1]["clients"]) == 4
    held = sorted(p for p in seen.iterdir() if not p.name.startswith("true-"))
    true = [_flat(p) for p in seen.iterdir() if p.name.startswith("true-")]
    assert len(true) >= 8 and len(held) >= len(true) + 2   # every masked vector, and a sum per round
    for path in held:
        vector = _flat(path)
        for update in true:
            assert abs(np.corrcoef(vector, update)[0, 1]) < 0.02, f"{path.name} correlates with a true update"
