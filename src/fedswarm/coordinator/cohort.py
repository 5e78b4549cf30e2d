"""Cohorts: whom the round engine (coordinator/driver.py) trains, on which slice of the model, with which strategy.

A cohort is a Flower strategy, a view of the Grid (NodesView) and the names of its slice of the parameters.
Federated mode runs one cohort over every parameter (FederatedCohort); swarm mode one per pipeline stage
(coordinator/swarm_driver.py), all in the same round. A cohort configures, sends and aggregates; the engine
does the rest (resume, commit, evaluation, backoff, --max-failed-rounds, the round records)."""
from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedswarm.coordinator.integrity import refused_aggregate
from fedswarm.coordinator.strategy_state import PREFIX, export_state, import_state

log = logging.getLogger(__name__)
T = TypeVar("T")
SAMPLER = threading.Lock()   # Flower samples from the global `random`: one seeded draw at a time


def round_seed(seed: int, rnd: int, offset: int = 0) -> int:
    """The sampler's seed for round `rnd` (+ `offset`: a stream of its own), so a run and its restart sample alike."""
    return seed * 1_000_003 + rnd + offset


def sampled(seed: int, draw: Callable[[], T]) -> T:
    """`draw()` (a strategy's configure_*) with Flower's sampler seeded, while no other thread reseeds it."""
    with SAMPLER:
        random.seed(seed)
        return draw()


@dataclasses.dataclass
class Turn:
    """What the engine hands a cohort for one round."""

    rnd: int
    arrays: ArrayRecord                 # the cohort's slice as last aggregated
    configured: Callable[[], None]      # call once the instructions are out (the run's progress)
    settle: Callable[[], None]          # call before aggregating: the last round's commit has landed


@dataclasses.dataclass
class CohortResult:
    """One cohort's round: its new slice (None: nothing usable, the slice keeps its value) and what it cost."""

    arrays: ArrayRecord | None = None
    replies: list[Message] = dataclasses.field(default_factory=list)   # the usable ones
    sent: int = 0                        # instructions sent
    train_loss: float | None = None
    tokens_per_example: int = 1          # a reply's num-examples counts sequences (federated) or tokens (stages)
    configured_at: float | None = None
    secagg: dict | None = None           # --secure-aggregation: who shared keys, survived, was recovered

    @property
    def tokens(self) -> int:
        return sum(int(m.content["metrics"]["num-examples"]) for m in self.replies) * self.tokens_per_example


class Cohort:
    """configure_train -> send_and_receive -> aggregate_train over one view and one slice; subclasses say
    what to send, whom to sample and what a usable round is."""

    prefix = ""            # of its strategy's state in checkpoints: strategy/<prefix><attr>/<tensor>
    seed_offset = 0        # of its sampler's stream
    tokens_per_example = 1

    def __init__(self, name: str, strategy: Strategy, view: Grid, names: list[str], seed: int, timeout_s: float):
        self.name, self.strategy, self.view, self.names = name, strategy, view, names
        self.seed, self.timeout_s = seed, timeout_s

    def run(self, turn: Turn) -> CohortResult:
        """One round; the result's arrays are None when nothing usable came back."""
        rnd = turn.rnd
        messages = sampled(round_seed(self.seed, rnd, self.seed_offset), lambda: list(
            self.strategy.configure_train(rnd, turn.arrays, self.config(rnd), self.view)))
        turn.configured()
        result = CohortResult(sent=len(messages), tokens_per_example=self.tokens_per_example,
                              configured_at=time.time())
        messages = self.before_train(rnd, messages)
        log.info("%s: round %d: sent %d train instructions", self.name, rnd, len(messages))
        replies = list(self.view.send_and_receive(messages, timeout=self.timeout_s))
        result.replies = [m for m in replies if not m.has_error()]
        if not self.usable(rnd, result):
            return result
        turn.settle()
        replies = self.after_train(rnd, replies, result)
        arrays, metrics = self.strategy.aggregate_train(rnd, replies)
        if arrays is None or self.refused(rnd, arrays, turn.arrays):
            return result
        result.arrays = arrays
        result.train_loss = float(metrics["train_loss"]) if metrics and "train_loss" in metrics else None
        self.averaged(result)
        return result

    # -- what subclasses say -------------------------------------------------------------
    def before_train(self, rnd: int, messages: list[Message]) -> list[Message]:
        """The train instructions to send (secure aggregation's key stages come first: secagg_round.py)."""
        return messages

    def after_train(self, rnd: int, replies: list[Message], result: CohortResult) -> list[Message]:
        """The replies to aggregate (secure aggregation unmasks their sum here)."""
        return replies

    def config(self, rnd: int) -> ConfigRecord:
        return ConfigRecord({})

    def usable(self, rnd: int, result: CohortResult) -> bool:
        """Whether the replies are worth aggregating (else the round is repeated, or the slice kept)."""
        return bool(result.replies)

    def refused(self, rnd: int, aggregate: ArrayRecord, arrays: ArrayRecord) -> bool:
        """Whether the aggregate must not be committed."""
        return False

    def averaged(self, result: CohortResult) -> None:
        """The slice was averaged."""

    # -- its strategy's state in checkpoints -----------------------------------------------
    def export(self) -> dict:
        return {PREFIX + self.prefix + k[len(PREFIX):]: v for k, v in export_state(self.strategy, self.names).items()}

    def restore(self, tensors: dict) -> int:
        """Set what `export` saved (in a checkpoint's strategy/ tensors); how many attributes were restored."""
        mine = PREFIX + self.prefix
        return import_state(self.strategy, {PREFIX + k[len(mine):]: v for k, v in tensors.items()
                                            if k.startswith(mine)}, self.names)


class FederatedCohort(Cohort):
    """Federated mode: every training client on the whole model; the round needs a usable reply (all of them
    without `accept_failures`) and a finite aggregate."""

    def __init__(self, cfg, strategy: Strategy, view: Grid, names: list[str], timeout_s: float, store, sink,
                 accept_failures: bool = True):
        super().__init__("federated", strategy, view, names, cfg.seed, timeout_s)
        self.cfg, self.store, self.sink, self.accept_failures = cfg, store, sink, accept_failures
        self.tokens_per_example = cfg.seq_len

    def config(self, rnd: int) -> ConfigRecord:
        return ConfigRecord({"local-steps": self.cfg.local_steps, "lr": self.cfg.lr,   # lr: the schedule's peak
                             "global-step": (rnd - 1) * self.cfg.local_steps,
                             "total-steps": self.cfg.rounds * self.cfg.local_steps})

    def usable(self, rnd: int, result: CohortResult) -> bool:
        ok, failures = len(result.replies), result.sent - len(result.replies)
        if not ok or (failures and not self.accept_failures):
            log.warning("round %d: %d of %d replies usable; repeating the round", rnd, ok, result.sent)
            return False
        return True

    def refused(self, rnd: int, aggregate: ArrayRecord, arrays: ArrayRecord) -> bool:
        return refused_aggregate(rnd, aggregate, arrays, self.strategy, self.store, self.sink)
