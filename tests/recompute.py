"""What a backward pass recomputes: forwards of a submodule counted, and the bytes autograd saved for backward."""
from __future__ import annotations

import contextlib

import torch


class Count:
    n = 0


@contextlib.contextmanager
def forwards(module: torch.nn.Module):
    """Count `module`'s forwards (a checkpointed block's run twice a step; forward hooks do not fire in a
    checkpoint's recompute, so the forward itself is wrapped)."""
    count, inner = Count(), module.forward

    def forward(*args, **kwargs):
        count.n += 1
        return inner(*args, **kwargs)

    module.forward = forward
    try:
        yield count
    finally:
        del module.forward


@contextlib.contextmanager
def saved_bytes():
    """Bytes of the tensors autograd keeps for the backward while the block runs (wrap the forward only)."""
    count = Count()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count.n += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield count


def first_mlp(model: torch.nn.Module) -> torch.nn.Module:
    """The MLP of the first transformer block (GPT-2 and Llama blocks both call it `mlp`)."""
    return next(m for n, m in model.named_modules() if n.endswith(".mlp"))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
