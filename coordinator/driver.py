"""Round driver: a Flower strategy called round by round over our Grid, each round committed to disk."""
from __future__ import annotations

import logging
import random
import threading
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedswarm.coordinator.aggregate import rss_bytes
from fedswarm.coordinator.config import CoordinatorTimeouts, RunConfig
from fedswarm.coordinator.store import Store
from fedswarm.coordinator.strategy_state import export_state, import_state, split_checkpoint
from fedswarm.models import evaluate, load_trainable_state
from fedswarm.threads import BUDGET

log = logging.getLogger(__name__)
ROUND_FIELDS = ("round", "eval_loss", "train_loss", "clients", "bytes_up", "bytes_up_raw", "seconds",
                "bytes_down", "bytes_down_raw", "tokens")   # what status and the store keep of each round


def arrays_to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().float() for k, v in state.items()})


class RunProgress:
    """What status reports: shared by the driver (writer) and the service (reader)."""

    def __init__(self, cfg: RunConfig, rounds: list[dict]):
        self.lock = threading.Lock()
        self.state = "waiting"
        self.rounds_total = cfg.rounds
        self.rounds: list[dict] = list(rounds)
        self.current_round = 0          # round in flight (0 when none)
        self.configured_round = 0       # the last round whose instructions went out
        self.done = threading.Event()

    @property
    def committed_round(self) -> int:
        with self.lock:
            return self.rounds[-1]["round"] if self.rounds else 0


class RunFailed(RuntimeError):
    """Too many rounds in a row brought no usable reply: the run gives up (state `failed`)."""


