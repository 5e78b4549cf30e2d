"""Pipeline stages of Hugging Face folders (GPT-2, Llama, Qwen2, Mistral): chained stages compute the full model's loss."""
from __future__ import annotations

import pytest
import torch
from hf_fixtures import records, tiny_model

from fedswarm.models import lm_loss
from fedswarm.run_config import RunConfig
from fedswarm.stages import build_stage, build_untied_model, num_layers_of


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_hf_folder_stages_chain_to_the_full_loss(tmp_path, family):
    folder = str(tiny_model(tmp_path / family, family, records("add", 60, 1)))
    torch.manual_seed(0)
    vocab = build_untied_model(folder).config.vocab_size
    assert vocab > 256, "the folder's own vocabulary, not bytes"
    x = torch.randint(0, vocab, (2, 16))
    y = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        full = lm_loss(build_untied_model(folder), x, y).item()
        assert num_layers_of(folder) == 2
        stages = [build_stage(folder, i, 2) for i in range(2)]
        h = x
        for stage in stages[:-1]:
            h = stage(h)
        assert abs(stages[-1](h, y).item() - full) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_stages_chain_to_the_coordinators_lora_model(tmp_path, family):
    """Each stage holds its frozen base (read from the folder) and its adapters; chained, they compute what
    the coordinator's LoRA model computes, and together their adapters are exactly its trainable state."""
    from fedswarm.models import load_trainable_state, trainable_state
    from fedswarm.stage_lora import build_lora_stage, lora_eval_model, lora_stage_names
    from fedswarm.stages import stage_state

    folder = str(tiny_model(tmp_path / family, family, records("add", 60, 1)))
    cfg = RunConfig(model=folder, mode="swarm", stages=2, seed=0, peft="lora", lora_r=4, lora_alpha=8.0, lora_targets="")
    full = lora_eval_model(cfg)
    adapters = {n: torch.randn_like(t) * 0.05 for n, t in trainable_state(full).items()}   # lora_B != 0: they matter
    load_trainable_state(full, adapters)
    names = [lora_stage_names(cfg, i) for i in range(2)]
    assert sorted(n for stage in names for n in stage) == sorted(adapters) and all("lora_" in n for n in adapters)
    stages = [build_lora_stage(cfg, i, {n: adapters[n] for n in names[i]}) for i in range(2)]
    for i, stage in enumerate(stages):
        assert sorted(stage_state(stage)) == sorted(names[i])   # only adapters train and travel
        assert all(not p.requires_grad for n, p in stage.named_parameters() if "lora_" not in n)
    vocab = full.config.vocab_size
    x, y = torch.randint(0, vocab, (2, 16)), torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        expected = lm_loss(full, x, y).item()
        got = stages[1](stages[0](x), y).item()
    assert abs(got - expected) < 1e-5, (got, expected)


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_qwen2_folder_trains_lora_adapters_in_swarm_mode_across_three_stages(tmp_path):
    """`fedswarm sim --mode swarm --peft lora --format chat` on a Qwen2 folder with its own tokenizer and chat
    template and a JSON Lines file: peers keep their stage's frozen base, only adapters are averaged."""
    import json

    from hf_fixtures import write_jsonl

    from fedswarm.sim.processes import Proc, fedswarm_cmd
    from fedswarm.sim.tiny_hf import save_tiny_hf

    model = save_tiny_hf(tmp_path / "qwen2", "qwen2", [r["text"] for r in records("add", 200, 1)], vocab_size=400,
                         layers=3)
    data = write_jsonl(tmp_path / "data.jsonl", records("add", 800, 2))
    out = tmp_path / "sim"
    sim = Proc("sim", fedswarm_cmd("sim", "--mode", "swarm", "--model", str(model), "--data", str(data),
                                   "--format", "chat",   # loss on the responses only: -100 labels on the wire
                                   "--peft", "lora", "--lora-r", "4", "--lr", "1e-2",
                                   "--stages", "3", "--peers", "3", "--trainers", "1", "--rounds", "2",
                                   "--average-every", "5", "--seq-len", "32", "--batch-size", "8", "--out", str(out)),
               tmp_path / "sim.log")
    try:
        code = sim.popen.wait(timeout=360)
    finally:
        sim.stop()
    assert code == 0, sim.output()[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["peft"] == "lora" and report["swarm"]["microbatches_lost"] == 0
    rounds = report["rounds"]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"], rounds
    full_bytes = sum(p.numel() for p in build_untied_model(str(model)).parameters()) * 4
    for r in rounds[1:]:   # per stage average: each replica uploads its stage's adapters (int8), not the base
        assert 0 < r["bytes_up"] <= 0.05 * full_bytes, (r["bytes_up"], full_bytes)

    # the run exports as a PEFT adapter folder on the folder's own model, or merged; both compute what the
    # coordinator's model of the last round computes
    from fedswarm.app.export import _round_state, export, load_exported
    from fedswarm.models import load_trainable_state
    from fedswarm.stage_lora import lora_eval_model

    cfg, _, state = _round_state(str(out / "state"), None)
    ref = lora_eval_model(cfg).eval()
    load_trainable_state(ref, state)
    x = torch.randint(0, ref.config.vocab_size, (2, 16))
    for merge in (False, True):
        folder = tmp_path / f"export-{'merged' if merge else 'adapters'}"
        assert export(str(out / "state"), str(folder), merge=merge)["kind"] == ("model" if merge else "adapters")
        with torch.no_grad():
            got, expected = load_exported(str(folder)).eval()(x).logits, ref(x).logits
        assert torch.allclose(got, expected, atol=1e-4), (merge, (got - expected).abs().max())


def test_chat_labels_cross_the_wire_but_ids_stay_in_the_vocabulary():
    """The last stage takes -100 labels (no loss on a chat prompt); token ids and other labels are refused."""
    from fedswarm.client.swarm.tensors import BadStageInput, ids_from_bytes, ids_to_bytes

    masked = torch.tensor([[-100, -100, 5, 7]])
    assert torch.equal(ids_from_bytes(ids_to_bytes(masked), (1, 4), 10, 8, labels=True), masked)
    for data, labels in ((masked, False), (torch.tensor([[-1, 2, 3, 4]]), True), (torch.tensor([[1, 2, 3, 10]]), True)):
        with pytest.raises(BadStageInput, match="outside the vocabulary"):
            ids_from_bytes(ids_to_bytes(data), (1, 4), 10, 8, labels=labels)
