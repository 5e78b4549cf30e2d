"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) with Flower's DP helpers and accountant.

Every client's update (its delta) is clipped to L2 norm C and the sum of the K clipped updates gets Gaussian
noise N(0, (z C)^2) before it is divided into the mean (Flower's server-side fixed clipping), so one client
moves the released model by at most C / K, under noise z C / K: a sampled Gaussian mechanism per round,
composed over rounds by Flower's `RdpAccountant` (Google's dp-accounting underneath) into (epsilon, delta).

- central (--dp-mode central): the coordinator clips each upload as it arrives (the --clip-update-norm path,
  service.py) and noises the round's mean before any server step (FedAvgM, FedAdam, DiLoCo), with
  --aggregation stream (folded sums) and hold alike. Unequal weights get std z C max(w) / sum(w).
- distributed: each client clips its own delta and adds N(0, (z C)^2 / K) before the codec (fedswarm.dp), so
  the sum carries the whole noise; the account holds against whoever sees only the sum (secure aggregation).
  Without it the coordinator sees each update with noise z C / sqrt(K); the codec's rounding error (error
  feedback included) is outside the account. A round with fewer than K updates is not released (repeated).
- Only mean-based strategies: a median, trimmed mean or Krum can pass one client's update on whole, so noise
  sized for a mean's sensitivity would not cover it (config.py refuses them, and swarm mode).

