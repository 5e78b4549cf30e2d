"""Round driver: a Flower strategy called round by round over our Grid, each round committed to disk.

A round's evaluation (central, federated or both) and its commit run on a background committer while the next
round trains; at most one commit is in flight, so the state on disk is never more than one round behind, and a
coordinator killed meanwhile resumes at its last committed round and re-runs the rest (as it always did)."""
from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedswarm.coordinator.aggregate import read_only_view, rss_bytes
from fedswarm.coordinator.committer import Committer
from fedswarm.coordinator.config import CoordinatorTimeouts, RunConfig
from fedswarm.coordinator.integrity import refused_aggregate
from fedswarm.coordinator.grid import NodesView
from fedswarm.coordinator.store import Store
from fedswarm.coordinator.strategies import evaluation_strategy
from fedswarm.coordinator.strategy_state import export_state, import_state, split_checkpoint
from fedswarm.models import evaluate, load_trainable_state
from fedswarm.threads import BUDGET
from fedswarm.proto.run_state import RunState

log = logging.getLogger(__name__)
ROUND_FIELDS = ("round", "eval_loss", "train_loss", "clients", "bytes_up", "bytes_up_raw", "seconds",
                "bytes_down", "bytes_down_raw", "tokens", "failures",   # what status and the store keep of each round
                "eval_source", "evals", "train_seconds", "started_at", "configured_at", "aggregated_at",
                "committed_at")
EVALUATOR = "evaluator"             # the role of a client that only evaluates (never sampled for training)
EVAL_SEED_OFFSET = 1 << 40          # evaluation samples from its own seeded stream, apart from training's


