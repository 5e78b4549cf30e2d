"""Swarm mode: average each stage's replicas with the run's Flower strategy, epoch by epoch.

The round engine (coordinator/driver.py) runs one cohort per stage, all at once. An epoch starts once the
live replicas have made `average_every` optimizer steps (or `epoch_max_s` passed). Each stage's cohort sends
every replica of that stage an instruction carrying the stage's last average; each replica answers with its
progress since its previous sync; the strategy aggregates. The engine evaluates and commits the model the new
averages make up. A stage with no replica keeps its average; one whose round raises is a failure of the epoch,
and an epoch in which no stage could be averaged is repeated (and counts towards --max-failed-rounds). A
re-assigned peer starts from its stage's latest average.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch
from flwr.app import ConfigRecord

from fedswarm.coordinator.arbiter import StageArbiter
from fedswarm.coordinator.cohort import Cohort, CohortResult, Turn
from fedswarm.coordinator.config import CoordinatorTimeouts
from fedswarm.coordinator.driver import RoundEngine, RunProgress
from fedswarm.coordinator.grid import NodesView
from fedswarm.coordinator.strategies import build_strategy
from fedswarm.coordinator.swarm_registry import SwarmRegistry

log = logging.getLogger(__name__)
STAGE_SEED_STRIDE = 1 << 32   # each stage samples from a seeded stream of its own


class StageCohort(Cohort):
    """One pipeline stage: the replicas it has as the epoch starts, on its slice of the model."""

    def __init__(self, stage: int, cfg, registry: SwarmRegistry, grid, names: list[str], timeout_s: float):
        self.stage, self.registry, self._peers = stage, registry, []
        super().__init__(f"stage {stage}", build_strategy(dataclasses.replace(cfg, min_clients=1)),
                         NodesView(grid, lambda: self._peers), names, cfg.seed, timeout_s)
        self.prefix, self.seed_offset = f"stage{stage}/", stage * STAGE_SEED_STRIDE

    def run(self, turn: Turn) -> CohortResult:
        self._peers = self.registry.stage_peers(self.stage)   # fixed for the epoch: the sampler never waits
        if not self._peers:
            return CohortResult()   # Flower's sampler would wait forever for a node; the stage keeps its average
        return super().run(turn)

    def config(self, rnd: int) -> ConfigRecord:
        return ConfigRecord({"stage": self.stage})

    def averaged(self, result: CohortResult) -> None:
        self.registry.synced([m.metadata.src_node_id for m in result.replies])  # else the next epoch starts on stale counts
        self.registry.stage_synced(self.stage)


class SwarmDriver(RoundEngine):
    """The round engine over one cohort per stage; an epoch starts after `average_every` steps."""

    def __init__(self, cfg, grid, registry: SwarmRegistry, store, stage_names: list[list[str]],
                 eval_model: torch.nn.Module, eval_windows: torch.Tensor, progress: RunProgress,
                 sync_timeout_s: float = 30.0, epoch_max_s: float = 30.0, timeouts: CoordinatorTimeouts | None = None):
        cohorts = [StageCohort(s, cfg, registry, grid, names, sync_timeout_s) for s, names in enumerate(stage_names)]
        super().__init__(cfg, grid, store, progress, cohorts, timeouts or CoordinatorTimeouts(), eval_model,
                         eval_windows)
        self.registry, self.stage_names, self.epoch_max_s = registry, stage_names, epoch_max_s

    # -- read by the service -------------------------------------------------------------
    def stage_state(self, stage: int, wait_s: float = 30.0) -> dict[str, torch.Tensor] | None:
        """The stage's latest average; None if the run has not loaded its stages within wait_s."""
        return self.slice_state(stage, wait_s)

    # -- the start policy and the epoch's loss ---------------------------------------------
    def wait_to_start(self) -> None:
        """Until some stage has a live replica; then until every live replica made `average_every` optimizer
        steps, or epoch_max_s passed."""
        tick = threading.Event()
        while not self.stop.is_set() and not any(self.registry.stage_peers(s) for s in range(len(self.stage_names))):
            tick.wait(0.2)
        deadline = time.monotonic() + self.epoch_max_s
        while time.monotonic() < deadline and not self.stop.is_set():
            steps = [n for s in range(len(self.stage_names)) for n in self.registry.steps_since_sync(s)]
            if steps and min(steps) >= self.cfg.average_every:
                return
            tick.wait(0.2)

    def train_loss(self, results: list[CohortResult]) -> float | None:
        """The trainers' mean reported loss since the last epoch (the loss the pipeline computes)."""
        return self.registry.take_train_loss()


@dataclasses.dataclass
class SwarmContext:
    """What the service needs in swarm mode."""

    registry: SwarmRegistry
    driver: SwarmDriver
    dht_peers: list[str]
    node: object  # the coordinator's own hivemind node (the swarm's bootstrap peer)


def start_swarm(cfg, grid, store, progress: RunProgress, windows: torch.Tensor, timeouts: CoordinatorTimeouts,
                p2p_host: str = "127.0.0.1", p2p_announce: str = "", run_id: str = ""):
    """Build the eval model, stage layout, registry, driver and the coordinator's DHT node (the bootstrap peer
    everyone is handed: it binds `p2p_host` and announces `p2p_announce` if given)."""
    from fedswarm.p2p import SwarmNode
    from fedswarm.models import trainable_state
    from fedswarm.stages import build_untied_model, stage_param_names

    if cfg.peft == "lora":   # only the adapters are averaged, per stage; the frozen base stays on each side
        from fedswarm.stage_lora import lora_eval_model, lora_stage_names

        model = lora_eval_model(cfg)
        names = [lora_stage_names(cfg, s) for s in range(cfg.stages)]
    else:
        model = build_untied_model(cfg.model, seed=cfg.seed)
        names = [stage_param_names(cfg.model, s, cfg.stages) for s in range(cfg.stages)]
    initial = trainable_state(model)
    assert sorted(initial) == sorted(n for stage in names for n in stage), "stage names do not cover the model"
    registry = SwarmRegistry(cfg.stages)
    registry.run_id = run_id   # what stage receipts are signed for (lying reports)
    registry.chained = cfg.swarm_traffic == "chained" and cfg.stages > 1   # neighbours confirm replicas' work
    driver = SwarmDriver(cfg, grid, registry, store, names, model, windows, progress,
                         sync_timeout_s=min(timeouts.round_timeout_s, 60.0), timeouts=timeouts)
    registry.arbiter = StageArbiter(cfg, lambda stage: driver.stage_state(stage, wait_s=0), store.kept_tensors)
    node = SwarmNode(host=p2p_host, announce=p2p_announce)
    maddrs = node.maddrs()
    log.info("swarm bootstrap peers: %s", " ".join(maddrs))
    return SwarmContext(registry, driver, maddrs, node), initial
