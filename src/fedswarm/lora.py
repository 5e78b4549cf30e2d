"""Federated LoRA / QLoRA: the run's model wrapped with `peft`, so only adapter tensors train and travel.

Both sides build the same wrapped model from the run config: the frozen base comes from the
model folder (or preset) on each machine, the adapters from the coordinator's task arrays.
`--load-in-4bit` (QLoRA) quantizes the client's frozen base with bitsandbytes, on CUDA only;
the coordinator evaluates on a full-precision base, and holds none unless it evaluates
(`CentralModel`): the round-0 adapters come from the base's shapes on the meta device.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from fedswarm.models import build_model, evaluate, model_config
from fedswarm.run_config import RunConfig
from fedswarm.tokenizer import is_hf_folder

EVAL_LOGITS_BYTES = 128 << 20   # a central evaluation scores at most this many bytes of fp32 logits at once


@dataclass(frozen=True)
class LoraSettings:
    """What every participant must agree on to build the same adapters."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()   # empty: peft's default modules for the architecture

    @classmethod
    def from_run(cls, cfg: RunConfig) -> "LoraSettings | None":
        """The run's LoRA settings, or None for full fine-tuning."""
        if cfg.peft == "none":
            return None
        return cls(r=int(cfg.lora_r), alpha=float(cfg.lora_alpha),
                   targets=tuple(t for t in cfg.lora_targets.split(",") if t.strip()))


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


def meta_base(model: str) -> torch.nn.Module:
    """The run's base model built on the meta device from its config: its shapes, no weights."""
    from transformers import AutoModelForCausalLM

    config = model_config(model)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapter_skeleton(cfg: RunConfig) -> torch.nn.Module:
    """The run's LoRA model whose base holds no memory: every base tensor is on the meta device, the adapters
    are real and seeded exactly as every client seeds its own.

    peft places new adapters on their base layer's device, so while it wraps, each base weight is a CPU stand-in
    of its shape that owns one element (a zero-stride view); afterwards the base goes back to the meta device."""
    base = meta_base(cfg.model)
    _replace_params(base, lambda _, p: torch.zeros((), dtype=p.dtype).expand(p.shape), lambda p: True)
    model = wrap_lora(base, LoraSettings.from_run(cfg), seed=cfg.seed)
    _replace_params(model, _to_meta, lambda p: not p.requires_grad)
    return model


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


def build_run_model(cfg: RunConfig, device: torch.device | None = None, load_in_4bit: bool = False) -> torch.nn.Module:
    """The model a participant trains or evaluates: the run's base, wrapped with LoRA if the run says so.

    `load_in_4bit` (clients only) quantizes the frozen base: CUDA only, ValueError elsewhere."""
    settings = LoraSettings.from_run(cfg)
    if load_in_4bit:
        if settings is None:
            raise ValueError("--load-in-4bit trains adapters on a frozen 4-bit base: the run needs --peft lora")
        base = _load_4bit(cfg.model, device or torch.device("cpu"))
    else:
        base = build_model(cfg.model, seed=cfg.seed)
    if settings is None:
        return base
    return wrap_lora(base, settings, seed=cfg.seed)


def adapter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable fp32 bytes, all-parameter fp32 bytes): what travels vs the full model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    return trainable, sum(p.numel() for p in model.parameters()) * 4


class CentralModel:
    """The coordinator's side of the run's model.

    `initial_state()` is round 0: a LoRA run's adapters come from the base's shapes on the meta device, seeded
    as every client seeds its own, so the base is never read for them; a full fine-tune's weights are built
    once and handed over (the model keeps none of them). The model that scores the held-out split is built
    on the first `evaluate` only (a coordinator that never evaluates centrally never holds a base); it takes
    the weights it scores as its own parameters, without a copy, and lets go of them once scored. `free()`
    drops it. Thread-safe."""

    def __init__(self, cfg: RunConfig, central_eval: bool = True):
        self.cfg, self.central_eval = cfg, central_eval
        self.settings = LoraSettings.from_run(cfg)
        self._module: torch.nn.Module | None = None
        self._lock = threading.Lock()

    @property
    def materialised(self) -> bool:
        """True while a model to evaluate with exists (its base, for LoRA, off the meta device)."""
        return self._module is not None

    def initial_state(self) -> "OrderedDict[str, torch.Tensor]":
        """The round-0 trainable tensors (float32, CPU), in the model's order: what the clients build."""
        if self.settings is not None:
            return _trainable(adapter_skeleton(self.cfg))
        model = build_model(self.cfg.model, seed=self.cfg.seed)
        state = _trainable(model)   # the parameters themselves: handed over, not copied
        with self._lock:
            if self.central_eval and self._module is None:
                release_trainable(model)   # buffers stay: the model evaluates later with the weights it is given
                self._module = model
        return state

    def evaluate(self, state: dict[str, torch.Tensor], windows: torch.Tensor) -> float:
        """Mean held-out loss of the model with `state` as its trainable weights (read, never written)."""
        with self._lock:
            if self._module is None:
                self._module = self._build()
            module = self._module
            assign_trainable(module, state)
            try:
                per_window = windows.size(-1) * module.config.vocab_size * 4
                return evaluate(module, windows, batch_size=max(1, min(32, EVAL_LOGITS_BYTES // per_window)))
            finally:
                release_trainable(module)

    def free(self) -> None:
        """Drop the evaluation model (the next `evaluate` builds it again)."""
        with self._lock:
            self._module = None

    def _build(self) -> torch.nn.Module:
        model = build_run_model(self.cfg)   # the base (its folder's weights, or the preset's seeded init) + adapters
        release_trainable(model)
        return model


def _trainable(model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Float32 CPU tensors of the trainable parameters, once each (tied weights once), without copies."""
    return OrderedDict((n, p.detach().to("cpu", torch.float32)) for n, p in model.named_parameters() if p.requires_grad)


def _slots(model: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """Every (module, attribute) holding each parameter: a tied weight sits in two places."""
    slots: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                slots.setdefault(id(param), []).append((module, attr))
    return slots


def _replace_params(model: torch.nn.Module, make, select=lambda p: p.requires_grad) -> None:
    """Each selected parameter replaced by a Parameter over `make(name, param)`, wherever it sits."""
    slots = _slots(model)
    for name, param in list(model.named_parameters()):
        if select(param):
            new = torch.nn.Parameter(make(name, param), requires_grad=param.requires_grad)
            for module, attr in slots[id(param)]:
                module._parameters[attr] = new


def _to_meta(_, param: torch.Tensor) -> torch.Tensor:
    return torch.empty(param.shape, dtype=param.dtype, device="meta")


def assign_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make `state`'s tensors the model's trainable parameters (no copy; ties kept); ValueError on other
    names or shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state))[:5], sorted(set(state) - set(params))[:5]
        raise ValueError(f"state does not match the model: missing {missing}, unexpected {extra}")
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {tuple(state[name].shape)} != model's {tuple(param.shape)}")
    device = next((b.device for b in model.buffers() if b.device.type != "meta"), torch.device("cpu"))
    _replace_params(model, lambda name, _: state[name].detach().to(device, torch.float32))


def release_trainable(model: torch.nn.Module) -> None:
    """Let go of the trainable parameters' storage: each becomes a meta tensor of its shape."""
    _replace_params(model, _to_meta)
