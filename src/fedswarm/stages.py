"""Pipeline stages: a preset cut into S contiguous pieces, SWARM/Petals style.

Stage 0 holds the token (and position) embeddings and the first blocks; stage S-1 holds
the last blocks, the final norm, the LM head and the loss, so logits never cross the
wire: the trainer sends labels to the last stage and gets back a scalar loss.

A stage cannot share a tied weight with a peer, so stages are cut from the *untied*
twin of a preset (`build_untied_model`): lm_head.weight starts as a copy of the input
embedding, so at init it computes exactly what the tied model computes.

Modules keep their full-model names inside a Stage (stage 1 of 2 of gpt2-tiny owns
"transformer.h.2.*", "transformer.h.3.*", "transformer.ln_f.*", "lm_head.weight"), so
`stage.named_parameters()` already speaks the full model's language and the union of
all stages' states is `trainable_state(build_untied_model(...))` key for key.

A peer builds only its stage (`build_stage(..., state=)`): the model is constructed on the
meta device (no memory), the stage keeps its modules, and only those are materialised and
filled from the stage's tensors. The coordinator, which evaluates the model, builds it whole.

Two layouts are supported (`FAMILIES`, by config.model_type): GPT-2 (transformer.wte/wpe/h/ln_f)
and Llama-style (model.embed_tokens/layers/norm/rotary_emb), which Qwen2 and Mistral share.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask

from fedswarm.models import build_model, load_trainable_state, model_config


# config.model_type -> stage layout; Qwen2 and Mistral decoder layers take the same inputs as Llama's
FAMILIES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama"}


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, sizes differ by at most 1, earlier stages get the extra."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must be in [1, {num_layers}], got {num_stages}")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        size = base + (1 if i < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def num_layers_of(preset: str) -> int:
    return model_config(preset).num_hidden_layers


def _untied_config(preset: str):
    config = model_config(preset)
    config.tie_word_embeddings = False
    return config


def build_untied_model(preset: str, seed: int = 0) -> nn.Module:
    """The full causal LM with its own lm_head.weight, equal at init to the tied model's embedding."""
    tied = build_model(preset, seed)  # also picks up on-disk weights for a folder preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_untied_config(preset))
    # the tied state_dict lists lm_head.weight (= the embedding); copying it unties the two
    model.load_state_dict(tied.state_dict(), strict=True)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    return model


class Stage(nn.Module):
    """Blocks `layer_range` of a causal LM (+ embeddings if first, + norm/head/loss if last).

    With `gradient_checkpointing` set, each block runs under `torch.utils.checkpoint` (non-reentrant) while
    training: a forward keeps only the blocks' inputs, and the backward recomputes the rest."""

    gradient_checkpointing = False

    def __init__(self, model: nn.Module, index: int, num_stages: int):
        super().__init__()
        config = model.config
        layers = split_layers(config.num_hidden_layers, num_stages)[index]
        self.index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.layer_range = layers
        self.config = config  # plain attribute: not a module, owns no parameters
        # containers named like the full model's, in its order, so names (and order) match it
        family = FAMILIES.get(getattr(config, "model_type", ""))
        if family == "gpt2":  # GPT-2: transformer.{wte,wpe,drop,h,ln_f}
            self.family, src, blocks, norm = "gpt2", model.transformer, "h", "ln_f"
            self.transformer = body = nn.Module()
            if self.is_first:
                body.wte, body.wpe, body.drop = src.wte, src.wpe, src.drop
        elif family == "llama":  # Llama-style
            self.family, src, blocks, norm = "llama", model.model, "layers", "norm"
            self.model = body = nn.Module()
            if self.is_first:
                body.embed_tokens = src.embed_tokens
        else:
            raise ValueError(f"unsupported architecture {type(model).__name__} for pipeline stages: swarm mode "
                             f"cuts {', '.join(sorted(FAMILIES))} models; train this one in federated mode")
        # ModuleDict keyed by the global layer index -> "transformer.h.2.attn..." etc.
        setattr(body, blocks, nn.ModuleDict({str(i): getattr(src, blocks)[i] for i in layers}))
        self.blocks = list(getattr(body, blocks).values())  # plain list: no double registration
        if self.is_last:
            setattr(body, norm, getattr(src, norm))
        if self.family == "llama":
            body.rotary_emb = src.rotary_emb  # buffers only; every stage needs cos/sin
        if self.is_last:
            self.lm_head = model.lm_head

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_last and labels is None:
            raise ValueError("the last stage needs labels: it returns the loss")
        body = self.transformer if self.family == "gpt2" else self.model
        T = inputs.size(1)
        pos = torch.arange(T, device=inputs.device).unsqueeze(0)  # [1, T]
        if self.is_first:
            if inputs.dtype != torch.long:
                raise ValueError(f"the first stage takes int64 token ids [B, T], got {inputs.dtype}")
            if self.family == "gpt2":
                h = body.drop(body.wte(inputs) + body.wpe(pos))  # [B, T, D]
            else:
                h = body.embed_tokens(inputs)  # [B, T, D]
        else:
            if not inputs.is_floating_point():
                raise ValueError(f"stage {self.index} takes float hidden states [B, T, D], got {inputs.dtype}")
            # the residual stream lives in the parameter dtype, whatever the wire dtype was
            h = inputs.to(next(self.parameters()).dtype)
        # the same mask the full model's forward builds (None for sdpa + no padding: is_causal)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None,
                                  past_key_values=None, position_ids=pos)
        if self.family == "gpt2":
            for block in self.blocks:
                h = self._block(block, h, attention_mask=mask, position_ids=pos)  # [B, T, D]
        else:
            cos_sin = body.rotary_emb(h, position_ids=pos)  # 2 x [1, T, head_dim]
            for block in self.blocks:
                h = self._block(block, h, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
        if not self.is_last:
            return h  # [B, T, D]
        h = body.ln_f(h) if self.family == "gpt2" else body.norm(h)
        logits = self.lm_head(h)  # [B, T, V]
        # as fedswarm.models.lm_loss: labels are already shifted by the data pipeline
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))


    def _block(self, block: nn.Module, h: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False, **kwargs)
        return block(h, **kwargs)


