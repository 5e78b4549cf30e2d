"""Adaptive clipping (--dp-adaptive-clip, coordinator/privacy.py): the clip norm tracks the target quantile of
the updates' norms, the noise is split between the updates and the count as Flower's helpers size it, the
accountant still sees z, and C survives a restart in the strategy's state."""
from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedswarm.coordinator.privacy import PrivacyLedger, clip_limit
from fedswarm.coordinator.strategies import build_strategy
from fedswarm.coordinator.strategy_state import CLIP_KEY, export_state, import_state
from fedswarm.run_config import RunConfig

K = 4


def config(**settings) -> RunConfig:
    cfg = RunConfig(**{"min_clients": K, "dp_clip": 1.0, "dp_adaptive_clip": True, **settings})
    cfg.check()
    return cfg


def one_round(book: PrivacyLedger, norms: list[float]) -> None:
    """K uploads of the given norms clipped at the ledger's C, then the round's release."""
    for norm in norms:
        book.clip_update({"w": torch.full((4,), norm / 2.0)})   # 4 values of norm/2: L2 norm `norm`
    book.release(ArrayRecord(torch_state_dict={"w": torch.zeros(4)}), [1.0] * len(norms))


@pytest.mark.parametrize("quantile, start", [(0.5, 0.01), (0.5, 100.0), (0.75, 1.0)])
def test_the_clip_norm_converges_to_the_target_quantile_of_the_norms(quantile, start):
    """Norms 1, 2, ..., 8 every round (no noise): C settles where a `quantile` share of them is unclipped."""
    book = PrivacyLedger(config(dp_clip=start, dp_target_quantile=quantile, dp_clip_lr=0.2),
                         torch.Generator().manual_seed(0))
    norms = [float(n) for n in range(1, 9)]
    for _ in range(150):
        one_round(book, norms)
    settled = book.clip_norm()
    low, high = sorted(norms)[int(quantile * 8) - 1], sorted(norms)[min(int(quantile * 8), 7)]
    assert low * 0.85 <= settled <= high * 1.15, (quantile, start, settled)


def test_a_round_where_every_update_is_clipped_raises_the_clip_norm():
    book = PrivacyLedger(config(dp_clip=1.0), torch.Generator().manual_seed(0))
    one_round(book, [10.0] * K)
    assert book.clip_norm() == pytest.approx(math.exp(0.2 * 0.5))   # unclipped fraction 0 < Q = 0.5
    one_round(book, [1e-3] * K)
    assert book.clip_norm() == pytest.approx(1.0)                    # all unclipped: back down by the same


def test_uploads_are_clipped_to_the_current_norm_capped_by_clip_update_norm():
    book = PrivacyLedger(config(dp_clip=2.0, clip_update_norm=1.5), torch.Generator().manual_seed(0))
    cfg = config(dp_clip=2.0, clip_update_norm=1.5)
    assert clip_limit(cfg, book) == 1.5
    out, cut = book.clip_update({"w": torch.full((4,), 5.0)}, cap=cfg.clip_update_norm)
    assert cut and float(out["w"].norm()) == pytest.approx(1.5)
    kept, cut = book.clip_update({"w": torch.full((4,), 0.1)})
    assert not cut and torch.equal(kept["w"], torch.full((4,), 0.1))


def test_the_noise_is_split_between_updates_and_count_and_the_account_sees_z():
    cfg = config(dp_noise_multiplier=1.0, dp_clipped_count_stddev=1.0)
    book = PrivacyLedger(cfg, torch.Generator().manual_seed(0))
    count_std, update_z = compute_adaptive_noise_params(1.0, K, 1.0)
    assert (book.adaptive.count_std, book.update_z) == (count_std, update_z)
    assert update_z == pytest.approx((1.0 - 0.25) ** -0.5)
    assert book.entry()["noise_multiplier"] == 1.0   # what the accountant composes


@pytest.mark.parametrize("settings, message", [
    ({"dp_noise_multiplier": 1.0}, "raise --dp-clipped-count-stddev above 0.5"),
    ({"dp_mode": "distributed", "max_update_norm_ratio": 0.0}, "--dp-mode central"),
    ({"dp_target_quantile": 1.5}, "--dp-target-quantile"),
    ({"dp_clip_lr": 0.0}, "--dp-clip-lr"),
    ({"dp_clipped_count_stddev": -1.0}, "--dp-clipped-count-stddev"),
])
def test_adaptive_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        config(**settings)


def test_the_clip_norm_is_saved_with_the_strategy_and_restored():
    cfg = config()
    strategy = build_strategy(cfg)
    one_round(strategy.privacy, [10.0] * K)
    saved = export_state(strategy, ["w"])
    assert float(saved[CLIP_KEY][0]) == pytest.approx(strategy.privacy.clip_norm())
    fresh = build_strategy(cfg)
    assert fresh.privacy.clip_norm() == 1.0
    assert import_state(fresh, saved, ["w"]) == 1
    assert fresh.privacy.clip_norm() == pytest.approx(strategy.privacy.clip_norm())
    fixed = build_strategy(config(dp_adaptive_clip=False))
    assert CLIP_KEY not in export_state(fixed, ["w"])
