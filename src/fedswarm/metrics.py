"""Prometheus metrics for the coordinator and the client daemon (`--metrics-port`).

The coordinator's figures are read at scrape time from the status it already keeps (totals, last rounds, membership,
rejections, the swarm registry), so nothing on the serving path changes; the client records its rounds
(step time, tokens/s, upload time) and, in swarm roles, reports its trainer or stage-server counters."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, SummaryMetricFamily

from fedswarm.run_config import RunConfig

log = logging.getLogger("fedswarm.metrics")
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)


class ByteCount:
    """A thread-safe running total (bytes the coordinator sent in model downloads)."""

    def __init__(self):
        self._lock, self._value = threading.Lock(), 0

    def add(self, n: int) -> None:
        with self._lock:
            self._value += n

    @property
    def value(self) -> int:
        with self._lock:
            return self._value


BYTES_DOWN = ByteCount()


def counted_down(chunks: Iterable) -> Iterable:
    """Pass model-download messages through, adding their serialized size to BYTES_DOWN."""
    for chunk in chunks:
        BYTES_DOWN.add(chunk.ByteSize())
        yield chunk


def serve(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve `registry` at http://host:port/metrics in a background thread; returns the bound port.
    ValueError (saying what to change) if the address cannot be bound."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ValueError(f"cannot serve metrics on {host}:{port} ({err.strerror or err}); "
                         f"pick a free --metrics-port or another --metrics-host") from None
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


class CoordinatorCollector:
    """Coordinator figures from `status()` (the dict the Status RPC returns), read at each scrape."""

    def __init__(self, status: Callable[[], dict]):
        self.status = status

    def collect(self):
        s = self.status()
        cfg, rounds, totals = RunConfig.from_status(s), s["rounds"], s["totals"]   # rounds: the last; totals: all
        info = InfoMetricFamily("fedswarm_run", "the run this coordinator serves")
        info.add_metric([], {"run_id": str(s.get("run_id", "")), "mode": cfg.mode, "model": cfg.model,
                             "strategy": cfg.strategy, "state": s["state"]})
        yield info
        yield _gauge("fedswarm_round", "last committed round (0: the initial model)", s["round"])
        yield _gauge("fedswarm_round_in_flight", "the round being run (0: none)", s.get("current_round", 0))
        yield _gauge("fedswarm_rounds_planned", "rounds the run is configured for", s["rounds_total"])
        done = [r for r in rounds if r["round"] > 0]
        summary = SummaryMetricFamily("fedswarm_round_duration_seconds", "wall time of each committed round")
        summary.add_metric([], count_value=totals["rounds_committed"], sum_value=totals["seconds"])
        yield summary
        if done:
            yield _gauge("fedswarm_last_round_duration_seconds", "wall time of the last committed round",
                         done[-1]["seconds"])
        if rounds and rounds[-1]["eval_loss"] is not None:
            yield _gauge("fedswarm_eval_loss", "held-out loss of the last committed model", rounds[-1]["eval_loss"])
        if rounds and rounds[-1].get("evals"):
            yield from _eval_metrics(rounds[-1]["evals"])
        if rounds and rounds[-1].get("train_loss") is not None:
            yield _gauge("fedswarm_train_loss", "clients' mean train loss in the last committed round",
                         rounds[-1]["train_loss"])
        yield _counter("fedswarm_upload_bytes", "update bytes received in committed rounds (as sent)",
                       totals["bytes_up"])
        yield _counter("fedswarm_upload_raw_bytes", "fp32-equivalent size of those updates", totals["bytes_up_raw"])
        yield _counter("fedswarm_download_bytes", "model bytes sent to clients", BYTES_DOWN.value)
        yield _counter("fedswarm_tokens", "tokens trained in committed rounds", totals["tokens"])
        yield _counter("fedswarm_failed_replies", "train instructions of committed rounds that brought no usable "
                       "reply", totals["failures"])
        clients = GaugeMetricFamily("fedswarm_clients_connected", "clients holding a live session", labels=["role"])
        roles = s["clients_by_role"]   # every session (the `clients` list is bounded)
        for role in sorted(set(roles) | {"client"}):
            clients.add_metric([role], roles.get(role, 0))
        yield clients
        if (s.get("privacy") or {}).get("epsilon") is not None:
            yield from _privacy_metrics(s["privacy"])
        rejections = CounterMetricFamily("fedswarm_rejections", "refused requests by reason", labels=["reason"])
        for reason, n in sorted((s.get("rejections") or {}).items()):
            rejections.add_metric([reason], n)
        yield rejections
        if s.get("swarm"):
            yield from _swarm_metrics(s["swarm"])


def _eval_metrics(evals: list[dict]):
    """The last committed round's evaluations by source: central (the coordinator's) and clients (token-weighted)."""
    loss = GaugeMetricFamily("fedswarm_round_eval_loss", "held-out loss of the last committed model, by where it "
                             "was evaluated (central, clients: weighted by tokens)", labels=["source"])
    tokens = GaugeMetricFamily("fedswarm_round_eval_tokens", "tokens that evaluation scored", labels=["source"])
    for e in evals:
        loss.add_metric([e["source"]], e["loss"])
        tokens.add_metric([e["source"]], e["tokens"])
    yield loss
    yield tokens


def _privacy_metrics(privacy: dict):
    """Client-level DP: epsilon spent so far at the run's delta (--dp-clip / --dp-noise-multiplier)."""
    yield _gauge("fedswarm_privacy_epsilon", "client-level DP: epsilon spent through the last committed round, at "
                 "fedswarm_privacy_delta", privacy["epsilon"])
    yield _gauge("fedswarm_privacy_delta", "client-level DP: the delta epsilon is reported at", privacy["delta"])


