"""Pipeline stages: chained stages compute the same loss and gradients as the full model."""
from __future__ import annotations

import math

import pytest
import torch

from fedswarm.models import build_model, lm_loss, load_trainable_state, model_config, trainable_state
from fedswarm.stages import (
    assemble, build_stage, build_untied_model, load_stage_state, num_layers_of, split_layers,
    stage_param_names, stage_state,
)
from fedswarm.run_config import RunConfig

torch.set_num_threads(1)

PRESETS = ["gpt2-tiny", "llama-tiny"]
SEED = 3


def batch(preset: str, B: int = 2, T: int = 16):
    g = torch.Generator().manual_seed(1234)
    V = model_config(preset).vocab_size
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def chain_loss(stages, x, y):
    h = x
    for stage in stages[:-1]:
        h = stage(h)
    return stages[-1](h, y)


def test_split_layers():
    for L in range(1, 10):
        for S in range(1, L + 1):
            ranges = split_layers(L, S)
            assert len(ranges) == S
            assert [i for r in ranges for i in r] == list(range(L))  # each layer once, in order
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert split_layers(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    for bad in (0, -1, 6):
        with pytest.raises(ValueError):
            split_layers(5, bad)
    assert num_layers_of("gpt2-tiny") == 4 and num_layers_of("gpt2-small8") == 8
    assert num_layers_of("gpt2-124m") == 12
    with pytest.raises(ValueError):
        build_stage("gpt2-tiny", 5, 4)


def test_the_real_size_preset_is_gpt2_small():
    from transformers import AutoModelForCausalLM

    config = model_config("gpt2-124m")
    assert (config.n_layer, config.n_embd, config.n_head, config.vocab_size) == (12, 768, 12, 50257)
    with torch.device("meta"):   # shapes only: nothing allocated
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_untied_model_matches_tied():
    x, y = batch("gpt2-tiny")
    tied, untied = build_model("gpt2-tiny", SEED), build_untied_model("gpt2-tiny", SEED)
    assert "lm_head.weight" not in trainable_state(tied) and "lm_head.weight" in trainable_state(untied)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert torch.equal(untied.lm_head.weight, tied.transformer.wte.weight)
    with torch.no_grad():
        assert abs(lm_loss(untied, x, y).item() - lm_loss(tied, x, y).item()) < 1e-6


@pytest.mark.parametrize("preset", PRESETS)
def test_chained_stages_match_full_model(preset):
    x, y = batch(preset)
    with torch.no_grad():
        full = lm_loss(build_untied_model(preset, SEED), x, y).item()
        tied = lm_loss(build_model(preset, SEED), x, y).item()
    assert abs(full - tied) < 1e-5
    for S in (1, 2, 3, 4):
        stages = [build_stage(preset, i, S, SEED) for i in range(S)]
        assert [s.is_first for s in stages] == [i == 0 for i in range(S)]
        assert [s.is_last for s in stages] == [i == S - 1 for i in range(S)]
        with torch.no_grad():
            loss = chain_loss(stages, x, y)
            if S > 1:
                hidden = stages[0](x)
                assert hidden.shape == (2, 16, model_config(preset).hidden_size)
        assert loss.dim() == 0
        assert abs(loss.item() - full) < 1e-5, (S, loss.item(), full)
        assert abs(loss.item() - tied) < 1e-5
    with pytest.raises(ValueError):
        stages[-1](hidden)  # the last stage needs labels


@pytest.mark.parametrize("preset", PRESETS)
def test_pipeline_gradients_match_full_model(preset):
    x, y = batch(preset)
    S = 3
    stages = [build_stage(preset, i, S, SEED) for i in range(S)]
    # forward: each hop detaches, as the wire would
    inputs, outputs, h = [], [], x
    for stage in stages[:-1]:
        out = stage(h)
        inputs.append(h)
        outputs.append(out)
        h = out.detach().requires_grad_()
    loss = stages[-1](h, y)
    # backward: last stage first, feed each input grad to the previous stage
    loss.backward()
    grad = h.grad
    for i in range(S - 2, -1, -1):
        torch.autograd.backward(outputs[i], grad)
        grad = inputs[i].grad if i > 0 else None

    full = build_untied_model(preset, SEED)
    lm_loss(full, x, y).backward()
    full_grads = {n: p.grad for n, p in full.named_parameters()}
    stage_grads = {n: p.grad for s in stages for n, p in s.named_parameters()}
    assert set(stage_grads) == set(full_grads)
    prefix = "transformer." if preset.startswith("gpt2") else "model."
    first = [n for n in full_grads if n.startswith(prefix + ("h.0." if "gpt2" in preset else "layers.0."))][:3]
    emb = prefix + ("wte.weight" if "gpt2" in preset else "embed_tokens.weight")
    last_layer = num_layers_of(preset) - 1
    last = [n for n in full_grads if f".{last_layer}." in n][:3]
    checked = first + last + [emb, "lm_head.weight"]
    for name in checked:
        assert stage_grads[name] is not None and stage_grads[name].abs().sum() > 0, name
        assert torch.allclose(stage_grads[name], full_grads[name], atol=1e-5, rtol=1e-5), name
    # and every other gradient too, since it's cheap
    for name in full_grads:
        assert torch.allclose(stage_grads[name], full_grads[name], atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("preset", PRESETS)
def test_states_partition_and_assemble(preset):
    x, y = batch(preset)
    S = 3
    stages = [build_stage(preset, i, S, SEED) for i in range(S)]
    states = [stage_state(s) for s in stages]
    keys = [set(st) for st in states]
    for i in range(S):
        for j in range(i + 1, S):
            assert not keys[i] & keys[j]
    full = build_untied_model(preset, SEED)
    assert list(assemble(states)) == list(trainable_state(full))  # same keys, same order
    for i, st in enumerate(states):
        assert list(st) == stage_param_names(preset, i, S)
        assert list(st) == [n for n, _ in stages[i].named_parameters()]
        assert sum(p.numel() for p in stages[i].parameters()) == sum(t.numel() for t in st.values())
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in st.values())
    assert "lm_head.weight" in states[-1] and "lm_head.weight" not in states[0]
    with pytest.raises(ValueError):
        assemble([states[0], states[0]])

    # perturb the stage states, assemble, load into a fresh untied model: same loss as the chain
    g = torch.Generator().manual_seed(7)
    new_states = [{n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in st.items()} for st in states]
    for stage, st in zip(stages, new_states):
        load_stage_state(stage, st)
        assert all(torch.equal(a, st[n]) for n, a in stage_state(stage).items())  # round trip
    load_trainable_state(full, assemble(new_states))
    with torch.no_grad():
        chained, whole = chain_loss(stages, x, y).item(), lm_loss(full, x, y).item()
        before = lm_loss(build_untied_model(preset, SEED), x, y).item()
    assert abs(chained - whole) < 1e-5 and abs(whole - before) > 1e-4

    # mismatches
    with pytest.raises(ValueError):
        load_stage_state(stages[0], states[1])  # wrong names
    missing = dict(states[0])
    missing.pop(next(iter(missing)))
    with pytest.raises(ValueError):
        load_stage_state(stages[0], missing)
    with pytest.raises(ValueError):
        load_stage_state(stages[0], {**states[0], "lm_head.weight": states[-1]["lm_head.weight"]})
    name = next(iter(states[0]))
    with pytest.raises(ValueError):
        load_stage_state(stages[0], {**states[0], name: torch.zeros(3)})


def test_param_names_cover_every_split():
    for preset in PRESETS:
        want = list(trainable_state(build_untied_model(preset, 0)))
        for S in range(1, num_layers_of(preset) + 1):
            got = [n for i in range(S) for n in stage_param_names(preset, i, S)]
            assert got == want, (preset, S)


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_chain(preset):
    x, y = batch(preset)
    stages = [build_stage(preset, i, 2, SEED) for i in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = stages[0](x)
        loss = stages[1](h.to(torch.bfloat16).detach().requires_grad_(), y)  # bf16 on the wire
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    with torch.no_grad():
        ref = chain_loss(stages, x, y).item()
    assert abs(loss.item() - ref) < 0.05  # bf16 is close to fp32 at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stages[1].parameters())


class _CpuBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every distinct CPU storage the ops under it produce (what building allocates)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = storage.nbytes()
        return out

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@pytest.mark.parametrize("preset", PRESETS)
def test_a_stage_built_from_its_state_holds_only_its_modules(preset):
    S = 4
    full = build_untied_model(preset, SEED)
    full_bytes = sum(p.numel() * 4 for p in full.parameters())
    x, y = batch(preset)
    g = torch.Generator().manual_seed(11)
    old_stages, new_stages = [], []
    for i in range(S):
        old = build_stage(preset, i, S, SEED)   # the old construction: cut from the whole model
        state = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in stage_state(old).items()}
        load_stage_state(old, state)
        with _CpuBytes() as allocated:
            new = build_stage(preset, i, S, state=state)
        own = sum(t.numel() * 4 for t in state.values())
        # only its own parameters, none left on meta, every buffer real, nothing shared with the state given
        assert [n for n, _ in new.named_parameters()] == stage_param_names(preset, i, S)
        assert all(p.device.type == "cpu" for p in new.parameters())
        assert all(b.device.type == "cpu" and torch.isfinite(b).all() for b in new.buffers())
        assert all(torch.equal(p, state[n]) and p.data_ptr() != state[n].data_ptr() for n, p in new.named_parameters())
        assert [n for n, _ in new.named_buffers()] == [n for n, _ in old.named_buffers()]
        assert all(torch.equal(a, b) for a, b in zip(new.buffers(), old.buffers()))
        # what building allocated is the stage (plus small temporaries), far below the model
        assert allocated.total <= own * 1.05 + 65536, (i, allocated.total, own)
        assert own < full_bytes / 2
        old_stages.append(old)
        new_stages.append(new)
    with torch.no_grad():
        assert torch.equal(chain_loss(new_stages, x, y), chain_loss(old_stages, x, y))
        assert torch.equal(new_stages[0](x), old_stages[0](x))
    with pytest.raises(ValueError):   # a state of another stage: a clear error, not a silent partial load
        build_stage(preset, 1, S, state=stage_state(old_stages[0]))


def test_building_the_old_way_allocates_the_whole_model():
    """The yardstick for the test above: cutting a stage out of the model allocates more than the model."""
    with _CpuBytes() as allocated:
        build_stage("gpt2-tiny", 1, 4, SEED)
    full_bytes = sum(p.numel() * 4 for p in build_untied_model("gpt2-tiny", SEED).parameters())
    assert allocated.total >= full_bytes


@pytest.mark.parametrize("preset", PRESETS)
def test_gradient_checkpointing_stage_same_gradients(preset):
    """A stage that checkpoints its blocks gives the gradients (weights and input) of one that does not,
    keeps less for the backward, and re-runs its blocks' forwards in the backward."""
    from recompute import first_mlp, forwards, grads, saved_bytes

    x, y = batch(preset, T=48)
    hidden = build_stage(preset, 0, 2, SEED)(x).detach()

    def step(checkpointing: bool):
        stage = build_stage(preset, 1, 2, SEED).train()
        stage.gradient_checkpointing = checkpointing
        h = hidden.clone().requires_grad_()
        with forwards(first_mlp(stage)) as runs:
            with saved_bytes() as saved:
                loss = stage(h, y)
            loss.backward()
        return grads(stage), h.grad, runs.n, saved.n

    plain, plain_input, runs, saved = step(False)
    ckpt, ckpt_input, ckpt_runs, ckpt_saved = step(True)
    assert (runs, ckpt_runs) == (1, 2)
    assert ckpt_saved < 0.5 * saved, (ckpt_saved, saved)
    torch.testing.assert_close(ckpt_input, plain_input, atol=1e-6, rtol=1e-5)
    assert set(ckpt) == set(plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    stage = build_stage(preset, 1, 2, SEED).train()
    stage.gradient_checkpointing = True
    with forwards(first_mlp(stage)) as runs, torch.no_grad():   # nothing to recompute for: plain forward
        stage(hidden, y)
    assert runs.n == 1


def test_gradient_checkpointing_flag_reaches_a_peers_stage():
    """The peer's StageServer sets it on every stage it builds (and not when off)."""
    from fedswarm.client.swarm.roles import PeerStageServer

    cfg = RunConfig(model="gpt2-tiny", mode="swarm", stages=2, seed=SEED, lr=1e-3, seq_len=16, batch_size=2,
                    activation_codec="bf16")
    states = [stage_state(build_stage("gpt2-tiny", index, 2, SEED)) for index in (0, 1)]
    for on, indices in ((False, [1]), (True, [0, 1])):   # a re-assigned peer builds another stage: it checkpoints too
        server = PeerStageServer("run", cfg, torch.device("cpu"), "fp32", gradient_checkpointing=on)
        try:
            for index in indices:
                server.serve(index, states[index])
                assert server.module.gradient_checkpointing is on and server.module.index == index
        finally:
            server.close()
