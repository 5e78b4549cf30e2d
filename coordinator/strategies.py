"""Flower message-API strategies selectable by --strategy."""
from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp import strategy as S


def _common(min_clients: int) -> dict:
    # Centralized eval runs on the coordinator; federated eval is off.
    return dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_clients,
                min_evaluate_nodes=0, min_available_nodes=min_clients)


STRATEGIES: dict[str, Callable[..., S.Strategy]] = {
    "fedavg": lambda k, cfg: S.FedAvg(**_common(k)),
    "fedprox": lambda k, cfg: S.FedProx(**_common(k), proximal_mu=cfg.proximal_mu),
    "fedavgm": lambda k, cfg: S.FedAvgM(**_common(k), server_learning_rate=1.0, server_momentum=0.5),
    "fedadam": lambda k, cfg: S.FedAdam(**_common(k), eta=1e-2, eta_l=cfg.lr, beta_1=0.9, beta_2=0.99, tau=1e-4),
    "fedtrimmedavg": lambda k, cfg: S.FedTrimmedAvg(**_common(k), beta=0.2),
    "fedmedian": lambda k, cfg: S.FedMedian(**_common(k)),
    "krum": lambda k, cfg: S.Krum(**_common(k), num_malicious_nodes=0),
}

# Strategies whose aggregate is linear in the replies (a weighted mean of them).
MEAN_BASED = {"fedavg", "fedprox", "fedavgm", "fedadam"}


def build_strategy(cfg) -> S.Strategy:
    """The strategy named by cfg.strategy, sampling every live client each round."""
    try:
        factory = STRATEGIES[cfg.strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {cfg.strategy!r}: choose one of {sorted(STRATEGIES)}") from None
    strategy = factory(cfg.min_clients, cfg)
    if cfg.clients_per_round:  # Flower samples max(int(connected * fraction_train), min_train_nodes) = K
        strategy.fraction_train, strategy.min_train_nodes = 1e-9, cfg.clients_per_round
    return strategy