class RoundDriver:
    """Runs rounds (last committed + 1) .. cfg.rounds; resumes from the store's last checkpoint."""

    def __init__(self, cfg: RunConfig, grid: Grid, strategy: Strategy, store: Store, model: torch.nn.Module,
                 eval_windows: torch.Tensor, progress: RunProgress, round_timeout_s: float,
                 accept_failures: bool = True, timeouts: CoordinatorTimeouts | None = None):
        self.cfg, self.grid, self.strategy, self.store = cfg, grid, strategy, store
        self.timeouts = timeouts or CoordinatorTimeouts(round_timeout_s=round_timeout_s)
        self.model, self.eval_windows, self.progress = model, eval_windows, progress
        self.round_timeout_s = round_timeout_s
        self.accept_failures = accept_failures
        self.stop = threading.Event()

    def eval_loss(self, state: dict[str, torch.Tensor]) -> float:
        load_trainable_state(self.model, state)
        BUDGET.refresh()   # share the cores with clients running on this host
        return evaluate(self.model, self.eval_windows)

    def run(self, initial_state: dict[str, torch.Tensor]) -> None:
        last = self.store.last_round()
        if last is None:  # round 0: the initial model
            record = {"round": 0, "eval_loss": self.eval_loss(initial_state), "train_loss": None,
                      "clients": [], "bytes_up": 0, "bytes_up_raw": 0, "seconds": 0.0,
                      "bytes_down": 0, "bytes_down_raw": 0, "tokens": 0}
            self._commit(record, initial_state)
            state, last = initial_state, 0
        else:
            loaded, strategy_state = split_checkpoint(self.store.load_checkpoint(last))
            if set(loaded) != set(initial_state):
                raise ValueError(f"the checkpoint of round {last} does not match model {self.cfg.model!r}")
            # safetensors sorts keys; strategies zip arrays by position, so keep the model's order.
            state = {k: loaded[k] for k in initial_state}
            restored = import_state(self.strategy, strategy_state, list(state))
            log.info("resuming after committed round %d (%d strategy state entries restored)", last, restored)
        arrays = state_to_arrays(state)
        rnd, failed = last + 1, 0
        while rnd <= self.cfg.rounds and not self.stop.is_set():
            new_arrays, record = self._one_round(rnd, arrays)
            if new_arrays is None:  # redo the same round (nothing usable came back), after a growing pause
                failed += 1
                self._back_off(rnd, failed)
                continue
            failed = 0
            arrays = new_arrays
            self._commit(record, arrays_to_state(arrays))
            rnd += 1
        with self.progress.lock:
            self.progress.state = "done" if rnd > self.cfg.rounds else self.progress.state
            self.progress.current_round = 0
            finished = self.progress.state == "done"
        if finished:
            self.progress.done.set()
            close = getattr(self.grid, "close", None)
            if close is not None:
                close()

    def _back_off(self, rnd: int, failed: int) -> None:
        t = self.timeouts
        if t.max_failed_rounds and failed >= t.max_failed_rounds:
            with self.progress.lock:
                self.progress.state, self.progress.current_round = "failed", 0
            raise RunFailed(f"round {rnd} brought no usable reply {failed} times in a row (--max-failed-rounds "
                            f"{t.max_failed_rounds}): check the clients' logs, then restart on the same --state-dir")
        delay = min(t.failed_round_backoff_s * 2 ** (failed - 1), t.failed_round_backoff_max_s)
        log.warning("round %d: attempt %d brought no usable reply; repeating it in %.1f s", rnd, failed, delay)
        self.stop.wait(delay)

    def _one_round(self, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord | None, dict]:
        start = time.time()
        with self.progress.lock:
            self.progress.state = "running" if self.progress.rounds[-1]["round"] > 0 else "waiting"
            self.progress.current_round = rnd
        config = ConfigRecord({"local-steps": self.cfg.local_steps, "lr": self.cfg.lr,  # lr: the schedule's peak
                               "global-step": (rnd - 1) * self.cfg.local_steps,
                               "total-steps": self.cfg.rounds * self.cfg.local_steps})
        # Flower's sample_nodes waits (polling) until min_available_nodes have joined, then draws
        # K of them from the global RNG: seeded per round, so a run (and its restart) samples alike.
        random.seed(self.cfg.seed * 1_000_003 + rnd)
        messages = list(self.strategy.configure_train(rnd, arrays, config, self.grid))
        with self.progress.lock:
            self.progress.configured_round = rnd
        with self.progress.lock:
            self.progress.state = "running"
        log.info("round %d: sent %d train instructions", rnd, len(messages))
        replies: list[Message] = list(self.grid.send_and_receive(messages, timeout=self.round_timeout_s))
        ok = [m for m in replies if not m.has_error()]
        failures = len(messages) - len(ok)
        if not ok or (failures and not self.accept_failures):
            log.warning("round %d: %d of %d replies usable; repeating the round", rnd, len(ok), len(messages))
            return None, {}
        try:
            new_arrays, metrics = self.strategy.aggregate_train(rnd, replies)
        finally:
            sink = getattr(self.grid, "updates", None)   # our SessionGrid's UpdateSink (aggregate.py)
            if sink is not None:
                sink.release_round(rnd)   # spilled updates of this round (robust strategies)
        if new_arrays is None:
            return None, {}
        memory = rss_bytes()
        if memory:  # read by `fedswarm bench aggregate`
            log.info("round %d aggregated: RSS %d, peak RSS %d bytes", rnd, memory["VmRSS"], memory["VmHWM"])
        state = arrays_to_state(new_arrays)
        eval_loss = self.eval_loss(state)
        record = {
            "round": rnd, "eval_loss": eval_loss,
            "train_loss": float(metrics["train_loss"]) if metrics and "train_loss" in metrics else None,
            "clients": sorted(_client_name(m) for m in ok),
            "bytes_up": sum(int(m.content["metrics"]["bytes-up"]) for m in ok),
            "bytes_up_raw": sum(int(m.content["metrics"]["bytes-up-raw"]) for m in ok),
            "bytes_down": sum(int(m.content["metrics"].get("bytes-down", 0)) for m in ok),
            "bytes_down_raw": sum(int(m.content["metrics"].get("bytes-down-raw", 0)) for m in ok),
            "tokens": sum(int(m.content["metrics"]["num-examples"]) for m in ok) * self.cfg.seq_len,
            "seconds": time.time() - start,
            "failures": failures,
        }
        log.info("round %d committed: eval loss %.4f, %d replies, %d failures", rnd, eval_loss, len(ok), failures)
        return new_arrays, record

    def _commit(self, record: dict, state: dict[str, torch.Tensor]) -> None:
        self.store.commit_round(record, {**state, **export_state(self.strategy, list(state))})
        with self.progress.lock:
            self.progress.rounds.append({k: record.get(k) for k in ROUND_FIELDS})


def _client_name(msg: Message) -> str:
    return msg.content.config_records["client"]["name"] if "client" in msg.content.config_records else str(msg.metadata.src_node_id)
