"""Flower message-API strategies selectable by --strategy.

Mean-based strategies are built as streaming variants (coordinator/aggregate.py):
Flower's own configure_train / aggregate_train run, but the weighted mean of the
replies comes from the running sum the grid folded each update into as it
arrived. Robust strategies see every update, read from memory-mapped spill files.
Every mean-based one derives from privacy.DPFedAvg: with --dp-clip its mean is noised and accounted
before the strategy's own server step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as S
from flwr.serverapp.exception import AggregationError

from fedswarm.coordinator import server_steps
from fedswarm.coordinator.privacy import DPFedAvg, PrivacyLedger, enabled
from fedswarm.coordinator.spill import SpillKrum
from fedswarm.run_config import MEAN_BASED, STRATEGY_NAMES

# A fraction so small that int(connected * f) is 0 for any real population: with it,
# Flower's sampler takes exactly min_train_nodes (fraction_train 0.0 would switch training off).
EXACTLY_MIN_TRAIN_NODES = 1e-12
DILOCO_SERVER_LR, DILOCO_SERVER_MOMENTUM = 0.7, 0.9


def sampling(cfg) -> dict:
    """Flower's sampling knobs for --min-clients / --clients-per-round / --fraction.

    K alone: exactly K per round; F alone: F of the connected clients (at least 1);
    both: F of the connected, at least K. Neither: every client, at least min_clients.
    Rounds start once max(min_clients, K) clients are connected."""
    k, f = cfg.clients_per_round, cfg.fraction
    fraction_train = f if f > 0 else (EXACTLY_MIN_TRAIN_NODES if k > 0 else 1.0)
    min_train = k if k > 0 else (1 if f > 0 else cfg.min_clients)
    # Federated evaluation has its own strategy (evaluation_strategy): its population (evaluators, else the
    # training clients) and its minimum differ from training's, and Flower's strategy has one min_available_nodes.
    return dict(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_train,
                min_evaluate_nodes=0, min_available_nodes=max(cfg.min_clients, k))


def evaluation_strategy(cfg) -> S.FedAvg:
    """Flower's FedAvg for --evaluate clients/both: its configure_evaluate samples max(F x connected, K) of the
    nodes it is shown (--fraction-evaluate F, --min-evaluate-nodes K), and aggregate_evaluate averages their
    `eval_loss` weighted by `num-examples` (the tokens each scored). Every strategy here inherits these two
    hooks from FedAvg unchanged; this instance only carries evaluation's own sampling."""
    return S.FedAvg(fraction_train=EXACTLY_MIN_TRAIN_NODES, min_train_nodes=1,
                    fraction_evaluate=cfg.fraction_evaluate, min_evaluate_nodes=cfg.min_evaluate_nodes,
                    min_available_nodes=cfg.min_evaluate_nodes)


class DiLoCo(S.FedAvg):
    """DiLoCo's outer step: the weighted mean of the clients' deltas is an outer gradient,
    applied with Nesterov momentum (Douillard et al. 2023; OpenDiLoCo's torch SGD(nesterov=True)):

        g = global - mean(client weights);  m = mu * m + g  (m = g at the first step);
        global = global - lr * (g + mu * m)
    """

    def __init__(self, *, server_learning_rate: float = DILOCO_SERVER_LR,
                 server_momentum: float = DILOCO_SERVER_MOMENTUM, **kwargs):
        super().__init__(**kwargs)
        self.server_learning_rate, self.server_momentum = server_learning_rate, server_momentum
        self.current_arrays: ArrayRecord | None = None
        self.momentum_vector: list[np.ndarray] | None = None   # model key order; saved like FedAvgM's

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        if self.current_arrays is None:
            raise AggregationError("DiLoCo aggregated before configure_train set the global model")
        # tensor by tensor, in the mean's and the momentum's own buffers (server_steps.py)
        self.current_arrays, self.momentum_vector = server_steps.nesterov(
            self.current_arrays, mean, self.server_learning_rate, self.server_momentum, self.momentum_vector)
        return self.current_arrays, metrics


# Streaming variants: the MRO puts DPFedAvg (a StreamingFedAvg) between each Flower class and FedAvg,
# so their own server-side step (momentum, moments, Nesterov) runs on the folded mean.
class StreamingFedProx(S.FedProx, DPFedAvg):
    pass