Accounting: Poisson sampling with rate q = K / N under add-or-remove-one (Flower's PrivacyConfig), N =
max(--min-clients, --clients-per-round), the clients a round waits for; q = 1 when every client trains.
Our sampler draws exactly K, seeded from --seed per round: q < 1 assumes the seed is secret. As in Flower,
the mean divides by the updates that came (their count is not protected), and metrics (train loss,
clients' evaluations) are outside the account. Every aggregated round counts,
and a restarted coordinator counts one more than its committed rounds (one may have gone out uncommitted).
Adaptive clipping (--dp-adaptive-clip, central; Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping"): each round the coordinator counts the uploads its current norm C left unclipped, adds
N(0, s^2) to that count (s = --dp-clipped-count-stddev, default K / 20 as Flower's) and moves C geometrically,
C <- C exp(-eta (noisy unclipped fraction - Q)), toward the Q-quantile of the updates' norms. The updates'
noise multiplier becomes (z^-2 - (2 s)^-2)^-1/2 (Flower's compute_adaptive_noise_params), so the two releases
together account as one Gaussian mechanism at z. C is saved with the strategy's state (strategy_state.py).
Flower's adaptive strategies move C by the clipped fraction in the same formula; the paper's (and this) uses
the unclipped fraction, so that C grows while more than 1 - Q of the updates are clipped.
Utility: the noise's norm is z sqrt(d) / K times the largest clipped mean update (d parameters), so learning
needs K near z sqrt(d): thousands of clients a round for a million parameters (`fedswarm bench privacy`)."""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedswarm import dp
from fedswarm.coordinator.aggregate import WEIGHT_KEY, StreamingFedAvg
from fedswarm.coordinator.integrity import l2_norm
from fedswarm.proto.run_state import EndReason

log = logging.getLogger(__name__)


def enabled(cfg) -> bool:
    return cfg.dp_clip > 0


def delta_of(cfg) -> float:
    """--dp-delta, or 1 / N^2 (N = max(--min-clients, --clients-per-round))."""
    return cfg.dp_delta or 1.0 / dp.population(cfg.min_clients, cfg.clients_per_round) ** 2


def clip_limit(cfg, privacy: "PrivacyLedger | None" = None) -> float:
    """The norm the coordinator clips each upload to (0: none): central DP's C (adaptive: the ledger's current
    one), capped by --clip-update-norm, or --clip-update-norm alone."""
    if enabled(cfg) and cfg.dp_mode != dp.DISTRIBUTED:
        clip = privacy.clip_norm() if privacy is not None else cfg.dp_clip
        return min(clip, cfg.clip_update_norm or clip)
    return cfg.clip_update_norm


def clipped(delta: dict[str, torch.Tensor], norm: float, limit: float) -> tuple[dict[str, torch.Tensor], bool]:
    """`delta` (of L2 norm `norm`) scaled down to `limit` if above it; whether it was cut."""
    if not norm > limit:
        return delta, False
    scale = limit / norm
    return {n: d * scale for n, d in delta.items()}, True


class AdaptiveClip:
    """The clip norm as a private quantile estimate (Andrew et al. 2021): counts the updates C left unclipped
    and moves C after each release by the noised fraction."""

    def __init__(self, cfg, per_round: int, generator: torch.Generator):
        self.norm, self.quantile, self.lr = cfg.dp_clip, cfg.dp_target_quantile, cfg.dp_clip_lr
        self.count_std, self.update_z = compute_adaptive_noise_params(
            cfg.dp_noise_multiplier, per_round, cfg.dp_clipped_count_stddev or None)
        self.generator = generator
        self.seen = self.unclipped = 0

    def observe(self, norm: float, limit: float) -> None:
        self.seen += 1
        self.unclipped += int(norm <= limit)

    def adapt(self) -> None:
        """After a release: C moves toward the target quantile by the noised unclipped fraction."""
        if not self.seen:
            return
        noise = float(torch.normal(0.0, self.count_std, (1,), generator=self.generator)) if self.count_std else 0.0
        fraction = (self.unclipped + noise) / self.seen
        self.norm *= math.exp(-self.lr * (fraction - self.quantile))
        self.seen = self.unclipped = 0


class PrivacyLedger:
    """The run's account: one sampled Gaussian release per aggregated round; the central noise."""

    def __init__(self, cfg, generator: torch.Generator | None = None):
        self.clip, self.z, self.mode = cfg.dp_clip, cfg.dp_noise_multiplier, cfg.dp_mode
        self.population = dp.population(cfg.min_clients, cfg.clients_per_round)
        self.per_round = dp.per_round(cfg.min_clients, cfg.clients_per_round)
        self.delta, self.max_epsilon = delta_of(cfg), cfg.dp_max_epsilon or None
        self.generator = generator or dp.secret_generator()
        self.lock = threading.Lock()
        self.releases, self.started = 0, False
        self.adaptive = AdaptiveClip(cfg, self.per_round, self.generator) if cfg.dp_adaptive_clip else None
        self.update_z = self.adaptive.update_z if self.adaptive is not None else self.z
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=self.delta, population_size=self.population, max_epsilon=self.max_epsilon,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON)) if self.z > 0 else None

    def clip_norm(self) -> float:
        """C now: --dp-clip, or with --dp-adaptive-clip the norm this round's uploads are clipped to."""
        with self.lock:
            return self.adaptive.norm if self.adaptive is not None else self.clip

    def set_clip_norm(self, norm: float) -> None:
        """A resumed run's adaptive C (from the checkpoint's strategy state)."""
        if self.adaptive is not None and math.isfinite(norm) and norm > 0:
            with self.lock:
                self.adaptive.norm = norm

    def clip_update(self, delta: dict[str, torch.Tensor], cap: float = 0.0) -> tuple[dict[str, torch.Tensor], bool]:
        """One upload scaled to L2 norm at most C (capped by `cap`, --clip-update-norm); whether it was cut.
        With --dp-adaptive-clip the upload's side of C is counted for the round's update of C."""
        limit = self.clip_norm()
        limit = min(limit, cap or limit)
        norm = l2_norm(delta.values())
        self.observe(norm, limit)
        return clipped(delta, norm, limit)

    def observe(self, norm: float, limit: float) -> None:
        """An upload of L2 norm `norm` was clipped at `limit`: with --dp-adaptive-clip it counts for C's update."""
        if self.adaptive is not None:
            with self.lock:
                self.adaptive.observe(norm, limit)

    @property
    def sampling_rate(self) -> float:
        return self.per_round / self.population

    def _event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.z, sample_size=self.per_round,
                                    population_size=self.population)

    def _compose(self, count: int) -> None:
        self.releases += count
        if self.accountant is not None:
            self.accountant.compose(self._event(), count)

    def epsilon(self) -> float | None:
        """Epsilon at the run's delta so far (0 before any release); None without noise (no guarantee)."""
        if self.accountant is None:
            return None
        return self.accountant.get_epsilon(self.delta) if self.releases else 0.0

    def admits(self, server_round: int) -> bool:
        """Whether round `server_round` may be configured: its release keeps epsilon within --dp-max-epsilon.
        The first call of a restarted run first counts the releases before it."""
        with self.lock:
            if not self.started:
                self.started = True
                if server_round > 1:
                    self._compose(server_round)   # rounds 1 .. server_round - 1, and one that may have gone out
            return not (self.max_epsilon and self.accountant is not None
                        and self.accountant.would_exceed(self._event()))

    def exhausted(self, server_round: int) -> str:
        return (f"round {server_round} would take epsilon from {self.epsilon():.4g} past --dp-max-epsilon "
                f"{self.max_epsilon:g} (delta {self.delta:.3g}): the run ends here")

    def release(self, mean: ArrayRecord, weights: list[float]) -> ArrayRecord | None:
        """The round's mean as released: central noise added, the release accounted. None (the round is not
        released, and repeated) when a distributed round's sum would carry less noise than accounted."""
        with self.lock:
            if self.mode == dp.DISTRIBUTED:
                if len(weights) < self.per_round:
                    log.warning("distributed DP: %d of %d updates in; their sum lacks noise, so the round is "
                                "repeated", len(weights), self.per_round)
                    return None
            elif self.z > 0:
                # the weighted mean moves by at most C x max(w) / sum(w) for one client: C / K at equal weights
                clip = self.adaptive.norm if self.adaptive is not None else self.clip
                std = compute_stdv(self.update_z, clip, sum(weights) / max(weights))
                mean = self._noised(mean, std)
            self._compose(1)
            if self.adaptive is not None:
                self.adaptive.adapt()
            return mean

    def _noised(self, arrays: ArrayRecord, std: float) -> ArrayRecord:
        out = ArrayRecord()
        for name in list(arrays.keys()):   # tensor by tensor, each freed from `arrays` once noised
            values = torch.from_numpy(np.array(arrays[name].numpy(), copy=True))
            del arrays[name]
            if values.is_floating_point():
                dp.add_noise_([values], std, self.generator)
            out[name] = Array(values.numpy())
        return out

    def entry(self) -> dict:
        """What a round record (and status) says of the run's privacy after its release."""
        with self.lock:
            clip = self.adaptive.norm if self.adaptive is not None else self.clip
            return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.z, "clip": clip,
                    "sampling_rate": self.sampling_rate, "mode": self.mode, "releases": self.releases}


