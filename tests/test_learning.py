"""Learning across rounds: evaluation on the trained data's held-out split, lr schedules, compressed downloads,
communication accounting. Real coordinator and client processes (sim/processes.py)."""
from __future__ import annotations

import argparse
import math
import random

import pytest
import torch

from fedswarm.data import eval_windows, load_eval_tokens
from fedswarm.models import build_model, evaluate, trainable_state
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


@pytest.mark.timeout(300)
def test_sim_evaluates_on_the_data_files_split(tmp_path):
    corpus = write_corpus(tmp_path / "plays.txt")
    report = run_sim(sim_args(tmp_path / "sim", "--data", corpus, "--clients", "1", "--rounds", "1",
                              "--local-steps", "2", *SMALL), log=lambda *_: None)
    assert report["config"]["eval_data"] == corpus
    on_file, on_stdlib = initial_eval_loss(corpus), initial_eval_loss("stdlib")
    assert abs(on_file - on_stdlib) > 1e-3, "the corpus must be distinguishable from stdlib"
    assert math.isclose(report["rounds"][0]["eval_loss"], on_file, rel_tol=1e-4), (
        report["rounds"][0]["eval_loss"], on_file, on_stdlib)
