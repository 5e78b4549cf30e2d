"""Models: small presets built from `transformers` configs with random init, or a local Hugging Face folder.

Nothing is downloaded: a preset is a config built in code, a path to a config
JSON, or a Hugging Face folder (config.json + weights + tokenizer, as written by
`save_pretrained`) on disk, loaded with `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from fedswarm.data import VOCAB_SIZE
from fedswarm.errors import BadInput, why
from fedswarm.tokenizer import is_hf_folder, json_problem, load_tokenizer


def _gpt2(n_layer: int, n_embd: int, n_head: int, n_positions: int = 512, vocab_size: int = VOCAB_SIZE) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )


def _llama(n_layer: int, hidden: int, n_head: int, intermediate: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=True,
    )


PRESETS = {
    "gpt2-tiny": lambda: _gpt2(n_layer=4, n_embd=128, n_head=4),      # ~0.8M params, the default
    "gpt2-small8": lambda: _gpt2(n_layer=8, n_embd=256, n_head=8),    # ~6.4M params
    "llama-tiny": lambda: _llama(n_layer=4, hidden=128, n_head=4, intermediate=352),
    # GPT-2 small's shape and 50,257 embeddings (124.4M params, random weights): real-size traffic and memory
    "gpt2-124m": lambda: _gpt2(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
}
DEFAULT_PRESET = "gpt2-tiny"


def model_config(preset: str) -> PretrainedConfig:
    """A preset name, a config JSON file, or a folder holding config.json; BadInput naming the file if unusable."""
    if preset in PRESETS:
        return PRESETS[preset]()
    path = Path(preset)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInput(f"--model {preset}: the folder has no config.json; point --model at a folder "
                           f"save_pretrained wrote (config.json, weights, tokenizer), a config JSON file or {_PRESETS}")
        path = path / "config.json"
    elif not path.is_file():
        raise BadInput(f"--model {preset!r}: no such preset, file or folder; use {_PRESETS}, a config JSON file, "
                       f"or a folder with config.json")
    if problem := json_problem(path):
        raise BadInput(f"--model: {problem}; a model config is the config.json save_pretrained writes")
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise BadInput(f"--model: {path} holds a JSON {type(raw).__name__}, not a model config object")
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise BadInput(f"{path} has no 'model_type'; add e.g. \"model_type\": \"gpt2\"")
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError, KeyError) as err:
        raise BadInput(f"--model: {path} is not a config transformers can build ({why(err)})") from None
    check_config(config, path)
    return config


_PRESETS = "a preset (" + ", ".join(PRESETS) + ")"
_POSITIVE = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size",
             "num_key_value_heads")


def check_config(config: PretrainedConfig, where: Path | str) -> None:
    """BadInput naming the key of a config that no model can be built from (sizes < 1, heads that do not divide)."""
    def key(attr: str) -> str:   # the name in config.json (GPT-2 says n_layer for num_hidden_layers)
        return getattr(config, "attribute_map", {}).get(attr, attr)

    for attr in _POSITIVE:
        value = getattr(config, attr, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BadInput(f"--model: {where}: {key(attr)} = {value!r}; it must be an integer >= 1")
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if hidden and heads and getattr(config, "head_dim", None) is None and hidden % heads:
        raise BadInput(f"--model: {where}: {key('hidden_size')} = {hidden} is not a multiple of "
                       f"{key('num_attention_heads')} = {heads}; each attention head gets hidden/heads dimensions")
    kv = getattr(config, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise BadInput(f"--model: {where}: {key('num_attention_heads')} = {heads} is not a multiple of "
                       f"num_key_value_heads = {kv}")


def check_model(model: str) -> None:
    """BadInput (naming the file and what is wrong) unless `model` builds: its config, and for a Hugging Face
    folder its tokenizer and the headers of its safetensors weights (read without loading the tensors)."""
    model_config(model)
    if is_hf_folder(model):
        check_tokenizer_fits(model)
        for path in weight_files(model):
            check_weights(path)


def weight_files(folder: str) -> list[Path]:
    """The safetensors files a folder's weights are in (one file, or the shards its index names)."""
    root = Path(folder)
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    index = root / "model.safetensors.index.json"
    if not index.is_file():
        return []
    if problem := json_problem(index):
        raise BadInput(f"--model: {problem}: save the model again with save_pretrained")
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (KeyError, TypeError, AttributeError):
        raise BadInput(f"--model: {index} has no weight_map of tensor -> shard file: save the model again") from None
    return [root / name for name in shards]


