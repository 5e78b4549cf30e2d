"""Client-level differential privacy (coordinator/privacy.py, fedswarm.dp): clipping, noise of the right size,
the accountant against dp-accounting itself, the budget stop, settings refused; one small sim end to end."""
from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedswarm import dp
from fedswarm.coordinator.aggregate import DecodedUpdate, FoldUpdates, HoldEveryUpdate
from fedswarm.run_config import RunConfig
from fedswarm.coordinator.grid import SessionGrid
from fedswarm.coordinator.driver import RunProgress
from fedswarm.coordinator.privacy import (PrivacyBudgetExhausted, PrivacyLedger, budget_spent, clip_limit, delta_of,
                                         status_entry)
from fedswarm.coordinator.strategies import build_strategy
from fedswarm.proto.run_state import EndReason, RunState
from fedswarm.sim.processes import run_fedswarm

pytestmark = pytest.mark.usefixtures("task_identity")   # tests/conftest.py
NODES = [11, 22, 33, 44]
SIZE = 200_000   # values per tensor: the noise's std is measured to about 0.3 %


def ledger(generator_seed: int = 0, **settings) -> PrivacyLedger:
    cfg = RunConfig(**{"min_clients": 4, "dp_clip": 1.0, **settings})
    cfg.check()
    return PrivacyLedger(cfg, torch.Generator().manual_seed(generator_seed))


def direct_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """dp-accounting called directly: the Poisson-sampled Gaussian composed over rounds."""
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)),
                                                    rounds))
    return accountant.get_epsilon(delta)


# -- clipping and noise ---------------------------------------------------------------

def test_clipping_bounds_every_update_and_keeps_small_ones():
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 0.5, 3.0, 1e4):
        delta = {"a": scale * torch.randn(300, generator=g), "b": scale * torch.randn(7, 11, generator=g)}
        before = {k: v.clone() for k, v in delta.items()}
        norm = dp.clip_(delta, 1.0)
        after = math.sqrt(sum(float(v.square().sum()) for v in delta.values()))
        assert after <= 1.0 + 1e-5
        if norm <= 1.0:
            assert all(torch.equal(delta[k], before[k]) for k in delta)
        else:   # the direction is kept
            assert after == pytest.approx(1.0, rel=1e-5)
            assert torch.allclose(delta["a"] * norm, before["a"], rtol=1e-4, atol=1e-6 * norm)


def test_the_coordinator_clips_to_dp_clip_only_in_central_mode():
    assert clip_limit(RunConfig(min_clients=4, dp_clip=0.5)) == 0.5
    assert clip_limit(RunConfig(min_clients=4, dp_clip=0.5, clip_update_norm=0.2)) == 0.2
    assert clip_limit(RunConfig(min_clients=4, dp_clip=0.5, dp_mode="distributed")) == 0.0
    assert clip_limit(RunConfig(clip_update_norm=3.0)) == 3.0


def test_central_noise_on_the_mean_has_std_z_c_over_k():
    z, clip, k = 1.5, 0.8, 4
    book = ledger(dp_clip=clip, dp_noise_multiplier=z)
    mean = ArrayRecord(torch_state_dict={"w": torch.zeros(SIZE), "b": torch.full((SIZE,), 2.0)})
    noised = book.release(mean, [640.0] * k)
    for name, centre in (("w", 0.0), ("b", 2.0)):
        values = noised[name].numpy() - centre
        assert abs(values.mean()) < 5 * z * clip / k / math.sqrt(SIZE)
        assert values.std() == pytest.approx(z * clip / k, rel=0.01)
    assert book.releases == 1


def test_distributed_shares_sum_to_noise_z_c():
    z, clip, k = 1.0, 2.0, 4
    run = RunConfig(min_clients=k, dp_clip=clip, dp_noise_multiplier=z, dp_mode="distributed", max_update_norm_ratio=0)
    total = torch.zeros(SIZE)
    for client in range(k):
        delta = {"w": torch.zeros(SIZE)}
        dp.privatize(delta, run, torch.Generator().manual_seed(client))
        assert float(delta["w"].std()) == pytest.approx(z * clip / math.sqrt(k), rel=0.01)
        total += delta["w"]
    assert float(total.std()) == pytest.approx(z * clip, rel=0.01)
    untouched = {"w": torch.ones(3)}
    assert dp.privatize(untouched, RunConfig(min_clients=k, dp_clip=clip)) is untouched
    assert torch.equal(untouched["w"], torch.ones(3))


def test_distributed_round_with_fewer_updates_than_k_is_not_released():
    book = ledger(dp_noise_multiplier=1.0, dp_mode="distributed", max_update_norm_ratio=0)
    mean = ArrayRecord(torch_state_dict={"w": torch.zeros(8)})
    assert book.release(mean, [1.0] * 3) is None and book.releases == 0
    assert book.release(mean, [1.0] * 4) is not None and book.releases == 1


