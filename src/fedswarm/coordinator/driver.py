"""The round engine: each cohort's Flower strategy called round by round over our Grid, each round committed.

One engine serves both modes. A cohort (coordinator/cohort.py) is a strategy, a view of the Grid and a slice
of the model: federated rounds run one cohort over every parameter (RoundDriver), swarm epochs one cohort per
stage, all at once (coordinator/swarm_driver.py). Only when a round starts differs. The engine owns resume,
the round records, evaluation, commit, backoff and --max-failed-rounds.

A round's evaluation (central, federated or both) and its commit run on a background committer while the next
round trains; at most one commit is in flight, so the state on disk is never more than one round behind, and a
coordinator killed meanwhile resumes at its last committed round and re-runs the rest (as it always did)."""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedswarm.coordinator.aggregate import read_only_view, rss_bytes
from fedswarm.coordinator.cohort import Cohort, CohortResult, FederatedCohort, Turn, round_seed, sampled
from fedswarm.coordinator.committer import Committer
from fedswarm.coordinator.config import CoordinatorTimeouts
from fedswarm.run_config import RunConfig
from fedswarm.coordinator.grid import NodesView
from fedswarm.coordinator.privacy import budget_spent, round_entry
from fedswarm.coordinator.secagg_round import SecAggCohort
from fedswarm.coordinator.store import Store
from fedswarm.coordinator.strategies import evaluation_strategy
from fedswarm.coordinator.strategy_state import split_checkpoint
from fedswarm.models import evaluate, load_trainable_state
from fedswarm.threads import BUDGET
from fedswarm.proto.run_state import EndReason, RunState
from fedswarm.workers import run_each

log = logging.getLogger(__name__)
ROUND_FIELDS = ("round", "eval_loss", "train_loss", "clients", "bytes_up", "bytes_up_raw", "seconds",
                "bytes_down", "bytes_down_raw", "tokens", "failures",   # what status and the store keep of each round
                "eval_source", "evals", "train_seconds", "started_at", "configured_at", "aggregated_at",
                "committed_at", "privacy", "adopted", "client_metrics", "secure_aggregation")
CLIENT_METRIC = "client:"           # in a reply's "client" record: a figure it reported (UpdateHeader.metrics)
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
        self.end_reason: EndReason | None = None   # why the run ended before its last round (privacy.py)
        self.done = threading.Event()

    @property
    def committed_round(self) -> int:
        with self.lock:
            return self.rounds[-1]["round"] if self.rounds else 0


class RunFailed(RuntimeError):
    """Too many rounds in a row brought no usable reply: the run gives up (state `failed`)."""


