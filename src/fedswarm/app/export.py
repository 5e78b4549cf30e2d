"""`fedswarm export`: a run's weights as a standard Hugging Face folder (`fedswarm generate` samples one: generate.py).

Export writes what `AutoModelForCausalLM.from_pretrained` loads (config, safetensors, tokenizer);
a LoRA run writes a PEFT adapter folder (`PeftModel.from_pretrained`) or, with --merge, the base
with the adapters merged in. Presets get the byte tokenizer as a Hugging Face tokenizer. A small
`fedswarm.json` beside them records how the run trained (its --format: generate answers a chat-tuned
folder through the chat template).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from fedswarm.run_config import RunConfig

EXPORT_RECORD = "fedswarm.json"   # in an exported folder: {"format": "text" | "chat", "round": N, ...}


def _round_state(state_dir: str, rnd: int | None) -> tuple[RunConfig, int, dict[str, torch.Tensor]]:
    from fedswarm.coordinator.store import Store
    from fedswarm.coordinator.strategy_state import split_checkpoint

    if not (Path(state_dir) / "fedswarm.sqlite3").is_file():
        raise ValueError(f"{state_dir} holds no fedswarm run (no fedswarm.sqlite3): pass the coordinator's --state-dir")
    store = Store(state_dir)
    try:
        stored = store.get_meta("run_config")
        if stored is None:
            raise ValueError(f"{state_dir} has no run config yet: start the coordinator on it first")
        cfg = RunConfig.from_json(stored)
        rnd = store.last_round() if rnd is None else rnd
        if rnd is None:
            raise ValueError(f"{state_dir} has no committed round yet")
        try:
            state, _strategy = split_checkpoint(store.load_checkpoint(rnd))
        except (KeyError, FileNotFoundError):
            raise ValueError(f"round {rnd} is not in {state_dir} (kept: the last few committed rounds)") from None
    finally:
        store.close()
    return cfg, rnd, state


def export(state_dir: str, out: str, rnd: int | None = None, merge: bool = False, model: str | None = None) -> dict:
    """Write round `rnd` (default: the last committed) of the run in `state_dir` to `out`; returns a summary."""
    from fedswarm.lora import build_run_model
    from fedswarm.models import load_trainable_state
    from fedswarm.tokenizer import byte_hf_tokenizer, load_tokenizer

    cfg, rnd, state = _round_state(state_dir, rnd)
    if model:
        cfg = dataclasses.replace(cfg, model=model)
    lora = cfg.peft != "none"
    if cfg.mode == "swarm":
        net = _swarm_model(cfg, state, lora)
    else:
        net = build_run_model(cfg)
        load_trainable_state(net, state)
    if merge and not lora:
        raise ValueError("--merge merges LoRA adapters into the base: this run trained the full model")
    if lora and merge:
        net = net.merge_and_unload()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out_dir)  # PeftModel: adapter_config.json + adapter_model.safetensors
    tokenizer = load_tokenizer(cfg.model)
    (byte_hf_tokenizer() if getattr(tokenizer, "is_bytes", False) else tokenizer).save_pretrained(out_dir)
    kind = "adapters" if lora and not merge else "model"
    fmt = cfg.data_format
    (out_dir / EXPORT_RECORD).write_text(json.dumps({"format": fmt, "round": rnd, "kind": kind, "base": cfg.model,
                                                     "mode": cfg.mode}, indent=1) + "\n")
    return {"round": rnd, "out": str(out_dir), "kind": kind, "base": cfg.model, "tensors": len(state),
            "format": fmt}


def exported_format(folder: str) -> str | None:
    """The --format the run that export wrote `folder` from trained with ("text" or "chat"); None: no record."""
    path = Path(folder) / EXPORT_RECORD
    if not path.is_file():
        return None
    try:
        fmt = json.loads(path.read_text()).get("format")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path} is not a fedswarm export record (JSON with a format): remove it, or export "
                         "the folder again") from None
    return fmt if fmt in ("text", "chat") else None


def _swarm_model(cfg: RunConfig, state: dict, lora: bool) -> torch.nn.Module:
    """A swarm run's checkpoint as one model: the untied model its stages were cut from (lm_head its own
    tensor), or, with LoRA, the frozen base wrapped by peft with the stages' adapters (the base is frozen, so
    its untied head still equals the embedding and the adapters fit the folder's own, tied, model)."""
    from fedswarm.lora import LoraSettings, wrap_lora
    from fedswarm.models import build_model, load_trainable_state
    from fedswarm.stages import build_untied_model

    if not lora:
        net = build_untied_model(cfg.model, seed=cfg.seed)
        load_trainable_state(net, state)
        return net
    net = wrap_lora(build_model(cfg.model, seed=cfg.seed), LoraSettings.from_run(cfg), cfg.seed)
    load_trainable_state(net, {"base_model.model." + name: t for name, t in state.items()})
    return net


def load_exported(folder: str, base: str | None = None) -> torch.nn.Module:
    """A folder written by export: a full model, or an adapter folder on its base (`base` overrides the recorded one)."""
    from transformers import AutoModelForCausalLM

    path = Path(folder)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = base or json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base_model = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True, dtype=torch.float32)
        return PeftModel.from_pretrained(base_model, folder, local_files_only=True)
    if not (path / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder (no config.json or adapter_config.json)")
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", required=True, help="the coordinator's --state-dir")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="folder to write")
    p.add_argument("--round", type=int, default=None, help="committed round to export (default: the last)")
    p.add_argument("--merge", action="store_true", help="LoRA runs: merge the adapters into the base weights")
    p.add_argument("--model", default=None, metavar="HF_DIR", help="the base model folder (default: the run's --model)")


def export_main(args: argparse.Namespace) -> int:
    try:
        summary = export(args.state_dir, args.out, args.round, args.merge, args.model)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