class DPFedAvg(StreamingFedAvg):
    """FedAvg whose mean is released through the run's PrivacyLedger (when it has one), before any subclass's
    server step: the base of every mean-based strategy (strategies.py)."""

    privacy: PrivacyLedger | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.privacy is not None and not self.privacy.admits(server_round):   # the engine asks first
            raise PrivacyBudgetExhausted(self.privacy.exhausted(server_round))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.privacy is None:
            return mean, metrics
        weights = [float(next(iter(m.content.metric_records.values()))[WEIGHT_KEY])
                   for m in replies if not m.has_error()]
        return self.privacy.release(mean, weights), metrics


def _ledgers(strategies: Iterable) -> list[PrivacyLedger]:
    return [s.privacy for s in strategies if getattr(s, "privacy", None) is not None]


def budget_spent(strategies: Iterable, progress, server_round: int) -> bool:
    """The round engine's check before each round: True, with the progress's end_reason privacy_budget, if the
    round's release would push epsilon past --dp-max-epsilon (the engine then ends the run, state done, once
    the rounds before it are committed)."""
    for ledger in _ledgers(strategies):
        if not ledger.admits(server_round):
            log.warning("%s", ledger.exhausted(server_round))
            with progress.lock:
                progress.end_reason = EndReason.PRIVACY_BUDGET
            return True
    return False


def round_entry(strategies: Iterable) -> dict | None:
    """The "privacy" entry of a round record: epsilon at delta after this round (None: the run has no DP)."""
    entries = [ledger.entry() for ledger in _ledgers(strategies)]
    return entries[0] if entries else None


def status_entry(cfg, rounds: list[dict]) -> dict | None:
    """Status's "privacy": the last round's entry (before any: the run's settings at epsilon 0)."""
    if not enabled(cfg):
        return None
    last = next((r["privacy"] for r in reversed(rounds) if r.get("privacy")), None)
    base = {"epsilon": 0.0 if cfg.dp_noise_multiplier > 0 else None, "delta": delta_of(cfg),
            "noise_multiplier": cfg.dp_noise_multiplier, "clip": cfg.dp_clip, "mode": cfg.dp_mode,
            "sampling_rate": dp.per_round(cfg.min_clients, cfg.clients_per_round)
            / dp.population(cfg.min_clients, cfg.clients_per_round), "releases": 0}
    return {**base, **(last or {}), "max_epsilon": cfg.dp_max_epsilon or None}


def epsilon_text(entry: dict | None) -> str:
    """'epsilon 3.2 at delta 0.0625' for a privacy entry ('' without one)."""
    if not entry:
        return ""
    eps = entry.get("epsilon")
    return f"epsilon {'inf' if eps is None else f'{eps:.3g}'} at delta {entry['delta']:.3g}"

