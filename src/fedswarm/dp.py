"""Client-level differential privacy on one update: clip it to an L2 norm, add Gaussian noise.

Both sides use it: a client in --dp-mode distributed clips its own delta and adds its share of the noise
before the codec (`privatize`); the coordinator's accounting and central noise are in coordinator/privacy.py.
Noise comes from the OS's entropy, never from the run's --seed (which every client knows)."""
from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import torch
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from fedswarm.run_config import RunConfig

DISTRIBUTED = "distributed"


def per_round(min_clients: int, clients_per_round: int) -> int:
    """K: the updates a round aggregates (--clients-per-round, else every one of the --min-clients)."""
    return clients_per_round or min_clients


def population(min_clients: int, clients_per_round: int) -> int:
    """N: the clients the run expects, max(--min-clients, --clients-per-round) (a round waits for as many)."""
    return max(min_clients, clients_per_round)


def secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def clip_(delta: Mapping[str, torch.Tensor], bound: float) -> float:
    """Scale the CPU float `delta` in place to L2 norm at most `bound` (Flower's FlatClip); its norm before."""
    arrays = [t.numpy() for t in delta.values()]   # views: Flower's helpers write through them
    norm = get_norm(arrays)
    if norm > bound:
        clip_inputs_inplace(arrays, bound)
    return norm


def add_noise_(tensors: Iterable[torch.Tensor], std: float, generator: torch.Generator | None = None) -> None:
    """Add N(0, std^2) to every value of every tensor, in place."""
    generator = generator or secret_generator()
    for t in tensors:
        t.add_(torch.normal(0.0, std, tuple(t.shape), generator=generator, dtype=t.dtype))


def share_std(run_cfg: RunConfig) -> float:
    """A client's noise std in distributed mode: z x C / sqrt(K), so the sum of K updates carries z x C."""
    k = per_round(run_cfg.min_clients, run_cfg.clients_per_round)
    return run_cfg.dp_noise_multiplier * run_cfg.dp_clip / math.sqrt(k)


def privatize(delta: dict[str, torch.Tensor], run_cfg: RunConfig,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """--dp-mode distributed: clip `delta` to --dp-clip and add this client's share of the noise (in place);
    any other run: `delta` unchanged."""
    clip = run_cfg.dp_clip
    if not clip or run_cfg.dp_mode != DISTRIBUTED:
        return delta
    clip_(delta, clip)
    std = share_std(run_cfg)
    if std > 0:
        add_noise_(delta.values(), std, generator)
    return delta
