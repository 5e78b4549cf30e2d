"""Learning across rounds: evaluation on the trained data's held-out split, lr schedules, compressed downloads,
communication accounting. Real coordinator and client processes (sim/processes.py)."""
from __future__ import annotations


import pytest
import torch

from fedswarm.client.trainer import LocalTrainer
from fedswarm.run_config import RunConfig
from fedswarm.data import BatchSampler, load_train_tokens
from fedswarm.models import build_model, trainable_state
from fedswarm.schedule import LrSchedule
from fedswarm.sim.launcher import run_sim
from fedswarm.app.testing import assert_lrs_follow, sim_args

SMALL = ["--seq-len", "32", "--batch-size", "4"]
# -- lr schedules ----------------------------------------------------------------------------------

def test_schedule_warmup_then_cosine_to_min_lr():
    s = LrSchedule(1e-2, total_steps=110, kind="cosine", warmup_steps=10, min_lr=1e-3)
    assert [s.lr_at(i) for i in range(3)] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert s.lr_at(9) == pytest.approx(1e-2)                       # warm-up ends at the peak
    assert s.lr_at(60) == pytest.approx(1e-3 + 0.5 * 9e-3)          # half-way through the decay
    assert s.lr_at(110) == pytest.approx(1e-3) and s.lr_at(500) == pytest.approx(1e-3)
    decay = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:])), "cosine decay is monotone"
    flat = LrSchedule(3e-3, total_steps=50, kind="constant", warmup_steps=5)
    assert flat.lr_at(4) == pytest.approx(3e-3) and flat.lr_at(49) == 3e-3 and flat.lr_at(0) == pytest.approx(6e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="linear"), "--lr-schedule"), (dict(min_lr=1.0), "--min-lr"), (dict(warmup_steps=-1), "--warmup-steps")])
def test_schedule_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LrSchedule(1e-3, total_steps=10, **kwargs)
    with pytest.raises(ValueError, match=message):
        RunConfig(**{"lr_schedule" if k == "kind" else k: v for k, v in kwargs.items()}).check()


def test_trainer_follows_lr_at_and_keeps_adamw_state():
    torch.set_num_threads(1)
    model = build_model("gpt2-tiny", seed=0)
    sampler = BatchSampler(load_train_tokens("stdlib", 0, 8), 32, 2, seed=0)
    trainer = LocalTrainer(model, sampler, torch.device("cpu"), "fp32", lr=1e-3)
    s = LrSchedule(1e-3, total_steps=8, kind="cosine", warmup_steps=2)
    first = trainer.train_round(trainable_state(model), 4, lr_at=lambda i: s.lr_at(i))
    assert first.lrs == pytest.approx([s.lr_at(i) for i in range(4)])
    steps_after_one = max(int(st["step"]) for st in trainer.optimizer.state.values())
    second = trainer.train_round(first.state, 4, lr_at=lambda i: s.lr_at(4 + i))
    assert second.lrs == pytest.approx([s.lr_at(i) for i in range(4, 8)])
    assert steps_after_one == 4 and max(int(st["step"]) for st in trainer.optimizer.state.values()) == 8


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_clients_follow_the_runs_schedule(tmp_path):
    report = run_sim(sim_args(tmp_path, "--clients", "2", "--rounds", "3", "--local-steps", "4", "--lr", "2e-3",
                              "--lr-schedule", "cosine", "--warmup-steps", "3", "--min-lr", "2e-4", *SMALL),
                     log=lambda *_: None)
    schedule = LrSchedule(2e-3, total_steps=12, kind="cosine", warmup_steps=3, min_lr=2e-4)
    assert_lrs_follow(report["rounds"], schedule, 3, 4, ["client-0", "client-1"])   # the lrs each client reported