@pytest.mark.parametrize("sink", [FoldUpdates, HoldEveryUpdate], ids=["stream", "hold"])
def test_strategy_mean_gets_the_noise_with_either_aggregation(sink):
    """Through the SessionGrid and a real Flower strategy: the DP mean minus the plain mean is N(0, (zC/K)^2)."""
    base = {"w": torch.zeros(SIZE)}
    means = {}
    for z in (0.0, 2.0):
        strategy = build_strategy(RunConfig(min_clients=4, dp_clip=1.0, dp_noise_multiplier=z))
        strategy.privacy.generator = torch.Generator().manual_seed(3)
        grid = SessionGrid(7, live_nodes=lambda: list(NODES), updates=sink())
        msgs = list(strategy.configure_train(1, ArrayRecord(torch_state_dict=base), ConfigRecord({}), grid))

        def answer():
            for node in NODES:
                task = grid.take_task(node, wait_s=10)
                update = DecodedUpdate(base, {"w": torch.full((SIZE,), node / 1000)},
                                       MetricRecord({"num-examples": 64, "train_loss": 1.0}),
                                       ConfigRecord({"name": str(node)}))
                assert grid.deliver_update(task.metadata.message_id, node, update)
        helper = threading.Thread(target=answer)
        helper.start()
        replies = list(grid.send_and_receive(msgs, timeout=30))
        helper.join()
        means[z], _ = strategy.aggregate_train(1, replies)
    plain = means[0.0]["w"].numpy()
    np.testing.assert_allclose(plain, np.mean([n / 1000 for n in NODES]), rtol=1e-5)
    assert (means[2.0]["w"].numpy() - plain).std() == pytest.approx(2.0 * 1.0 / 4, rel=0.01)


# -- accounting --------------------------------------------------------------------------

def test_epsilon_grows_with_rounds_falls_with_noise_and_matches_dp_accounting():
    eps = {}
    for z in (0.7, 1.0, 2.0):
        book = ledger(dp_noise_multiplier=z, rounds=20, clients_per_round=2, min_clients=8)
        assert book.sampling_rate == 0.25 and book.delta == 1 / 64 and book.epsilon() == 0.0
        series = []
        for rnd in range(1, 7):
            assert book.admits(rnd)
            book.release(ArrayRecord(torch_state_dict={"w": torch.zeros(4)}), [1.0, 1.0])
            series.append(book.epsilon())
        assert all(a < b for a, b in zip(series, series[1:]))
        assert series[-1] == pytest.approx(direct_epsilon(z, 0.25, 6, 1 / 64), rel=1e-9)
        assert book.entry() == {"epsilon": series[-1], "delta": 1 / 64, "noise_multiplier": z, "clip": 1.0,
                                "sampling_rate": 0.25, "mode": "central", "releases": 6}
        eps[z] = series[-1]
    assert eps[0.7] > eps[1.0] > eps[2.0]


def test_without_noise_there_is_no_epsilon():
    book = ledger()
    book.release(ArrayRecord(torch_state_dict={"w": torch.ones(4)}), [1.0] * 4)
    assert book.epsilon() is None and book.entry()["releases"] == 1


def test_max_epsilon_stops_before_the_round_that_would_pass_it():
    z, limit = 1.0, 4.0
    book = ledger(dp_noise_multiplier=z, dp_max_epsilon=limit, rounds=50)
    ran = 0
    for rnd in range(1, 51):
        if not book.admits(rnd):
            break
        book.release(ArrayRecord(torch_state_dict={"w": torch.zeros(4)}), [1.0] * 4)
        ran = rnd
    assert 1 <= ran < 50 and "--dp-max-epsilon" in book.exhausted(ran + 1)
    assert book.epsilon() <= limit < direct_epsilon(z, 1.0, ran + 1, delta_of(RunConfig(min_clients=4)))


def test_the_engine_ends_the_run_cleanly_when_the_budget_is_spent():
    cfg = RunConfig(min_clients=4, dp_clip=1.0, dp_noise_multiplier=1.0, dp_max_epsilon=2.5)
    cfg.check()
    strategy, progress = build_strategy(cfg), RunProgress(cfg, [])
    assert not budget_spent([strategy], progress, 1)   # one release: epsilon 1.93 at delta 1/16
    strategy.privacy.release(ArrayRecord(torch_state_dict={"w": torch.zeros(4)}), [1.0] * 4)
    assert budget_spent([strategy], progress, 2)       # two: 3.22
    assert progress.end_reason == EndReason.PRIVACY_BUDGET   # the engine says done once round 1 is committed
    grid = SessionGrid(7, live_nodes=lambda: list(NODES), updates=FoldUpdates())
    with pytest.raises(PrivacyBudgetExhausted, match="past --dp-max-epsilon 2.5"):   # an engine that did not ask
        strategy.configure_train(2, ArrayRecord(torch_state_dict={"w": torch.zeros(4)}), ConfigRecord({}), grid)


