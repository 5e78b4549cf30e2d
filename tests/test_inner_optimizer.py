"""The clients' inner optimizer: Muon on the hidden matrices and AdamW on the rest (--inner-optimizer muon)."""
from __future__ import annotations

import pytest
import torch

from fedswarm.client.trainer import LocalTrainer
from fedswarm.data import BatchSampler, load_train_tokens
from fedswarm.inner_optimizer import MuonWithAdamW, build_inner_optimizer, muon_eligible
from fedswarm.models import build_model, trainable_state
from fedswarm.run_config import RunConfig

torch.set_num_threads(1)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_muon_takes_the_hidden_matrices_only(preset):
    model = build_model(preset, seed=0)
    on_muon = [n for n, p in model.named_parameters() if muon_eligible(n, p)]
    assert on_muon and all(p.ndim == 2 for n, p in model.named_parameters() if n in on_muon)
    assert not any(k in n for n in on_muon for k in ("wte", "wpe", "embed", "lm_head"))
    opt = build_inner_optimizer("muon", model.named_parameters(), 1e-3, 0.01)
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)
    owned = {id(p) for g in opt.param_groups for p in g["params"]}
    assert owned == {id(p) for p in model.parameters()}      # every parameter trains, each once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_trainer_with_muon_learns_and_follows_the_schedule():
    tokens = load_train_tokens("stdlib", 0, 8)
    model = build_model("gpt2-tiny", seed=0)
    trainer = LocalTrainer(model, BatchSampler(tokens, 32, 4, 0), torch.device("cpu"), "fp32", lr=1e-3,
                           inner_optimizer="muon")
    assert isinstance(trainer.optimizer, MuonWithAdamW)
    state = trainable_state(model)
    first = trainer.train_round(state, local_steps=10, lr_at=lambda i: 1e-3 * (i + 1) / 10)
    second = trainer.train_round(first.state, local_steps=10)
    assert second.train_loss < first.train_loss
    assert first.lrs[0] == pytest.approx(1e-3 / 10)
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {1e-3}   # both optimizers' groups were set
    assert len(trainer.optimizer.state) == len(trainer.params)           # Muon's momentum and AdamW's moments


def test_unknown_and_unsupported_combinations_are_refused():
    with pytest.raises(ValueError, match="choose one of"):
        build_inner_optimizer("sgd", build_model("gpt2-tiny", seed=0).named_parameters(), 1e-3, 0.01)
    with pytest.raises(ValueError, match="no hidden weight matrix"):
        MuonWithAdamW([("wte.weight", torch.nn.Parameter(torch.zeros(4, 4)))], 1e-3, 0.01)
    with pytest.raises(ValueError, match="choose one of"):
        RunConfig(inner_optimizer="lion").check()
    with pytest.raises(ValueError, match="swarm peers train"):
        RunConfig(inner_optimizer="muon", mode="swarm").check()
    with pytest.raises(ValueError, match="LoRA adapters"):
        RunConfig(inner_optimizer="muon", peft="lora").check()
    RunConfig(inner_optimizer="muon").check()
    assert RunConfig.from_json(RunConfig(inner_optimizer="muon").to_json()).inner_optimizer == "muon"