def build_stage(preset: str, index: int, num_stages: int, seed: int = 0, *,
                state: dict[str, torch.Tensor] | None = None, device: torch.device | str = "cpu") -> Stage:
    """Stage `index` of `num_stages`.

    With `state` (what a peer fetches from the coordinator), only the stage's own modules are ever
    allocated: they are built on the meta device from the config, materialised on `device`, and filled
    from `state` (a `HandedOver` state's tensors become the parameters themselves: no second copy).
    Without it the stage is cut from build_untied_model(preset, seed), initialised exactly as that model
    (this builds the whole model once: for the coordinator's initial weights and tests)."""
    _check_index(index, num_stages)
    if state is None:
        return Stage(build_untied_model(preset, seed), index, num_stages).to(device)
    stage = _meta_stage(preset, index, num_stages)  # the meta model around it is garbage: only the stage remains
    if isinstance(state, HandedOver):
        _take_parameters(stage, state, torch.device(device))
    else:
        stage.to_empty(device=device)
    _rebuild_buffers(stage, torch.device(device))
    if not isinstance(state, HandedOver):
        load_stage_state(stage, state)
    return stage


class HandedOver(dict):
    """A stage's tensors handed to `build_stage`, which makes them the stage's parameters instead of copying
    them: a peer's download is used once. A plain mapping is copied (its owner may still use it)."""


def _take_parameters(stage: Stage, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """`state`'s float32 tensors (on `device`) as the stage's parameters; ValueError on other names or shapes."""
    shapes = {n: tuple(p.shape) for n, p in stage.named_parameters()}
    if set(shapes) != set(state):
        missing, extra = sorted(set(shapes) - set(state))[:5], sorted(set(state) - set(shapes))[:5]
        raise ValueError(f"state does not match the model: missing {missing}, unexpected {extra}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{name}: shape {tuple(state[name].shape)} != model's {shape}")
    stage.load_state_dict({n: t.detach().to(device, torch.float32) for n, t in state.items()}, strict=True,
                          assign=True)


def _meta_stage(preset: str, index: int, num_stages: int) -> Stage:
    with torch.device("meta"):
        return Stage(AutoModelForCausalLM.from_config(_untied_config(preset)), index, num_stages)


def _rebuild_buffers(stage: Stage, device: torch.device) -> None:
    """Recompute the buffers to_empty left uninitialised. Stage state carries parameters only, so every
    buffer must be a non-persistent one computed from the config (rotary `inv_freq`): its module, which
    holds no parameters, is constructed again on `device` and its buffers taken over."""
    for name, module in stage.named_modules():
        if not module._buffers:
            continue
        persistent = set(module._buffers) - module._non_persistent_buffers_set
        if persistent or next(module.parameters(recurse=False), None) is not None or not hasattr(module, "config"):
            raise ValueError(f"{name or 'stage'} ({type(module).__name__}) holds buffers {sorted(module._buffers)} "
                             "that stage state does not carry: pipeline stages cannot build this model")
        with torch.device(device):
            fresh = type(module)(config=module.config)
        for key in module._buffers:
            module._buffers[key] = fresh._buffers[key]


def _check_index(index: int, num_stages: int) -> None:
    if not 0 <= index < num_stages:
        raise ValueError(f"stage index must be in [0, {num_stages}), got {index}")


def stage_state(stage: Stage) -> "OrderedDict[str, torch.Tensor]":
    """Float32 CPU detached clones of the stage's trainable parameters (with LoRA: its adapters), keyed by
    full-untied-model names."""
    return OrderedDict(
        (name, p.detach().to("cpu", torch.float32).clone()) for name, p in stage.named_parameters() if p.requires_grad
    )


def load_stage_state(stage: Stage, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the stage in place; ValueError on missing/extra names or shapes."""
    load_trainable_state(stage, state)


def stage_param_names(preset: str, index: int, num_stages: int) -> list[str]:
    """The keys stage_state would have, from a model on the meta device (no memory, no init cost)."""
    return list(stage_shapes(preset, index, num_stages))


def stage_shapes(preset: str, index: int, num_stages: int) -> "OrderedDict[str, tuple[int, ...]]":
    """Name -> shape of each tensor stage_state would hold, from a model on the meta device."""
    _check_index(index, num_stages)
    return OrderedDict((n, tuple(p.shape)) for n, p in _meta_stage(preset, index, num_stages).named_parameters())


def assemble(states: list[dict[str, torch.Tensor]]) -> "OrderedDict[str, torch.Tensor]":
    """Union of per-stage states (a full untied-model state); ValueError if two stages share a name."""
    full: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, state in enumerate(states):
        overlap = sorted(set(full) & set(state))
        if overlap:
            raise ValueError(f"state {i} overlaps earlier states on {overlap[:5]}")
        full.update(state)
    return full
