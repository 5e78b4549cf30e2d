"""Helpers the tests share (instead of importing each other's modules): swarm runs of real processes and
their status, the lr schedule the round records show, and mutated codec encodings for the fuzz tests. On top
of the layers, beside the app and the sim."""
from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fedswarm.proto import codec as C
from fedswarm.run_config import RunConfig
from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status, stop_all, wait_until

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
    """The peers and trainers of one test; `close()` stops every one of them, and the coordinator."""

    def __init__(self, out: Path, address: str, coordinator: Proc):
        self.out, self.address, self.coordinator = out, address, coordinator
        self.procs: dict[str, Proc] = {}
        self.trainers: list[Proc] = []

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

    def start_trainer(self, name: str = "t0", extra: list[str] = ()) -> Proc:
        argv = fedswarm_cmd("client", "--role", "trainer", "--coordinator", self.address, "--name", name,
                            "--threads", "1", "--inflight", "1", *extra)
        proc = self.procs[name] = Proc(name, argv, self.out / f"{name}.log")
        self.trainers.append(proc)
        return proc

    def close(self) -> None:
        """The trainers first (no bans logged at teardown), then every peer and the coordinator at once."""
        stop_all(self.trainers)
        stop_all([*self.procs.values(), self.coordinator])


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


def assert_lrs_follow(rounds: list[dict], schedule, n_rounds: int, local_steps: int, clients: list[str]) -> None:
    """In the round records (status or report.json `rounds`), each client's first and last lr of each round
    (its `client_metrics`) are `schedule`'s at the round's first and last global step."""
    trained = {r["round"]: r for r in rounds if r["round"] > 0}
    if sorted(trained) != list(range(1, n_rounds + 1)):
        raise AssertionError(f"rounds recorded {sorted(trained)}, expected 1..{n_rounds}")
    for rnd, record in trained.items():
        for name in clients:
            figures = (record.get("client_metrics") or {}).get(name)
            if figures is None:
                raise AssertionError(f"round {rnd}: no lr reported by {name}: {record}")
            for key, step in (("lr-first", (rnd - 1) * local_steps), ("lr-last", rnd * local_steps - 1)):
                if not math.isclose(figures[key], schedule.lr_at(step), rel_tol=1e-5):
                    raise AssertionError(f"round {rnd}: {name}'s {key} {figures[key]} at global step {step}, "
                                         f"the schedule says {schedule.lr_at(step)}")


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


STAGE_CFG = RunConfig(model="gpt2-tiny", mode="swarm", stages=3, seed=0, lr=1e-3, seq_len=16, batch_size=2,
                      activation_codec="bf16")   # a stage peer's run config in tests: the middle stage, hidden in and out


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


# -- codec fuzzing (test_topk, test_lowbit): bit flips in data or scales, truncations, changed parameters --
def mutated(base: C.Encoded, seed: int, count: int = 600) -> Iterator[C.Encoded]:
    rng = random.Random(seed)
    for i in range(count):
        data, scales = bytearray(base.data), bytearray(base.scales)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data = data[:rng.randrange(len(data))] if rng.random() < 0.5 else data + rng.randbytes(rng.randrange(1, 9))
        elif kind == 2:
            scales[rng.randrange(len(scales))] ^= 1 << rng.randrange(8)
        enc = dataclasses.replace(base, data=bytes(data), scales=bytes(scales))
        if kind == 3:
            enc = dataclasses.replace(enc, **rng.choice([{"topk": rng.randrange(0, 300)}, {"bits": rng.randrange(0, 10)},
                                                        {"block_size": rng.randrange(0, 600)},
                                                        {"count": rng.randrange(0, 6000)}]))
        yield enc


def decoded(base: C.Encoded, seed: int, count: int = 600) -> tuple[list[tuple[C.Encoded, torch.Tensor]], int]:
    """Decode every mutation: ([(encoding, finite tensor of its count)] of those accepted, how many were refused
    with CodecError); any other exception fails the test."""
    accepted, refused = [], 0
    for enc in mutated(base, seed, count):
        try:
            y = C.decode(enc)
        except C.CodecError:
            refused += 1
            continue
        assert torch.isfinite(y).all() and y.numel() == enc.count
        accepted.append((enc, y))
    return accepted, refused
