"""Federated LoRA / QLoRA: the run's model wrapped with `peft`, so only adapter tensors train and travel.

Both sides build the same wrapped model from the run config: the frozen base comes from the
model folder (or preset) on each machine, the adapters from the coordinator's task arrays.
`--load-in-4bit` (QLoRA) quantizes the client's frozen base with bitsandbytes, on CUDA only;
the coordinator evaluates on a full-precision base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedswarm.models import build_model
from fedswarm.tokenizer import is_hf_folder

PEFT_METHODS = ("none", "lora")


@dataclass(frozen=True)
class LoraSettings:
    """What every participant must agree on to build the same adapters."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()   # empty: peft's default modules for the architecture

    @classmethod
    def from_run(cls, cfg: dict) -> "LoraSettings | None":
        """The run's LoRA settings, or None for full fine-tuning."""
        if cfg.get("peft", "none") == "none":
            return None
        return cls(r=int(cfg.get("lora_r", 8)), alpha=float(cfg.get("lora_alpha", 16.0)),
                   targets=tuple(t for t in str(cfg.get("lora_targets", "")).split(",") if t.strip()))


def check_peft_settings(peft: str, r: int, alpha: float, load_in_4bit: bool) -> None:
    """ValueError for settings that cannot run (before anything is loaded)."""
    if peft not in PEFT_METHODS:
        raise ValueError(f"--peft {peft!r}: choose one of {PEFT_METHODS}")
    if peft == "lora" and (r < 1 or alpha <= 0):
        raise ValueError("--lora-r must be >= 1 and --lora-alpha > 0")
    if load_in_4bit and peft != "lora":
        raise ValueError("--load-in-4bit trains adapters on a frozen 4-bit base: add --peft lora")


def wrap_lora(model: torch.nn.Module, settings: LoraSettings, seed: int = 0) -> torch.nn.Module:
    """`model` with LoRA adapters (dropout 0, deterministic init in `seed`); the base is frozen."""
    from peft import LoraConfig, get_peft_model

    model_type = getattr(model.config, "model_type", "")
    targets = list(settings.targets) or None
    if targets == ["all-linear"]:  # peft's shorthand: every linear layer but the output head
        targets = "all-linear"
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=model_type == "gpt2",
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as err:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                            or type(m).__name__ == "Conv1D"})
            raise ValueError(f"cannot place LoRA adapters on {model_type or type(model).__name__}: {err}; pass "
                             f"--lora-targets with some of its layer names, e.g. {','.join(names[:6])}") from None


def _load_4bit(model: str, device: torch.device) -> torch.nn.Module:
    if device.type != "cuda":
        raise ValueError("--load-in-4bit (QLoRA) needs a CUDA client: bitsandbytes' 4-bit layers do not run on "
                         f"{device.type}; drop --load-in-4bit on this client, or run it on a GPU host")
    if not is_hf_folder(model):
        raise ValueError("--load-in-4bit needs a Hugging Face model folder with weights (a preset has none to quantize)")
    try:
        import bitsandbytes  # noqa: F401 - only to give a clear error before transformers does
    except ImportError:
        raise ValueError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fedswarm.models import check_tokenizer_fits

    check_tokenizer_fits(model)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    base = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, quantization_config=quant,
                                                device_map={"": device.index or 0})
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def build_run_model(cfg: dict, device: torch.device | None = None, load_in_4bit: bool = False) -> torch.nn.Module:
    """The model a participant trains or evaluates: the run's base, wrapped with LoRA if the run says so.

    `load_in_4bit` (clients only) quantizes the frozen base: CUDA only, ValueError elsewhere."""
    settings = LoraSettings.from_run(cfg)
    if load_in_4bit:
        if settings is None:
            raise ValueError("--load-in-4bit trains adapters on a frozen 4-bit base: the run needs --peft lora")
        base = _load_4bit(cfg["model"], device or torch.device("cpu"))
    else:
        base = build_model(cfg["model"], seed=cfg.get("seed", 0))
    if settings is None:
        return base
    return wrap_lora(base, settings, seed=cfg.get("seed", 0))


def adapter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable fp32 bytes, all-parameter fp32 bytes): what travels vs the full model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    return trainable, sum(p.numel() for p in model.parameters()) * 4
