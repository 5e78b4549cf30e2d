"""LoRA on pipeline stages (`--mode swarm --peft lora`): each peer holds its stage's frozen base and trains
only its stage's adapters; the coordinator averages each stage's adapters and evaluates the whole model.

The adapters are injected with peft's `inject_adapter_in_model` into the Stage itself (and, on the
coordinator, into the untied full model), so adapter names keep the full model's language
("transformer.h.2.attn.c_attn.lora_A.default.weight") and the union of the stages' adapters is the
coordinator's adapter state key for key. The frozen base comes from the model on each side, as in federated
LoRA: a Hugging Face folder's safetensors, of which a peer reads only its stage's tensors; a preset (no
weights on disk) is rebuilt from the run's seed."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from fedswarm.lora import LoraSettings
from fedswarm.models import load_trainable_state
from fedswarm.run_config import RunConfig
from fedswarm.stages import (HandedOver, Stage, _check_index, _untied_config, build_stage, build_untied_model,
                             stage_param_names)
from fedswarm.tokenizer import is_hf_folder

EMBEDDINGS = ("transformer.wte.weight", "model.embed_tokens.weight")   # what an untied lm_head starts as


def inject_adapters(module: nn.Module, settings: LoraSettings, model_type: str, seed: int = 0) -> nn.Module:
    """`module` with LoRA adapters on the run's target layers (deterministic init in `seed`); only the
    adapters stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    targets = list(settings.targets) or DEFAULT_TARGETS.get(model_type)
    if targets is None:
        raise ValueError(f"peft has no default LoRA layers for {model_type!r}: pass --lora-targets")
    if targets == ["all-linear"]:
        raise ValueError("--lora-targets all-linear is for federated runs; in swarm mode name the layers "
                         "(e.g. c_attn,c_proj or q_proj,k_proj,v_proj,o_proj)")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=targets,
                        fan_in_fan_out=model_type == "gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return inject_adapter_in_model(config, module)
        except ValueError as err:
            raise ValueError(f"cannot place LoRA adapters on this {model_type} stage: {err}; check --lora-targets") from err


def lora_eval_model(cfg: RunConfig) -> nn.Module:
    """The coordinator's model: the untied base with the run's adapters (their initial values)."""
    model = build_untied_model(cfg.model, seed=cfg.seed)
    return inject_adapters(model, LoraSettings.from_run(cfg), model.config.model_type, seed=cfg.seed)


def lora_stage_names(cfg: RunConfig, index: int) -> list[str]:
    """The adapter names stage `index` trains, from a model on the meta device."""
    return list(lora_stage_shapes(cfg, index))


def lora_stage_shapes(cfg: RunConfig, index: int) -> "OrderedDict[str, tuple[int, ...]]":
    """Name -> shape of each adapter stage `index` trains, from a model on the meta device."""
    _check_index(index, cfg.stages)
    config = _untied_config(cfg.model)
    with torch.device("meta"):
        stage = Stage(AutoModelForCausalLM.from_config(config), index, cfg.stages)
        stage = inject_adapters(stage, LoraSettings.from_run(cfg), config.model_type)
    return OrderedDict((n, tuple(p.shape)) for n, p in stage.named_parameters() if p.requires_grad)


def _folder_tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Just `names` from a folder's safetensors (one file or shards), float32; an untied lm_head missing
    from a tied checkpoint is read as the input embedding."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            files = {k: "model.safetensors" for k in f.keys()}
    else:
        raise ValueError(f"{folder} has no safetensors weights: swarm LoRA reads each stage's frozen base from "
                         "model.safetensors (save the model with save_pretrained(..., safe_serialization=True))")
    wanted = {}
    for name in names:
        key = name if name in files else next((e for e in EMBEDDINGS if name == "lm_head.weight" and e in files),
                                              None)
        if key is None:
            raise ValueError(f"{folder}: no tensor {name!r} for this stage")
        wanted[name] = key
    out = {}
    for file in sorted({files[k] for k in wanted.values()}):
        with safe_open(str(folder / file), "pt") as f:
            for name, key in wanted.items():
                if files[key] == file:
                    out[name] = f.get_tensor(key).to(torch.float32)
    return out


def build_lora_stage(cfg: RunConfig, index: int, adapters: dict[str, torch.Tensor],
                     device: torch.device | str = "cpu") -> Stage:
    """Stage `index` with its frozen base (a folder: only this stage's tensors are read) and the run's
    adapters set to `adapters`."""
    _check_index(index, cfg.stages)
    model = cfg.model
    if is_hf_folder(model):   # stage-only, as a full fine-tune's peer builds it, from the folder's tensors
        base = HandedOver(_folder_tensors(Path(model), stage_param_names(model, index, cfg.stages)))
        stage = build_stage(model, index, cfg.stages, state=base, device=device)   # read once, not copied
    else:   # a preset's base exists only as its seeded initialisation
        stage = build_stage(model, index, cfg.stages, seed=cfg.seed, device=device)
    stage = inject_adapters(stage, LoraSettings.from_run(cfg), stage.config.model_type, seed=cfg.seed)
    stage.to(device)
    load_trainable_state(stage, adapters)
    return stage
