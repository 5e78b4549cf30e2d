"""LoRA on the local trainer, QLoRA's refusal on CPU, and exports of preset runs."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hf_fixtures import records, tiny_model

from fedswarm import tokenized
from fedswarm.client.trainer import LocalTrainer
from fedswarm.formats import DataSpec
from fedswarm.lora import adapter_bytes, build_run_model
from fedswarm.models import build_model, trainable_state
from fedswarm.run_config import RunConfig
from fedswarm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model") / "llama", "llama", records("color", 100, 3))


def test_lora_trains_only_adapters(tmp_path, llama_dir):
    from hf_fixtures import write_jsonl

    cfg = RunConfig(model=str(llama_dir), peft="lora", lora_r=4, lora_alpha=8, seed=0)
    model = build_run_model(cfg)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    state = trainable_state(model)
    assert state and all(".lora_" in n for n in state), list(state)[:4]
    sent, full = adapter_bytes(model)
    assert sent < 0.05 * full
    data = write_jsonl(tmp_path / "rows.jsonl", records("color", 200, 4))
    tokens = tokenized.train_tokens(DataSpec(str(data)), load_tokenizer(str(llama_dir)), 0, 1)
    trainer = LocalTrainer(model, tokenized.sampler(tokens, 32, 8, 0), torch.device("cpu"), "fp32", lr=0.02)
    first = trainer.train_round(state, local_steps=15)
    second = trainer.train_round(first.state, local_steps=15)
    assert set(second.state) == set(state)
    assert second.train_loss < first.train_loss
    assert any(not torch.equal(second.state[n], state[n]) for n in state)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base_before[name]), f"frozen {name} moved"


def test_load_in_4bit_is_refused_on_cpu_before_bitsandbytes(capsys):
    from fedswarm.app.cli import main

    sys.modules.pop("bitsandbytes", None)
    code = main(["client", "--coordinator", "127.0.0.1:1", "--device", "cpu", "--load-in-4bit"])
    assert code == 2
    assert "--load-in-4bit (QLoRA) needs a CUDA device" in capsys.readouterr().err
    assert "bitsandbytes" not in sys.modules


def test_preset_run_exports_with_a_byte_tokenizer(tmp_path, capsys):
    """A byte-level preset run exports to a folder AutoTokenizer / AutoModelForCausalLM load, same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedswarm.app.cli import main
    from fedswarm.coordinator.store import Store

    model = build_model("gpt2-tiny", seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # a "trained" state, not the seed's init
    store = Store(tmp_path / "state")
    store.set_meta("run_config", RunConfig(seed=3).to_json())
    store.commit_round({"round": 1, "eval_loss": 1.0, "clients": []}, dict(trainable_state(model)))
    store.close()
    assert main(["export", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    text = "def f(x):\n    return x  # ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    x = torch.tensor([ids])
    with torch.no_grad():
        np.testing.assert_allclose(loaded(input_ids=x).logits.numpy(), model(input_ids=x).logits.numpy(), atol=1e-5)
    assert main(["export", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "m"), "--merge"]) == 2
    assert "this run trained the full model" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["llama_dir", "gpt2-tiny"])
def test_lora_coordinator_holds_no_base_and_starts_from_the_clients_adapters(model, request):
    """Round 0's adapters come from a base on the meta device, seeded as a client seeds its own: bit-equal to what
    a client builds; the base is materialised only when the coordinator evaluates, and scores like a client's."""
    from fedswarm.lora import CentralModel, adapter_skeleton
    from fedswarm.models import evaluate, load_trainable_state

    name = str(request.getfixturevalue(model)) if model == "llama_dir" else model
    cfg = RunConfig(model=name, peft="lora", lora_r=4, lora_alpha=8, seed=5)
    skeleton = adapter_skeleton(cfg)
    assert all(p.device.type == "meta" for p in skeleton.parameters() if not p.requires_grad)
    central = CentralModel(cfg)
    initial = central.initial_state()
    client = trainable_state(build_run_model(cfg))   # what client/daemon.py builds at join
    assert list(initial) == list(client) and all(torch.equal(initial[n], client[n]) for n in client)
    assert not central.materialised
    state = {n: t + 0.05 * torch.randn_like(t) for n, t in initial.items()}   # lora_B != 0: adapters matter
    reference = build_run_model(cfg)
    load_trainable_state(reference, state)
    windows = torch.randint(0, 250, (6, 17))
    assert central.evaluate(state, windows) == pytest.approx(evaluate(reference, windows), abs=1e-6)
    assert central.materialised
    central.free()
    assert not central.materialised


def test_full_finetune_coordinator_keeps_no_copy_of_the_weights():
    """A full fine-tune's initial weights are the model's own tensors, handed over; the evaluation model keeps
    only meta parameters between evaluations (ties kept: GPT-2's head is its embedding)."""
    from fedswarm.lora import CentralModel
    from fedswarm.models import evaluate, load_trainable_state

    cfg = RunConfig(model="gpt2-tiny", peft="none", seed=2)
    central = CentralModel(cfg)
    initial = central.initial_state()
    assert list(initial) == list(trainable_state(build_model("gpt2-tiny", seed=2)))
    assert central.materialised and all(p.device.type == "meta" for p in central._module.parameters())
    state = {n: t + 0.01 * torch.randn_like(t) for n, t in initial.items()}
    reference = build_model("gpt2-tiny", seed=2)
    load_trainable_state(reference, state)
    windows = torch.randint(0, 256, (6, 33))
    assert central.evaluate(state, windows) == pytest.approx(evaluate(reference, windows), abs=1e-6)
    assert all(p.device.type == "meta" for p in central._module.parameters())
    no_eval = CentralModel(cfg, central_eval=False)   # --evaluate clients: the model is dropped once built
    assert set(no_eval.initial_state()) == set(initial) and not no_eval.materialised