def test_a_restarted_run_counts_its_committed_rounds_and_one_more():
    book = ledger(dp_noise_multiplier=1.0)
    assert book.admits(5)   # resumed after committed round 4: rounds 1-4, and round 5 may have gone out
    assert book.releases == 5
    assert book.epsilon() == pytest.approx(direct_epsilon(1.0, 1.0, 5, 1 / 16), rel=1e-9)


def test_status_entry_before_and_after_rounds():
    cfg = RunConfig(min_clients=4, dp_clip=1.0, dp_noise_multiplier=1.0, dp_max_epsilon=9.0)
    assert status_entry(RunConfig(), []) is None
    before = status_entry(cfg, [{"round": 0}])
    assert before["epsilon"] == 0.0 and before["delta"] == 1 / 16 and before["max_epsilon"] == 9.0
    entry = ledger(dp_noise_multiplier=1.0).entry()
    assert status_entry(cfg, [{"round": 0}, {"round": 1, "privacy": entry}])["releases"] == entry["releases"]
    assert EndReason.PRIVACY_BUDGET == "privacy_budget" and RunState.DONE == "done"


def test_metrics_give_epsilon_and_delta():
    from prometheus_client import generate_latest

    from fedswarm.metrics import coordinator_registry

    totals = dict.fromkeys(("rounds_committed", "seconds", "bytes_up", "bytes_up_raw", "tokens", "failures"), 0)
    status = {"config": {}, "rounds": [], "totals": totals, "run_id": "r", "state": RunState.DONE, "round": 2,
              "rounds_total": 2, "clients_by_role": {}, "rejections": {},
              "privacy": {"epsilon": 3.216, "delta": 0.0625}, "end_reason": EndReason.PRIVACY_BUDGET}
    text = generate_latest(coordinator_registry(lambda: status)).decode()
    assert "fedswarm_privacy_epsilon 3.216" in text and "fedswarm_privacy_delta 0.0625" in text
    status["privacy"]["epsilon"] = None   # clipping only: no guarantee, no gauge
    assert "fedswarm_privacy_epsilon" not in generate_latest(coordinator_registry(lambda: status)).decode()


# -- settings -------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"dp_noise_multiplier": 1.0}, "need --dp-clip"),
    ({"dp_clip": -1.0}, "--dp-clip must be"),
    ({"dp_clip": float("nan")}, "--dp-clip must be"),
    ({"dp_clip": 1.0, "dp_delta": 1.0}, "--dp-delta"),
    ({"dp_clip": 1.0, "dp_mode": "local"}, "--dp-mode"),
    ({"dp_clip": 1.0, "dp_max_epsilon": 3.0}, "needs --dp-noise-multiplier"),
    ({"dp_clip": 1.0, "strategy": "fedmedian"}, "does not average"),
    ({"dp_clip": 1.0, "strategy": "krum"}, "does not average"),
    ({"dp_clip": 1.0, "fraction": 0.5}, "--clients-per-round"),
    ({"dp_clip": 1.0, "min_clients": 1}, ">= 2"),
    ({"dp_clip": 1.0, "mode": "swarm"}, "federated rounds"),
    ({"dp_clip": 1.0, "dp_mode": "distributed"}, "--max-update-norm-ratio"),
])
def test_settings_that_cannot_be_private_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**{"min_clients": 4, **settings}).check()


# -- one run, end to end -----------------------------------------------------------------

@pytest.mark.integration
def test_sim_with_dp_reports_epsilon(tmp_path):
    """`fedswarm sim --dp-clip 1 --dp-noise-multiplier 1 --dp-adaptive-clip`: 4 clients train 3 rounds; every
    round record, the final status (report.json's privacy) and the last line give epsilon at delta = 1/4^2 (the
    count's noise and the updates' share one z), and the clip norm moves each round."""
    out = tmp_path / "sim"
    done = run_fedswarm("sim", "--clients", "4", "--rounds", "3", "--local-steps", "2", "--batch-size", "4",
                        "--seq-len", "32", "--eval-windows", "8", "--dp-clip", "1", "--dp-noise-multiplier", "1",
                        "--dp-adaptive-clip", "--dp-clipped-count-stddev", "1",
                        "--out", str(out), "--quiet", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["epsilon"] == pytest.approx(direct_epsilon(1.0, 1.0, 3, 1 / 16), rel=1e-9)
    assert report["privacy"]["delta"] == 1 / 16 and report["privacy"]["releases"] == 3
    trained = [r for r in report["rounds"] if r["round"] > 0]
    assert [r["privacy"]["releases"] for r in trained] == [1, 2, 3]
    assert [r["privacy"]["epsilon"] for r in trained] == sorted(r["privacy"]["epsilon"] for r in trained)
    assert "end_reason" not in report and "epsilon 4.35 at delta 0.0625" in done.stdout
    clips = [1.0] + [r["privacy"]["clip"] for r in trained]
    assert all(0 < c < math.inf for c in clips) and all(a != b for a, b in zip(clips, clips[1:])), clips
    assert report["privacy"]["clip"] == clips[-1]
