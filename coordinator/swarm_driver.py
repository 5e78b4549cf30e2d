"""Swarm mode: average each stage's replicas with the run's Flower strategy, epoch by epoch.

An epoch runs once the live replicas have made `average_every` optimizer
steps (or `epoch_max_s` passed). For each stage, the strategy sends every
replica of that stage an instruction carrying the stage's last committed
average; each replica answers with its progress since its previous sync; the
strategy aggregates; the new averages are assembled into the full model,
evaluated and committed. A re-assigned peer starts from the committed average.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedswarm.coordinator.driver import RunProgress, arrays_to_state, state_to_arrays
from fedswarm.coordinator.grid import NodesView
from fedswarm.coordinator.strategies import build_strategy
from fedswarm.coordinator.strategy_state import export_state, import_state, split_checkpoint
from fedswarm.coordinator.swarm_registry import SwarmRegistry
from fedswarm.models import evaluate, load_trainable_state
from fedswarm.threads import BUDGET
from fedswarm.proto.run_state import RunState

log = logging.getLogger(__name__)


class SwarmDriver:
    def __init__(self, cfg, grid, registry: SwarmRegistry, store, stage_names: list[list[str]],
                 eval_model: torch.nn.Module, eval_windows: torch.Tensor, progress: RunProgress,
                 sync_timeout_s: float = 30.0, epoch_max_s: float = 30.0):
        self.cfg, self.grid, self.registry, self.store = cfg, grid, registry, store
        self.stage_names, self.eval_model, self.eval_windows = stage_names, eval_model, eval_windows
        self.progress, self.sync_timeout_s, self.epoch_max_s = progress, sync_timeout_s, epoch_max_s
        self.strategies = [build_strategy(dataclasses.replace(cfg, min_clients=1)) for _ in stage_names]
        self.stage_arrays: list[ArrayRecord] = []
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.stop = threading.Event()

    # -- read by the service -------------------------------------------------------------
    def stage_state(self, stage: int, wait_s: float = 30.0) -> dict[str, torch.Tensor] | None:
        """The stage's latest committed average; None if the run has not loaded its stages within wait_s."""
        if not self.ready.wait(wait_s):
            return None
        with self._lock:
            return arrays_to_state(self.stage_arrays[stage])

    # -- the run -----------------------------------------------------------------------
    def run(self, initial_full: dict[str, torch.Tensor]) -> None:
        last = self.store.last_round()
        full = initial_full
        if last is not None:
            loaded, strat = split_checkpoint(self.store.load_checkpoint(last))
            full = {k: loaded[k] for k in initial_full}
            for s, strategy in enumerate(self.strategies):
                prefix = f"strategy/stage{s}/"
                import_state(strategy, {"strategy/" + k[len(prefix):]: v for k, v in strat.items()
                                        if k.startswith(prefix)}, self.stage_names[s])
            log.info("swarm: resuming after committed epoch %d", last)
        with self._lock:
            self.stage_arrays = [state_to_arrays({k: full[k] for k in names}) for names in self.stage_names]
        self.ready.set()
        if last is None:
            self._commit({"round": 0, "eval_loss": self._eval(full), "train_loss": None, "clients": [],
                          "bytes_up": 0, "bytes_up_raw": 0, "seconds": 0.0}, full)
            last = 0
        epoch = last + 1
        while epoch <= self.cfg.rounds and not self.stop.is_set():
            start = time.time()
            self._wait_for_progress()
            with self.progress.lock:
                self.progress.state, self.progress.current_round = RunState.RUNNING, epoch
            results = [None] * len(self.stage_names)
            threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, self._stage_round(s, epoch)))
                       for s in range(len(self.stage_names))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.grid.updates.release_round(epoch)   # spilled updates (robust strategies) of this epoch
            if not any(r for r in results):
                log.warning("swarm epoch %d: no stage could be averaged; retrying", epoch)
                continue
            with self._lock:
                full = {k: v for arrays in self.stage_arrays for k, v in arrays_to_state(arrays).items()}
            record = {"round": epoch, "eval_loss": self._eval(full), "train_loss": self.registry.take_train_loss(),
                      "clients": sorted({n for r in results if r for n in r["clients"]}),
                      "bytes_up": sum(r["bytes_up"] for r in results if r),
                      "bytes_up_raw": sum(r["bytes_up_raw"] for r in results if r),
                      "seconds": time.time() - start}
            self._commit(record, full)
            log.info("swarm epoch %d committed: eval loss %.4f (stages averaged: %s)", epoch, record["eval_loss"],
                     [s for s, r in enumerate(results) if r])
            epoch += 1
        with self.progress.lock:
            if epoch > self.cfg.rounds:
                self.progress.state = RunState.DONE
            self.progress.current_round = 0
        if epoch > self.cfg.rounds:
            self.progress.done.set()
            self.grid.close()

    def _wait_for_progress(self) -> None:
        """Until every live replica made `average_every` optimizer steps, or epoch_max_s passed."""
        deadline, tick = time.monotonic() + self.epoch_max_s, threading.Event()
        while time.monotonic() < deadline and not self.stop.is_set():
            steps = [n for s in range(len(self.stage_names)) for n in self.registry.steps_since_sync(s)]
            if steps and min(steps) >= self.cfg.average_every:
                return
            tick.wait(0.2)

    def _stage_round(self, stage: int, epoch: int) -> dict | None:
        if not self.registry.stage_peers(stage):
            return None  # Flower's sampler would wait forever for a node; the stage keeps its average
        view = NodesView(self.grid, lambda: self.registry.stage_peers(stage))  # its stage's live replicas
        strategy = self.strategies[stage]
        with self._lock:
            arrays = self.stage_arrays[stage]
        messages = list(strategy.configure_train(epoch, arrays, ConfigRecord({"stage": stage}), view))
        with self.progress.lock:
            self.progress.configured_round = max(self.progress.configured_round, epoch)
        replies = list(view.send_and_receive(messages, timeout=self.sync_timeout_s))
        ok = [m for m in replies if not m.has_error()]
        if not ok:
            return None
        new_arrays, metrics = strategy.aggregate_train(epoch, replies)
        if new_arrays is None:
            return None
        with self._lock:
            self.stage_arrays[stage] = new_arrays
        self.registry.synced([m.metadata.src_node_id for m in ok])  # else the next epoch starts on stale counts
        self.registry.stage_synced(stage)
        return {"clients": [m.content.config_records["client"]["name"] for m in ok],
                "bytes_up": sum(int(m.content["metrics"]["bytes-up"]) for m in ok),
                "bytes_up_raw": sum(int(m.content["metrics"]["bytes-up-raw"]) for m in ok),
                "train_loss": float(metrics["train_loss"]) if metrics and "train_loss" in metrics else None}

    def _eval(self, full: dict[str, torch.Tensor]) -> float:
        load_trainable_state(self.eval_model, full)
        BUDGET.refresh()   # share the cores with the peers and trainers running on this host
        return evaluate(self.eval_model, self.eval_windows)

    def _commit(self, record: dict, full: dict[str, torch.Tensor]) -> None:
        extra = {}
        for s, strategy in enumerate(self.strategies):
            extra.update({f"strategy/stage{s}/{k[len('strategy/'):]}": v
                          for k, v in export_state(strategy, self.stage_names[s]).items()})
        self.store.commit_round(record, {**full, **extra})
        with self.progress.lock:
            self.progress.rounds.append({k: record[k] for k in
                                         ("round", "eval_loss", "train_loss", "clients", "bytes_up", "bytes_up_raw", "seconds")})