class StreamingFedAvgM(S.FedAvgM, DPFedAvg):
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvgM step, computed in the mean's own buffers (server_steps.py)."""
        mean, metrics = super(S.FedAvgM, self).aggregate_train(server_round, replies)
        if not self.server_opt or mean is None:
            return mean, metrics
        if self.current_arrays is None:
            raise AggregationError("FedAvgM aggregated before configure_train set the global model")
        self.current_arrays, self.momentum_vector = server_steps.momentum_sgd(
            self.current_arrays, mean, self.server_learning_rate, self.server_momentum, self.momentum_vector)
        return self.current_arrays, metrics


class StreamingFedAdam(S.FedAdam, DPFedAvg):
    pass


class StreamingDiLoCo(DiLoCo, DPFedAvg):
    pass


def _server_lr(cfg, default: float) -> float:
    return default if cfg.server_lr is None else cfg.server_lr


def _server_momentum(cfg, default: float) -> float:
    return default if cfg.server_momentum is None else cfg.server_momentum


def _sparseloco(cfg) -> S.Strategy:
    """SparseLoCo's outer step (arXiv 2508.15706): plain outer SGD on the mean of the clients' sparse
    pseudo-gradients, global = global + lr x mean(delta), no server momentum: the clients' error feedback
    (--ef-decay, 0.95 in the paper) carries what momentum would. It is FedAvgM's step at momentum 0."""
    return StreamingFedAvgM(**sampling(cfg), server_learning_rate=_server_lr(cfg, 1.0), server_momentum=0.0)


def _fedavg(cfg) -> S.Strategy:
    lr = _server_lr(cfg, 1.0)
    if lr == 1.0 and not cfg.server_momentum:
        return DPFedAvg(**sampling(cfg))
    # FedAvg with a server learning rate (or momentum) is exactly FedAvgM's server step.
    return StreamingFedAvgM(**sampling(cfg), server_learning_rate=lr, server_momentum=_server_momentum(cfg, 0.0))


STRATEGIES: dict[str, Callable[..., S.Strategy]] = {
    "fedavg": _fedavg,
    "fedprox": lambda cfg: StreamingFedProx(**sampling(cfg), proximal_mu=cfg.proximal_mu),
    "fedavgm": lambda cfg: StreamingFedAvgM(**sampling(cfg), server_learning_rate=_server_lr(cfg, 1.0),
                                            server_momentum=_server_momentum(cfg, 0.5)),
    "fedadam": lambda cfg: StreamingFedAdam(**sampling(cfg), eta=_server_lr(cfg, 1e-2), eta_l=cfg.lr,
                                            beta_1=_server_momentum(cfg, 0.9), beta_2=0.99, tau=1e-4),
    "diloco": lambda cfg: StreamingDiLoCo(**sampling(cfg), server_learning_rate=_server_lr(cfg, DILOCO_SERVER_LR),
                                          server_momentum=_server_momentum(cfg, DILOCO_SERVER_MOMENTUM)),
    "sparseloco": _sparseloco,
    "fedtrimmedavg": lambda cfg: S.FedTrimmedAvg(**sampling(cfg), beta=0.2),
    "fedmedian": lambda cfg: S.FedMedian(**sampling(cfg)),
    "krum": lambda cfg: SpillKrum(**sampling(cfg), num_malicious_nodes=0),
}
# The run contract names the strategies (fedswarm.run_config); exactly those are built here.
if sorted(STRATEGIES) != sorted(STRATEGY_NAMES) or not MEAN_BASED <= set(STRATEGIES):
    raise ImportError(f"coordinator/strategies.py builds {sorted(STRATEGIES)} but fedswarm.run_config names "
                      f"{sorted(STRATEGY_NAMES)} (mean-based: {sorted(MEAN_BASED)}): add or remove the name there too")


def build_strategy(cfg) -> S.Strategy:
    """The strategy named by cfg.strategy, sampling as cfg's --clients-per-round / --fraction say, with the run's
    privacy ledger when --dp-clip is set."""
    try:
        factory = STRATEGIES[cfg.strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {cfg.strategy!r}: choose one of {sorted(STRATEGIES)}") from None
    strategy = factory(cfg)
    if enabled(cfg):   # --dp-clip: the run's privacy account (config.check refused the non-mean strategies)
        strategy.privacy = PrivacyLedger(cfg)
    return strategy