def check_weights(path: Path) -> None:
    """BadInput unless `path` is a complete safetensors file (its header names every byte of it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except FileNotFoundError:
        raise BadInput(f"--model: {path} is missing: copy the model's whole folder") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type (and OSError) for a bad file
        raise BadInput(f"--model: {path} is not a complete safetensors file ({why(err)}): copy or save it again") \
            from None


def build_model(preset: str, seed: int = 0, weights: str | None = None) -> torch.nn.Module:
    """Random-init causal LM from a preset (deterministic in `seed`), optionally loading safetensors weights.

    A Hugging Face folder with weights loads with `from_pretrained` (float32, offline); a folder must hold
    a tokenizer whose vocabulary fits the embeddings (ValueError otherwise)."""
    config = model_config(preset)
    if is_hf_folder(preset):
        check_tokenizer_fits(preset)
        if weights is None and _has_weights(preset):
            for path in weight_files(preset):
                check_weights(path)
            try:
                return AutoModelForCausalLM.from_pretrained(preset, local_files_only=True, dtype=torch.float32)
            except (OSError, RuntimeError, ValueError) as err:
                raise BadInput(f"--model {preset}: its weights do not load ({why(err)})") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    weights_file = _weights_file(preset, weights)
    if weights_file is not None:
        from safetensors.torch import load_file

        check_weights(weights_file)
        missing, unexpected = model.load_state_dict(load_file(str(weights_file)), strict=False)
        missing = [k for k in missing if k not in _tied_names(model)]
        if missing or unexpected:
            raise BadInput(f"{weights_file} does not match {preset}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _has_weights(folder: str) -> bool:
    return any((Path(folder) / name).is_file() for name in (
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))


def check_tokenizer_fits(folder: str) -> None:
    """Refuse a folder whose tokenizer is missing or has more ids than the model has embeddings."""
    rows = model_config(folder).vocab_size   # a broken config.json is named as such, not as a tokenizer problem
    tokenizer = load_tokenizer(folder)  # BadInput when there is none or it does not load
    if len(tokenizer) > rows:
        raise BadInput(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model has {rows} embeddings: "
                         f"save the tokenizer that belongs to this model, or resize the embeddings with "
                         f"model.resize_token_embeddings({len(tokenizer)}) before save_pretrained")


def _weights_file(preset: str, weights: str | None) -> Path | None:
    if weights:
        return Path(weights)
    folder = Path(preset)
    if folder.is_dir() and (folder / "model.safetensors").is_file():
        return folder / "model.safetensors"
    return None


def _tied_names(model: torch.nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    return tied


def trainable_state(model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The tensors that travel: trainable parameters once each (tied weights sent once; with LoRA only the
    adapters), float32, CPU, detached."""
    return OrderedDict(
        (name, param.detach().to("cpu", torch.float32).clone())
        for name, param in model.named_parameters()  # remove_duplicate=True: tied weights once
        if param.requires_grad
    )


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters in place (names and shapes must match)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:5]
        extra = sorted(set(state) - set(params))[:5]
        raise ValueError(f"state does not match the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, param in params.items():
            src = state[name]
            if tuple(src.shape) != tuple(param.shape):
                raise ValueError(f"{name}: shape {tuple(src.shape)} != model's {tuple(param.shape)}")
            param.copy_(src.to(param.device, param.dtype))


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets; x, y: int64 [B, T], y = -100 where there is no target."""
    logits = model(input_ids=x).logits  # [B, T, V]
    flat = logits.float().reshape(-1, logits.size(-1))
    if bool((y < 0).any()):  # masked labels (chat: prompt tokens); a batch with no target gives loss 0
        total = torch.nn.functional.cross_entropy(flat, y.reshape(-1), ignore_index=-100, reduction="sum")
        return total / (y >= 0).sum().clamp(min=1)
    return torch.nn.functional.cross_entropy(flat, y.reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean loss over eval windows [N, T+1] (float32, no autocast: comparable across runs).

    Windows [N, 2, T+1] carry a labels row (-100: not a target, e.g. a chat prompt)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.size(0), batch_size):
        chunk = windows[start:start + batch_size].to(device)
        if chunk.dim() == 3:
            loss = lm_loss(model, chunk[:, 0, :-1], chunk[:, 1, 1:])
        else:
            loss = lm_loss(model, chunk[:, :-1], chunk[:, 1:])
        total += loss.item() * chunk.size(0)
        count += chunk.size(0)
    model.train()
    return total / max(count, 1)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each transformer block's activations in the backward pass instead of keeping them
    (`torch.utils.checkpoint` per block, non-reentrant): less memory for about a third more compute.

    Works for the presets and Hugging Face folders alike (both are transformers models whose blocks are
    checkpointing layers), plain or wrapped by peft: non-reentrant checkpointing needs no input that requires
    grad, so LoRA on a frozen base gets its adapters' gradients as it does without checkpointing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing: drop "
                         "--gradient-checkpointing for this model")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):   # transformers >= 5.x names it so
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False   # a KV cache is useless in training and incompatible with the recompute
    return model
