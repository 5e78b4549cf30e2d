"""Learning across rounds: evaluation on the trained data's held-out split, lr schedules, compressed downloads,
communication accounting. Real coordinator and client processes (sim/processes.py)."""
from __future__ import annotations

import argparse
import random
import re

import pytest
import torch

from fedswarm.client.trainer import LocalTrainer
from fedswarm.coordinator.config import RunConfig
from fedswarm.data import BatchSampler, eval_windows, load_eval_tokens, load_train_tokens
from fedswarm.models import build_model, evaluate, trainable_state
from fedswarm.schedule import LrSchedule
from fedswarm.sim.launcher import add_arguments as add_sim_arguments
from fedswarm.sim.launcher import run_sim

SMALL = ["--seq-len", "32", "--batch-size", "4"]
WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings arrows of outrageous fortune "
         "take arms against a sea troubles and by opposing end them die sleep no more").split()


def write_corpus(path, n_bytes: int = 120_000, seed: int = 1) -> str:
    """A text file of random lines of words: unlike Python sources, so a wrong eval split shows."""
    rng, lines, size = random.Random(seed), [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".\n"
        lines.append(line)
        size += len(line)
    path.write_text("".join(lines))
    return str(path)


def sim_args(out, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    return parser.parse_args(["--out", str(out), "--quiet", "--precision", "fp32", *argv])


def initial_eval_loss(data: str, seq_len: int = 32, windows: int = 64) -> float:
    """What the coordinator's round-0 eval loss must be when it evaluates on `data`'s held-out split."""
    torch.set_num_threads(1)
    model = build_model("gpt2-tiny", seed=0)
    return evaluate(model, eval_windows(load_eval_tokens(data), seq_len, windows))


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


LR_LINE = re.compile(r"round (\d+): lr (\S+) -> (\S+) over global steps (\d+)\.\.(\d+) of (\d+)")


def logged_lrs(log_text: str) -> dict[int, tuple[float, float, int, int, int]]:
    """round -> (first lr, last lr, first global step, last global step, total steps) from a client log."""
    return {int(m[1]): (float(m[2]), float(m[3]), int(m[4]), int(m[5]), int(m[6])) for m in LR_LINE.finditer(log_text)}


def assert_lrs_follow(log_text: str, schedule: LrSchedule, rounds: int, local_steps: int) -> None:
    seen = logged_lrs(log_text)
    assert sorted(seen) == list(range(1, rounds + 1)), log_text[-2000:]
    for rnd, (lr0, lr1, s0, s1, total) in seen.items():
        assert (s0, s1, total) == ((rnd - 1) * local_steps, rnd * local_steps - 1, rounds * local_steps)
        assert lr0 == pytest.approx(schedule.lr_at(s0), rel=1e-5) and lr1 == pytest.approx(schedule.lr_at(s1), rel=1e-5)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_clients_follow_the_runs_schedule(tmp_path):
    run_sim(sim_args(tmp_path, "--clients", "2", "--rounds", "3", "--local-steps", "4", "--lr", "2e-3",
                     "--lr-schedule", "cosine", "--warmup-steps", "3", "--min-lr", "2e-4", *SMALL), log=lambda *_: None)
    schedule = LrSchedule(2e-3, total_steps=12, kind="cosine", warmup_steps=3, min_lr=2e-4)
    for i in range(2):
        assert_lrs_follow((tmp_path / f"client-{i}.log").read_text(), schedule, rounds=3, local_steps=4)