class RoundEngine:
    """Runs rounds (last committed + 1) .. cfg.rounds over its cohorts; resumes from the store's last checkpoint.

    A round runs every cohort at once (fedswarm.workers.run_each): one that raises is a failure of that round,
    logged and recorded; a round in which no cohort could be averaged is repeated after a growing pause, and
    --max-failed-rounds such attempts in a row fail the run."""

    def __init__(self, cfg: RunConfig, grid: Grid | None, store: Store, progress: RunProgress, cohorts: list[Cohort],
                 timeouts: CoordinatorTimeouts, model: torch.nn.Module | None = None,
                 eval_windows: torch.Tensor | None = None, evaluate: str = "central", eval_grid: Grid | None = None):
        self.cfg, self.grid, self.store, self.progress, self.cohorts = cfg, grid, store, progress, cohorts
        self.timeouts, self.model, self.eval_windows, self.evaluate = timeouts, model, eval_windows, evaluate
        self.evaluation = evaluation_strategy(cfg) if evaluate != "central" else None
        if self.evaluation is not None and len(cohorts) != 1:
            raise ValueError(f"--evaluate {evaluate} sends the whole model to the clients: use --mode federated")
        self.eval_grid = eval_grid
        self.committer = Committer()
        self.stop = threading.Event()
        self.ready = threading.Event()      # the cohorts' slices are loaded
        self._lock = threading.Lock()
        self.slices: list[ArrayRecord] = []   # each cohort's part of the model, as last aggregated

    # -- what differs between the modes ----------------------------------------------------
    def wait_to_start(self) -> None:
        """The start policy: a federated round starts as soon as the last one is aggregated."""

    def train_loss(self, results: list[CohortResult]) -> float | None:
        """The round's training loss: its cohorts' (federated: the strategy's weighted mean of the replies')."""
        losses = [r.train_loss for r in results if r.arrays is not None and r.train_loss is not None]
        return sum(losses) / len(losses) if losses else None

    # -- read by the service ---------------------------------------------------------------
    def slice_state(self, index: int, wait_s: float = 30.0) -> dict[str, torch.Tensor] | None:
        """Cohort `index`'s latest average; None if the run has not loaded its slices within wait_s."""
        if not self.ready.wait(wait_s):
            return None
        with self._lock:
            return arrays_to_state(self.slices[index])

    def eval_loss(self, state: dict[str, torch.Tensor]) -> float:
        BUDGET.refresh()   # share the cores with clients running on this host
        if hasattr(self.model, "evaluate"):   # fedswarm.lora.CentralModel: built on first use, copies nothing
            return self.model.evaluate(state, self.eval_windows)
        load_trainable_state(self.model, state)
        return evaluate(self.model, self.eval_windows)

    # -- the run -------------------------------------------------------------------------------
    def run(self, initial_state: dict[str, torch.Tensor]) -> None:
        """The run from where the store left it. Takes `initial_state`'s tensors (the dict is emptied once the
        slices' ArrayRecords hold them), so no copy of the model outlives the start."""
        last = self.store.last_round()
        slices = self._load(last, initial_state)
        initial_state.clear()   # the ArrayRecords hold the weights from here on: the caller's dict pins no copy
        with self._lock:
            self.slices = slices
        self.ready.set()
        try:
            if last is None:   # round 0: the initial model, evaluated and committed from the slices' bytes
                self._hand_off(self._record(0, time.time()))
            rnd = self._rounds((last or 0) + 1)
        finally:
            self.committer.close()   # what was aggregated lands on disk before the run counts as done
        with self.progress.lock:
            ended = rnd > self.cfg.rounds or self.progress.end_reason is not None   # all rounds, or privacy.py
            self.progress.state = RunState.DONE if ended else self.progress.state
            self.progress.current_round = 0
            finished = self.progress.state == RunState.DONE
        if finished:
            self.progress.done.set()
            close = getattr(self.grid, "close", None)
            if close is not None:
                close()

    def _load(self, last: int | None, initial_state: dict[str, torch.Tensor]) -> list[ArrayRecord]:
        """Each cohort's slice: of the initial model, or of the checkpoint of round `last` (with its strategy's
        state, under strategy/ or strategy/stageN/)."""
        state = initial_state
        if last is not None:
            state, strategy_state = split_checkpoint(self.store.load_checkpoint(last))
            if set(state) != set(initial_state):
                raise ValueError(f"the checkpoint of round {last} does not match model {self.cfg.model!r}")
            restored = sum(c.restore(strategy_state) for c in self.cohorts)
            log.info("resuming after committed round %d (%d strategy state entries restored)", last, restored)
        # safetensors sorts keys; strategies zip arrays by position, so each slice keeps the model's order.
        return [state_to_arrays({k: state[k] for k in c.names}) for c in self.cohorts]

    def _rounds(self, rnd: int) -> int:
        """Rounds rnd .. cfg.rounds, each handed to the committer as it is aggregated; the next round to run."""
        failed = 0
        while self._may_run(rnd):
            record, errors = self._one_round(rnd)
            if record is None:  # redo the same round (nothing usable came back), after a growing pause
                failed += 1
                if not self.stop.is_set():
                    self._back_off(rnd, failed, errors)
                continue
            failed = 0
            self._hand_off(record)
            rnd += 1
        return rnd

    def _may_run(self, rnd: int) -> bool:
        """Whether round `rnd` may run (asked before each round and each repeat of one)."""
        return (rnd <= self.cfg.rounds and not self.stop.is_set()
                and not budget_spent([c.strategy for c in self.cohorts], self.progress, rnd))   # --dp-max-epsilon

    def _back_off(self, rnd: int, failed: int, errors: list[str]) -> None:
        t = self.timeouts
        if t.max_failed_rounds and failed >= t.max_failed_rounds:
            with self.progress.lock:
                self.progress.state, self.progress.current_round = RunState.FAILED, 0
            cause = f" (last: {'; '.join(errors)})" if errors else ""
            raise RunFailed(f"round {rnd} brought no usable reply {failed} times in a row (--max-failed-rounds "
                            f"{t.max_failed_rounds}){cause}: check the clients' logs, then restart on the same "
                            f"--state-dir")
        delay = min(t.failed_round_backoff_s * 2 ** (failed - 1), t.failed_round_backoff_max_s)
        log.warning("round %d: attempt %d brought no usable reply; repeating it in %.1f s", rnd, failed, delay)
        self.stop.wait(delay)

    def _one_round(self, rnd: int) -> tuple[dict | None, list[str]]:
        """Round `rnd` over every cohort at once: its record (None if no cohort could be averaged) and the
        errors of the cohorts that raised."""
        started = time.time()
        with self.progress.lock:
            self.progress.state = RunState.RUNNING if rnd > 1 else RunState.WAITING
            self.progress.current_round = rnd
        self.wait_to_start()
        with self._lock:
            slices = list(self.slices)
        jobs = [functools.partial(c.run, Turn(rnd, arrays, functools.partial(self._configured, rnd),
                                              functools.partial(self._settle, rnd)))
                for c, arrays in zip(self.cohorts, slices)]
        try:
            outcomes = run_each(jobs, [f"round {rnd}: {c.name}" for c in self.cohorts], name="cohort")
        finally:
            sink = getattr(self.grid, "updates", None)   # our SessionGrid's UpdateSink (aggregate.py)
            if sink is not None:
                sink.release_round(rnd)   # spilled updates of this round (robust strategies)
        errors = [f"{c.name}: {type(o.error).__name__}: {o.error}" for c, o in zip(self.cohorts, outcomes) if o.error]
        results = [o.value for o in outcomes if o.error is None and o.value is not None]
        averaged = [(i, o.value.arrays) for i, o in enumerate(outcomes)
                    if o.value is not None and o.value.arrays is not None]
        if not averaged:
            log.warning("round %d: no cohort could be averaged%s", rnd, f" ({'; '.join(errors)})" if errors else "")
            return None, errors
        with self._lock:
            for i, arrays in averaged:
                self.slices[i] = arrays
        memory = rss_bytes()
        if memory:  # read by `fedswarm bench aggregate`
            log.info("round %d aggregated: RSS %d, peak RSS %d bytes", rnd, memory["VmRSS"], memory["VmHWM"])
        record = self._record(rnd, started, results, errors)
        log.info("round %d: %d replies, %d failures in %.1f s (averaged: %s); evaluation and commit go on in the "
                 "background", rnd, len(record["clients"]), record["failures"], record["seconds"],
                 ", ".join(self.cohorts[i].name for i, _ in averaged))
        return record, errors

    def _record(self, rnd: int, started: float, results: list[CohortResult] = (), errors: list[str] = ()) -> dict:
        """The round's record (ROUND_FIELDS; `errors` too when a cohort raised): the one place it is built.
        Round 0 is the initial model. Tokens pass through every cohort of a round: the largest count is the
        round's; bytes and replies add up."""
        record = {"round": rnd, "eval_loss": None, "train_loss": None, "clients": [], "bytes_up": 0,
                  "bytes_up_raw": 0, "seconds": 0.0, "bytes_down": 0, "bytes_down_raw": 0, "tokens": 0,
                  "started_at": started}
        if rnd == 0:
            return record
        done = [r for r in results if r.arrays is not None]
        ok = [m for r in done for m in r.replies]
        aggregated = time.time()
        record.update({
            "train_loss": self.train_loss(results), "clients": sorted({_client_name(m) for m in ok}),
            "bytes_up": _metric_sum(ok, "bytes-up"), "bytes_up_raw": _metric_sum(ok, "bytes-up-raw"),
            "bytes_down": _metric_sum(ok, "bytes-down"), "bytes_down_raw": _metric_sum(ok, "bytes-down-raw"),
            "tokens": max(r.tokens for r in done),
            "seconds": aggregated - started,   # the round's critical path: evaluation and commit come after
            "train_seconds": max(float(m.content["metrics"].get("train-seconds", 0.0)) for m in ok),
            # uploads a restarted coordinator took for the re-run of their round; what clients said of their training
            "adopted": sorted({_client_name(m) for m in ok if _client_record(m).get("adopted")}),
            "client_metrics": _client_metrics(ok),
            "configured_at": min(r.configured_at for r in done), "aggregated_at": aggregated,
            # instructions without a usable reply (all of a cohort that was not averaged), one per cohort that raised
            "failures": sum(r.sent - len(r.replies) if r.arrays is not None else r.sent for r in results) + len(errors),
        })
        if errors:
            record["errors"] = list(errors)
        secagg = [r.secagg for r in done if r.secagg]
        if secagg:   # --secure-aggregation: who shared keys, survived and was recovered
            record["secure_aggregation"] = secagg[0]
        privacy = round_entry(c.strategy for c in self.cohorts)   # --dp-clip: epsilon at delta after this round
        if privacy:
            record["privacy"] = privacy
        return record

    def _configured(self, rnd: int) -> None:
        with self.progress.lock:
            self.progress.configured_round = max(self.progress.configured_round, rnd)
            self.progress.state = RunState.RUNNING

    # -- off the critical path -----------------------------------------------------------
    def _hand_off(self, record: dict) -> None:
        """Send the round's federated evaluation (its clients score the model before they train on it), then
        queue its evaluation and commit behind the one in flight, so the next round is configured at once."""
        with self._lock:
            slices = list(self.slices)
        eval_ids = self._send_evaluation(record["round"], slices)
        state = {k: v for arrays in slices for k, v in arrays_to_state(arrays).items()}
        # the strategies' state as of this round: no copy needed, the next aggregate waits for this commit (_settle)
        strategy_state = {k: v for c in self.cohorts for k, v in c.export().items()}
        self.committer.submit(functools.partial(self._evaluate_and_commit, record, state, strategy_state, eval_ids))

    def _settle(self, rnd: int) -> None:
        """Round rnd - 1's evaluation and commit finish before round rnd is aggregated (it has had the whole
        of rnd's training to do so): the strategy's state on disk is then the one rnd aggregates from (what a
        rewind reads back), and the commit never falls more than a round behind. Its error, if any, is raised
        by the next hand-off."""
        waited = time.monotonic()
        self.committer.idle()
        if time.monotonic() - waited > 1.0:
            log.info("round %d: waited %.1f s for round %d's evaluation and commit", rnd, time.monotonic() - waited,
                     rnd - 1)

    def _send_evaluation(self, rnd: int, slices: list[ArrayRecord]) -> list[str]:
        if self.evaluation is None:
            return []
        messages = sampled(round_seed(self.cfg.seed, rnd, EVAL_SEED_OFFSET), lambda: list(
            self.evaluation.configure_evaluate(rnd, slices[0], ConfigRecord({}), self.eval_grid)))
        ids = list(self.grid.push_messages(messages))
        log.info("round %d: sent %d evaluate instructions", rnd, len(ids))
        return ids

    def _evaluate_and_commit(self, record: dict, state: dict[str, torch.Tensor],
                             strategy_state: dict[str, torch.Tensor], eval_ids: list[str]) -> None:
        evals = []
        if self.evaluate != "clients":
            evals.append(self._central_eval(state))
        if eval_ids:
            timeout = self.timeouts.evaluate_timeout_s or self.timeouts.round_timeout_s
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