def _swarm_metrics(sw: dict):
    mb = CounterMetricFamily("fedswarm_swarm_microbatches", "micro-batches reported by trainers", labels=["outcome"])
    for outcome, key in (("completed", "microbatches_completed"), ("replayed", "microbatches_retried"),
                         ("lost", "microbatches_lost")):
        mb.add_metric([outcome], sw[key])
    yield mb
    yield _counter("fedswarm_swarm_tokens", "tokens trained through the swarm", sw["tokens"])
    yield _gauge("fedswarm_swarm_tokens_per_second", "swarm tokens/s over the recent window", sw["tokens_per_s"])
    yield _counter("fedswarm_swarm_reassignments", "peers moved to another stage", len(sw["reassignments"]))
    peers = GaugeMetricFamily("fedswarm_swarm_stage_peers", "live peers serving each stage", labels=["stage"])
    throughput = GaugeMetricFamily("fedswarm_swarm_stage_throughput", "announced throughput of each stage's peers",
                                   labels=["stage"])
    for st in sw["stages"]:
        peers.add_metric([str(st["stage"])], st.get("peer_count", len(st["peers"])))
        throughput.add_metric([str(st["stage"])], st["throughput"])
    yield peers
    yield throughput


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def coordinator_registry(status: Callable[[], dict]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(status))
    return registry


class ClientMetrics:
    """A client daemon's own instruments, plus its swarm role's counters read at scrape time."""

    def __init__(self, daemon):
        self.registry = CollectorRegistry()
        self.daemon = daemon
        r = self.registry
        self.rounds = Counter("fedswarm_client_rounds", "training rounds this client finished", registry=r)
        self.round_seconds = Histogram("fedswarm_client_round_seconds", "local training time of a round",
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.step_seconds = Gauge("fedswarm_client_step_seconds", "mean optimizer-step time of the last round",
                                  registry=r)
        self.tokens_per_s = Gauge("fedswarm_client_tokens_per_second", "training tokens/s of the last round",
                                  registry=r)
        self.tokens = Counter("fedswarm_client_tokens", "tokens trained on", registry=r)
        self.upload_seconds = Histogram("fedswarm_client_upload_seconds", "time to encode, sign and send an update",
                                        buckets=SECONDS_BUCKETS, registry=r)
        self.upload_bytes = Counter("fedswarm_client_upload_bytes", "update bytes the coordinator received",
                                    registry=r)
        r.register(_SwarmRoleCollector(daemon))

    def record_round(self, steps: int, tokens: int, train_seconds: float, upload_seconds: float,
                     upload_bytes: int) -> None:
        self.rounds.inc()
        self.round_seconds.observe(train_seconds)
        self.step_seconds.set(train_seconds / max(steps, 1))
        self.tokens_per_s.set(tokens / max(train_seconds, 1e-9))
        self.tokens.inc(tokens)
        self.upload_seconds.observe(upload_seconds)
        self.upload_bytes.inc(upload_bytes)


class _SwarmRoleCollector:
    """A trainer's micro-batch counters or a stage server's stats, if this daemon has them yet."""

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        trainer = getattr(self.daemon, "swarm", None)
        if trainer is not None:
            s = trainer.stats
            with s.lock:
                counts = {"completed": s.completed, "replayed": s.retried, "lost": s.lost}
                tokens = s.tokens
            mb = CounterMetricFamily("fedswarm_trainer_microbatches", "this trainer's micro-batches",
                                     labels=["outcome"])
            for outcome, n in counts.items():
                mb.add_metric([outcome], n)
            yield mb
            yield _counter("fedswarm_trainer_tokens", "tokens this trainer sent through the swarm", tokens)
        server = getattr(self.daemon, "server", None)
        if server is not None:
            throughput, steps, utilization, load = server.stats()
            yield _gauge("fedswarm_peer_stage", "the stage this peer serves (-1: none yet)", server.stage_index)
            yield _gauge("fedswarm_peer_tokens_per_second", "tokens/s this peer's stage processes", throughput)
            yield _gauge("fedswarm_peer_utilization", "fraction of time this peer's stage is busy", utilization)
            yield _gauge("fedswarm_peer_requests_in_flight", "stage requests being handled", load)
            yield _counter("fedswarm_peer_optimizer_steps", "optimizer steps of this peer's stage", steps)
