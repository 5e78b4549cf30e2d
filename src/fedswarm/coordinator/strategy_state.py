"""Save and restore a Flower strategy's server-side optimizer state (FedAvgM momentum, FedOpt moments).

`current_arrays` needs no saving: FedAvgM and FedOpt rebuild it from the
arrays handed to configure_train, which on resume are the last checkpoint's.
"""
from __future__ import annotations

import numpy as np
import torch

PREFIX = "strategy/"
DICT_ATTRS = ("m_t", "v_t")            # FedOpt family: dict[name, ndarray]
LIST_ATTRS = ("momentum_vector",)      # FedAvgM: list[ndarray] in the model's key order
CLIP_KEY = PREFIX + "privacy/clip"     # --dp-adaptive-clip: the clip norm C the next round uses


def export_state(strategy, keys: list[str]) -> dict[str, torch.Tensor]:
    """Flatten the strategy's optimizer state into safetensors-ready tensors."""
    out: dict[str, torch.Tensor] = {}
    for attr in DICT_ATTRS:
        value = getattr(strategy, attr, None)
        if value is not None:
            out.update({f"{PREFIX}{attr}/{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in value.items()})
    for attr in LIST_ATTRS:
        value = getattr(strategy, attr, None)
        if value is not None:
            if len(value) != len(keys):
                raise ValueError(f"{attr} has {len(value)} arrays for {len(keys)} model tensors")
            out.update({f"{PREFIX}{attr}/{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in zip(keys, value)})
    privacy = getattr(strategy, "privacy", None)
    if privacy is not None and privacy.adaptive is not None:
        out[CLIP_KEY] = torch.tensor([privacy.clip_norm()], dtype=torch.float64)
    return out


def import_state(strategy, tensors: dict[str, torch.Tensor], keys: list[str]) -> int:
    """Restore what export_state saved; returns how many attributes were set."""
    restored = 0
    for attr in DICT_ATTRS + LIST_ATTRS:
        prefix = f"{PREFIX}{attr}/"
        found = {k[len(prefix):]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}
        if not found or not hasattr(strategy, attr):
            continue
        if set(found) != set(keys):
            raise ValueError(f"checkpoint's {attr} does not match the model's tensors")
        setattr(strategy, attr, found if attr in DICT_ATTRS else [found[k] for k in keys])
        restored += 1
    privacy = getattr(strategy, "privacy", None)
    if CLIP_KEY in tensors and privacy is not None and privacy.adaptive is not None:
        privacy.set_clip_norm(float(tensors[CLIP_KEY].reshape(-1)[0]))
        restored += 1
    return restored


def split_checkpoint(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model weights, strategy state) from one checkpoint file."""
    model = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
    state = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
    return model, state
