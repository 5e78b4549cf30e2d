"""The clients' local (inner) optimizer: AdamW, or Muon on the hidden matrices with AdamW on the rest (MuLoCo).

Muon (torch.optim.Muon) orthogonalizes each 2-D weight's Nesterov momentum with Newton-Schulz iterations and
takes a step of fixed spectral size; `match_rms_adamw` scales it to AdamW's update RMS (0.2 sqrt(max(A, B))), so
the same --lr and weight decay serve both (Moonlight's recipe). Embeddings, the output head, norms and biases
stay on AdamW, as in Muon's reference implementation. MuLoCo (arXiv 2505.23725) found Muon's pseudo-gradients
more directionally correct than AdamW's as the number of DiLoCo workers grows.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from fedswarm.run_config import INNER_OPTIMIZERS

# parameter names that stay on AdamW under Muon: token / position embeddings and the output head
_NOT_MUON = ("wte", "wpe", "embed", "lm_head", "score", "shared")


def muon_eligible(name: str, param: torch.Tensor) -> bool:
    """A hidden weight matrix: 2-D and neither an embedding nor the output head."""
    return param.ndim == 2 and not any(part in name for part in _NOT_MUON)


class MuonWithAdamW:
    """Muon for the hidden matrices, AdamW for every other parameter, stepped together as one optimizer.

    Duck-types torch.optim.Optimizer where LocalTrainer and GradScaler use it: `param_groups` (both
    optimizers' groups; setting a group's lr sets it for that optimizer), `zero_grad`, `step`, `state`."""

    _step_supports_amp_scaling = False

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]], lr: float, weight_decay: float):
        named = list(named)
        matrices = [p for n, p in named if muon_eligible(n, p)]
        rest = [p for n, p in named if not muon_eligible(n, p)]
        if not matrices:
            raise ValueError("--inner-optimizer muon: this model has no hidden weight matrix to give Muon; "
                             "use --inner-optimizer adamw")
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay) if rest else None
        self._parts = [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self._parts for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self._parts for k, v in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:   # no closure: LocalTrainer and GradScaler never pass one
        for o in self._parts:
            o.step()


def build_inner_optimizer(name: str, named: Iterable[tuple[str, torch.Tensor]], lr: float,
                          weight_decay: float):
    """The optimizer `--inner-optimizer NAME` names, over (name, parameter) pairs that require grad."""
    named = list(named)
    if name == "adamw":
        return torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)
    if name == "muon":
        return MuonWithAdamW(named, lr, weight_decay)
    raise ValueError(f"--inner-optimizer {name!r}: choose one of {INNER_OPTIMIZERS}")