class RoundDriver(RoundEngine):
    """Federated mode: one cohort, every training client on the whole model; rounds start at once.

    `roles()` maps live node ids to their role: evaluators are never sampled for training, and federated
    evaluation samples them when any are connected (else the training clients)."""

    def __init__(self, cfg: RunConfig, grid: Grid, strategy: Strategy, store: Store, model: torch.nn.Module | None,
                 eval_windows: torch.Tensor | None, progress: RunProgress, round_timeout_s: float,
                 accept_failures: bool = True, timeouts: CoordinatorTimeouts | None = None,
                 roles: Callable[[], dict[int, str]] | None = None):
        if cfg.evaluate != "clients" and (model is None or eval_windows is None):
            raise ValueError(f"--evaluate {cfg.evaluate} evaluates on the coordinator: it needs the model and "
                             f"--eval-data's windows")
        self.roles = roles or dict
        kind = SecAggCohort if cfg.secure_aggregation else FederatedCohort   # SecAgg+'s stages around the round
        cohort = kind(cfg, strategy, NodesView(grid, self._trainers), [], round_timeout_s, store,
                      getattr(grid, "updates", None), accept_failures)
        super().__init__(cfg, grid, store, progress, [cohort], timeouts or CoordinatorTimeouts(
            round_timeout_s=round_timeout_s), model, eval_windows, cfg.evaluate, NodesView(grid, self._evaluators))

    def run(self, initial_state: dict[str, torch.Tensor]) -> None:
        self.cohorts[0].names = list(initial_state)   # the one cohort holds the whole model
        super().run(initial_state)

    def _trainers(self) -> list[int]:
        roles = self.roles()
        return [n for n in self.grid.get_node_ids() if roles.get(n) != EVALUATOR]

    def _evaluators(self) -> list[int]:
        roles, live = self.roles(), list(self.grid.get_node_ids())
        return [n for n in live if roles.get(n) == EVALUATOR] or [n for n in live if roles.get(n) != EVALUATOR]


def scored_tokens(windows: torch.Tensor) -> int:
    """Tokens a loss over eval windows averages: [N, T+1] scores N x T; [N, 2, T+1] its labels that are not -100."""
    if windows.dim() == 3:
        return int((windows[:, 1, 1:] != -100).sum())
    return int(windows.size(0) * (windows.size(1) - 1))


def _client_metrics(replies: list[Message]) -> dict[str, dict[str, float]]:
    """client name -> the figures it reported with its update (e.g. its lr: "lr-first", "lr-last")."""
    reported = {_client_name(m): {k[len(CLIENT_METRIC):]: v for k, v in _client_record(m).items()
                                  if k.startswith(CLIENT_METRIC)} for m in replies}
    return {name: figures for name, figures in sorted(reported.items()) if figures}


def _client_record(msg: Message) -> dict:
    """What the service put in the reply's "client" record (coordinator/uploads.py)."""
    return msg.content.config_records["client"] if "client" in msg.content.config_records else {}


def _metric_sum(replies: list[Message], key: str) -> int:
    return sum(int(m.content["metrics"].get(key, 0)) for m in replies)


def _client_name(msg: Message) -> str:
    return _client_record(msg).get("name", str(msg.metadata.src_node_id))
