"""Helpers the tests share (instead of importing each other's modules): swarm runs of real processes and
their status, and the lr schedule a client logged. On top of the layers, beside the app and the sim."""
from __future__ import annotations

import functools
import math
import re
from contextlib import contextmanager
from pathlib import Path

from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status, wait_until

SWARM_SMALL = ["--seq-len", "64", "--batch-size", "8"]   # a swarm run's micro-batch in tests
until = functools.partial(wait_until, clean_exit_ok=False)  # any exit of a watched process is a failure


def swarm_status(address: str) -> dict:
    return fetch_status(address)["swarm"]


def stage_of(swarm: dict, name: str) -> int | None:
    return next((s["stage"] for s in swarm["stages"] if name in s["peers"]), None)


def completed(address: str) -> int:
    """Micro-batches the swarm's trainers completed, as status counts them."""
    return swarm_status(address)["microbatches_completed"]


class Swarm:
    """The peers and trainers of one test; `close()` stops every one of them."""

    def __init__(self, out: Path, address: str, coordinator: Proc):
        self.out, self.address, self.coordinator = out, address, coordinator
        self.procs: dict[str, Proc] = {}

    def start_peer(self, name: str, expected_stage: int, env: dict | None = None) -> Proc:
        """Start a peer and wait until status shows it joined on `expected_stage`."""
        argv = fedswarm_cmd("client", "--role", "peer", "--coordinator", self.address, "--name", name,
                            "--threads", "1")
        proc = self.procs[name] = Proc(name, argv, self.out / f"{name}.log", env=env)

        def joined():
            stage = stage_of(swarm_status(self.address), name)
            return stage is not None and [stage]
        stage = until(f"{name} joined", joined, 90, [proc, self.coordinator])[0]
        if stage != expected_stage:
            raise AssertionError(f"{name} landed on stage {stage}, expected {expected_stage}")
        return proc

    def start_trainer(self, name: str = "t0") -> Proc:
        argv = fedswarm_cmd("client", "--role", "trainer", "--coordinator", self.address, "--name", name,
                            "--threads", "1", "--inflight", "1")
        proc = self.procs[name] = Proc(name, argv, self.out / f"{name}.log")
        return proc

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):   # the trainer first: no bans logged at teardown
            proc.stop()


@contextmanager
def swarm_run(out: Path, stages: int, rounds: int, average_every: int, extra: list[str] = ()):
    """A swarm coordinator on its own state dir; yields a `Swarm` to start peers and trainers on."""
    args = ["--state-dir", str(out / "state"), "--mode", "swarm", "--stages", str(stages), "--rounds", str(rounds),
            "--average-every", str(average_every), *SWARM_SMALL, *extra]
    with coordinator_process(out, args) as (coordinator, address):
        swarm = Swarm(out, address, coordinator)
        try:
            yield swarm
        finally:
            swarm.close()


LR_LINE = re.compile(r"round (\d+): lr (\S+) -> (\S+) over global steps (\d+)\.\.(\d+) of (\d+)")


def logged_lrs(log_text: str) -> dict[int, tuple[float, float, int, int, int]]:
    """round -> (first lr, last lr, first global step, last global step, total steps) from a client log."""
    return {int(m[1]): (float(m[2]), float(m[3]), int(m[4]), int(m[5]), int(m[6])) for m in LR_LINE.finditer(log_text)}


def assert_lrs_follow(log_text: str, schedule, rounds: int, local_steps: int) -> None:
    """Each round's first and last lr in a client's log are `schedule`'s at the round's global steps."""
    seen = logged_lrs(log_text)
    if sorted(seen) != list(range(1, rounds + 1)):
        raise AssertionError(f"rounds logged {sorted(seen)}, expected 1..{rounds}\n{log_text[-2000:]}")
    for rnd, (lr0, lr1, s0, s1, total) in seen.items():
        steps = ((rnd - 1) * local_steps, rnd * local_steps - 1, rounds * local_steps)
        if (s0, s1, total) != steps:
            raise AssertionError(f"round {rnd}: global steps {(s0, s1, total)}, expected {steps}")
        for lr, step in ((lr0, s0), (lr1, s1)):
            if not math.isclose(lr, schedule.lr_at(step), rel_tol=1e-5):
                raise AssertionError(f"round {rnd}: lr {lr} at step {step}, the schedule says {schedule.lr_at(step)}")


WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings arrows of outrageous fortune "
         "take arms against a sea troubles and by opposing end them die sleep no more").split()


def write_corpus(path: Path, n_bytes: int = 120_000, seed: int = 1) -> str:
    """A text file of random lines of words: unlike Python sources, so a wrong eval split shows."""
    import random

    rng, lines, size = random.Random(seed), [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".\n"
        lines.append(line)
        size += len(line)
    path.write_text("".join(lines))
    return str(path)


def sim_args(out: Path, *argv: str):
    """`fedswarm sim`'s parsed flags (quiet, fp32) for an in-process run_sim."""
    import argparse

    from fedswarm.sim.launcher import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--out", str(out), "--quiet", "--precision", "fp32", *argv])


def initial_eval_loss(data: str, seq_len: int = 32, windows: int = 64) -> float:
    """What the coordinator's round-0 eval loss must be when it evaluates on `data`'s held-out split."""
    import torch

    from fedswarm.data import eval_windows, load_eval_tokens
    from fedswarm.models import build_model, evaluate

    torch.set_num_threads(1)
    model = build_model("gpt2-tiny", seed=0)
    return evaluate(model, eval_windows(load_eval_tokens(data), seq_len, windows))


STAGE_CFG = {"model": "gpt2-tiny", "stages": 3, "seed": 0, "lr": 1e-3, "seq_len": 16, "batch_size": 2,
             "activation_codec": "bf16"}   # a stage peer's run config in tests: the middle stage, hidden in and out


@functools.cache
def _middle_stage() -> dict:
    from fedswarm.stages import Stage, build_untied_model, stage_state

    return stage_state(Stage(build_untied_model("gpt2-tiny", 0), 1, 3))


@contextmanager
def middle_stage_server():
    """A StageServer serving the middle stage of gpt2-tiny (STAGE_CFG), as a peer would."""
    import torch

    from fedswarm.client.swarm.stage_server import StageServer

    server = StageServer("run", STAGE_CFG, torch.device("cpu"), "fp32")
    server.serve(1, {n: t.clone() for n, t in _middle_stage().items()})
    try:
        yield server
    finally:
        server.close()