def arrays_to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record's tensors as read-only views of its own bytes (no copy): to evaluate, checkpoint or serve,
    never to write into."""
    return {k: read_only_view(v) for k, v in arrays.items()}


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().float() for k, v in state.items()})


class RunProgress:
    """What status reports: shared by the driver (writer) and the service (reader)."""

    def __init__(self, cfg: RunConfig, rounds: list[dict]):
        self.lock = threading.Lock()
        self.state = RunState.WAITING
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
    """Runs rounds (last committed + 1) .. cfg.rounds; resumes from the store's last checkpoint.

    `roles()` maps live node ids to their role: evaluators are never sampled for training, and federated
    evaluation samples them when any are connected (else the training clients)."""

    def __init__(self, cfg: RunConfig, grid: Grid, strategy: Strategy, store: Store, model: torch.nn.Module | None,
                 eval_windows: torch.Tensor | None, progress: RunProgress, round_timeout_s: float,
                 accept_failures: bool = True, timeouts: CoordinatorTimeouts | None = None,
                 roles: Callable[[], dict[int, str]] | None = None):
        self.cfg, self.grid, self.strategy, self.store = cfg, grid, strategy, store
        self.timeouts = timeouts or CoordinatorTimeouts(round_timeout_s=round_timeout_s)
        self.model, self.eval_windows, self.progress = model, eval_windows, progress
        self.round_timeout_s = round_timeout_s
        self.accept_failures = accept_failures
        self.stop = threading.Event()
        self.roles = roles or dict
        self.train_grid, self.eval_grid = NodesView(grid, self._trainers), NodesView(grid, self._evaluators)
        self.evaluation = evaluation_strategy(cfg) if cfg.evaluate != "central" else None
        if cfg.evaluate != "clients" and (model is None or eval_windows is None):
            raise ValueError(f"--evaluate {cfg.evaluate} evaluates on the coordinator: it needs the model and "
                             f"--eval-data's windows")
        self.committer = Committer()

    # -- who may be sampled ------------------------------------------------------------
    def _trainers(self) -> list[int]:
        roles = self.roles()
        return [n for n in self.grid.get_node_ids() if roles.get(n) != EVALUATOR]

    def _evaluators(self) -> list[int]:
        roles, live = self.roles(), list(self.grid.get_node_ids())
        return [n for n in live if roles.get(n) == EVALUATOR] or [n for n in live if roles.get(n) != EVALUATOR]

    def eval_loss(self, state: dict[str, torch.Tensor]) -> float:
        BUDGET.refresh()   # share the cores with clients running on this host
        if hasattr(self.model, "evaluate"):   # fedswarm.lora.CentralModel: built on first use, copies nothing
            return self.model.evaluate(state, self.eval_windows)
        load_trainable_state(self.model, state)
        return evaluate(self.model, self.eval_windows)

    def run(self, initial_state: dict[str, torch.Tensor]) -> None:
        """The run from where the store left it. Takes `initial_state`'s tensors (the dict is emptied once the
        round-0 ArrayRecord holds them), so no copy of the model outlives the start."""
        last = self.store.last_round()
        if last is None:  # round 0: the initial model
            record = {"round": 0, "eval_loss": None, "train_loss": None, "clients": [], "bytes_up": 0,
                      "bytes_up_raw": 0, "seconds": 0.0, "bytes_down": 0, "bytes_down_raw": 0, "tokens": 0,
                      "started_at": time.time()}
            state, last = initial_state, 0
            arrays = state_to_arrays(state)
            self._hand_off(record, arrays)   # evaluated and committed from the record's bytes: no second copy
        else:
            loaded, strategy_state = split_checkpoint(self.store.load_checkpoint(last))
            if set(loaded) != set(initial_state):
                raise ValueError(f"the checkpoint of round {last} does not match model {self.cfg.model!r}")
            # safetensors sorts keys; strategies zip arrays by position, so keep the model's order.
            state = {k: loaded[k] for k in initial_state}
            restored = import_state(self.strategy, strategy_state, list(state))
            log.info("resuming after committed round %d (%d strategy state entries restored)", last, restored)
            arrays = state_to_arrays(state)
            del loaded
        del state
        initial_state.clear()   # the ArrayRecord holds the weights from here on: the caller's dict pins no copy
        try:
            rnd = self._rounds(last + 1, arrays)
        finally:
            self.committer.close()   # what was aggregated lands on disk before the run counts as done
        with self.progress.lock:
            self.progress.state = RunState.DONE if rnd > self.cfg.rounds else self.progress.state
            self.progress.current_round = 0
            finished = self.progress.state == RunState.DONE
        if finished:
            self.progress.done.set()
            close = getattr(self.grid, "close", None)
            if close is not None:
                close()

    def _rounds(self, rnd: int, arrays: ArrayRecord) -> int:
        """Rounds rnd .. cfg.rounds, each handed to the committer as it is aggregated; the next round to run."""
        failed = 0
        while rnd <= self.cfg.rounds and not self.stop.is_set():
            new_arrays, record = self._one_round(rnd, arrays)
            if new_arrays is None:  # redo the same round (nothing usable came back), after a growing pause
                failed += 1
                self._back_off(rnd, failed)
                continue
            failed = 0
            arrays = new_arrays
            self._hand_off(record, arrays)
            rnd += 1
        return rnd

    def _back_off(self, rnd: int, failed: int) -> None:
        t = self.timeouts
        if t.max_failed_rounds and failed >= t.max_failed_rounds:
            with self.progress.lock:
                self.progress.state, self.progress.current_round = RunState.FAILED, 0
            raise RunFailed(f"round {rnd} brought no usable reply {failed} times in a row (--max-failed-rounds "
                            f"{t.max_failed_rounds}): check the clients' logs, then restart on the same --state-dir")
        delay = min(t.failed_round_backoff_s * 2 ** (failed - 1), t.failed_round_backoff_max_s)
        log.warning("round %d: attempt %d brought no usable reply; repeating it in %.1f s", rnd, failed, delay)
        self.stop.wait(delay)

    def _one_round(self, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord | None, dict]:
        start = time.time()
        with self.progress.lock:
            self.progress.state = RunState.RUNNING if rnd > 1 else RunState.WAITING
            self.progress.current_round = rnd
        config = ConfigRecord({"local-steps": self.cfg.local_steps, "lr": self.cfg.lr,  # lr: the schedule's peak
                               "global-step": (rnd - 1) * self.cfg.local_steps,
                               "total-steps": self.cfg.rounds * self.cfg.local_steps})
        # Flower's sample_nodes waits (polling) until min_available_nodes have joined, then draws
        # K of them from the global RNG: seeded per round, so a run (and its restart) samples alike.
        random.seed(self.cfg.seed * 1_000_003 + rnd)
        messages = list(self.strategy.configure_train(rnd, arrays, config, self.train_grid))
        with self.progress.lock:
            self.progress.configured_round = rnd
        with self.progress.lock:
            self.progress.state = RunState.RUNNING
        configured = time.time()
        log.info("round %d: sent %d train instructions", rnd, len(messages))
        replies: list[Message] = list(self.grid.send_and_receive(messages, timeout=self.round_timeout_s))
        ok = [m for m in replies if not m.has_error()]
        failures = len(messages) - len(ok)
        if not ok or (failures and not self.accept_failures):
            log.warning("round %d: %d of %d replies usable; repeating the round", rnd, len(ok), len(messages))
            return None, {}
        self._settle(rnd)
        try:
            new_arrays, metrics = self.strategy.aggregate_train(rnd, replies)
        finally:
            sink = getattr(self.grid, "updates", None)   # our SessionGrid's UpdateSink (aggregate.py)
            if sink is not None:
                sink.release_round(rnd)   # spilled updates of this round (robust strategies)
        if new_arrays is None or refused_aggregate(rnd, new_arrays, arrays, self.strategy, self.store, sink):
            return None, {}   # nothing to commit (a non-finite aggregate never is): the round is repeated
        memory = rss_bytes()
        if memory:  # read by `fedswarm bench aggregate`
            log.info("round %d aggregated: RSS %d, peak RSS %d bytes", rnd, memory["VmRSS"], memory["VmHWM"])
        aggregated = time.time()
        record = {
            "round": rnd, "eval_loss": None,
            "train_loss": float(metrics["train_loss"]) if metrics and "train_loss" in metrics else None,
            "clients": sorted(_client_name(m) for m in ok),
            "bytes_up": sum(int(m.content["metrics"]["bytes-up"]) for m in ok),
            "bytes_up_raw": sum(int(m.content["metrics"]["bytes-up-raw"]) for m in ok),
            "bytes_down": sum(int(m.content["metrics"].get("bytes-down", 0)) for m in ok),
            "bytes_down_raw": sum(int(m.content["metrics"].get("bytes-down-raw", 0)) for m in ok),
            "tokens": sum(int(m.content["metrics"]["num-examples"]) for m in ok) * self.cfg.seq_len,
            "seconds": aggregated - start,   # the round's critical path: evaluation and commit come after
            "train_seconds": max(float(m.content["metrics"].get("train-seconds", 0.0)) for m in ok),
            "started_at": start, "configured_at": configured, "aggregated_at": aggregated,
            "failures": failures,
        }
        log.info("round %d: %d replies, %d failures in %.1f s; evaluation and commit go on in the background",
                 rnd, len(ok), failures, aggregated - start)
        return new_arrays, record

    # -- off the critical path -----------------------------------------------------------
    def _hand_off(self, record: dict, arrays: ArrayRecord, state: dict[str, torch.Tensor] | None = None) -> None:
        """Send the round's federated evaluation (its clients score the model before they train on it), then
        queue its evaluation and commit behind the one in flight, so the next round is configured at once."""
        eval_ids = self._send_evaluation(record["round"], arrays)
        state = arrays_to_state(arrays) if state is None else state
        # the strategy's state as of this round: no copy needed, the next aggregate waits for this commit (_settle)
        strategy_state = export_state(self.strategy, list(state))
        self.committer.submit(functools.partial(self._evaluate_and_commit, record, state, strategy_state, eval_ids))

    def _settle(self, rnd: int) -> None:
        """Round rnd - 1's evaluation and commit finish before round rnd is aggregated (it has had the whole
        of rnd's training to do so): the strategy's state on disk is then the one rnd aggregates from (what a
        rewind reads back), and the commit never falls more than a round behind."""
        waited = time.monotonic()
        self.committer.wait()
        if time.monotonic() - waited > 1.0:
            log.info("round %d: waited %.1f s for round %d's evaluation and commit", rnd, time.monotonic() - waited,
                     rnd - 1)

    def _send_evaluation(self, rnd: int, arrays: ArrayRecord) -> list[str]:
        if self.evaluation is None:
            return []
        random.seed(self.cfg.seed * 1_000_003 + rnd + EVAL_SEED_OFFSET)
        messages = list(self.evaluation.configure_evaluate(rnd, arrays, ConfigRecord({}), self.eval_grid))
        ids = list(self.grid.push_messages(messages))
        log.info("round %d: sent %d evaluate instructions", rnd, len(ids))
        return ids

    def _evaluate_and_commit(self, record: dict, state: dict[str, torch.Tensor],
                             strategy_state: dict[str, torch.Tensor], eval_ids: list[str]) -> None:
        evals = []
        if self.cfg.evaluate != "clients":
            evals.append(self._central_eval(state))
        if eval_ids:
            timeout = self.timeouts.evaluate_timeout_s or self.round_timeout_s
            evals += self._clients_eval(record["round"], eval_ids, self.grid.receive(eval_ids, timeout=timeout,
                                                                                    stop=self.stop))
        record["evals"] = evals
        if evals:  # the central figure when there is one (comparable across runs), else the clients'
            record["eval_loss"], record["eval_source"] = evals[0]["loss"], evals[0]["source"]
        self.store.commit_round(record, {**state, **strategy_state})
        record["committed_at"] = time.time()
        with self.progress.lock:
            self.progress.rounds.append({k: record.get(k) for k in ROUND_FIELDS})
        loss = "none" if record["eval_loss"] is None else f"{record['eval_loss']:.4f} ({record['eval_source']})"
        log.info("round %d committed: eval loss %s, %d replies, %d failures", record["round"], loss,
                 len(record["clients"]), record.get("failures", 0))

    def _central_eval(self, state: dict[str, torch.Tensor]) -> dict:
        started = time.time()
        loss = self.eval_loss(state)
        return {"source": "central", "loss": loss, "tokens": scored_tokens(self.eval_windows),
                "seconds": round(time.time() - started, 3)}

    def _clients_eval(self, rnd: int, eval_ids: list[str], replies: list[Message]) -> list[dict]:
        """Flower's aggregate_evaluate over the replies: their eval_loss, weighted by the tokens each scored."""
        ok = [m for m in replies if not m.has_error()]
        metrics = self.evaluation.aggregate_evaluate(rnd, replies) if ok else None
        if not metrics or "eval_loss" not in metrics:
            log.warning("round %d: none of %d evaluate instructions was answered", rnd, len(eval_ids))
            return []
        return [{"source": "clients", "loss": float(metrics["eval_loss"]),
                 "tokens": sum(int(m.content["metrics"]["num-examples"]) for m in ok),
                 "clients": sorted(_client_name(m) for m in ok), "failures": len(eval_ids) - len(ok)}]


def scored_tokens(windows: torch.Tensor) -> int:
    """Tokens a loss over eval windows averages: [N, T+1] scores N x T; [N, 2, T+1] its labels that are not -100."""
    if windows.dim() == 3:
        return int((windows[:, 1, 1:] != -100).sum())
    return int(windows.size(0) * (windows.size(1) - 1))


def _client_name(msg: Message) -> str:
    return msg.content.config_records["client"]["name"] if "client" in msg.content.config_records else str(msg.metadata.src_node_id)