@dataclasses.dataclass
class SwarmContext:
    """What the service needs in swarm mode."""

    registry: SwarmRegistry
    driver: SwarmDriver
    dht_peers: list[str]
    node: object  # the coordinator's own hivemind node (the swarm's bootstrap peer)


def start_swarm(cfg, grid, store, progress: RunProgress, windows: torch.Tensor, round_timeout_s: float,
                p2p_host: str = "127.0.0.1", p2p_announce: str = ""):
    """Build the eval model, stage layout, registry, driver and the coordinator's DHT node (the bootstrap peer
    everyone is handed: it binds `p2p_host` and announces `p2p_announce` if given)."""
    from fedswarm.p2p import SwarmNode
    from fedswarm.models import trainable_state
    from fedswarm.stages import build_untied_model, stage_param_names

    if cfg.peft == "lora":   # only the adapters are averaged, per stage; the frozen base stays on each side
        from fedswarm.stage_lora import lora_eval_model, lora_stage_names

        run = dataclasses.asdict(cfg)
        model = lora_eval_model(run)
        names = [lora_stage_names(run, s) for s in range(cfg.stages)]
    else:
        model = build_untied_model(cfg.model, seed=cfg.seed)
        names = [stage_param_names(cfg.model, s, cfg.stages) for s in range(cfg.stages)]
    initial = trainable_state(model)
    assert sorted(initial) == sorted(n for stage in names for n in stage), "stage names do not cover the model"
    registry = SwarmRegistry(cfg.stages)
    driver = SwarmDriver(cfg, grid, registry, store, names, model, windows, progress,
                         sync_timeout_s=min(round_timeout_s, 60.0))
    node = SwarmNode(host=p2p_host, announce=p2p_announce)
    maddrs = node.maddrs()
    log.info("swarm bootstrap peers: %s", " ".join(maddrs))
    return SwarmContext(registry, driver, maddrs, node), initial
