"""LocalTrainer (mixed precision, grad accumulation, FedProx) and the wire path its updates take."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedswarm.proto.fedswarm_pb2 as pb
from fedswarm.client.trainer import LocalTrainer, cpu_has_bf16, resolve_device, resolve_precision
from fedswarm.data import BatchSampler, load_train_tokens
from fedswarm.models import build_model, lm_loss, load_trainable_state, trainable_state
from fedswarm.proto import codec as C
from fedswarm.proto import wire
from fedswarm.run_config import RunConfig

torch.set_num_threads(1)

SEQ_LEN, BATCH = 32, 4
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run on the GPU machine")


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return load_train_tokens("stdlib", 0, 8)


class FixedBatch(BatchSampler):
    """A real BatchSampler whose first batch repeats, so a tiny model can overfit it; counts draws."""

    def __init__(self, tokens, seq_len=SEQ_LEN, batch_size=BATCH, seed=0):
        super().__init__(tokens, seq_len, batch_size, seed)
        self.calls = 0
        self._batch = None

    def sample(self):
        self.calls += 1
        if self._batch is None:
            self._batch = super().sample()
        return self._batch


def batch_loss(model: torch.nn.Module, state: dict[str, torch.Tensor], batch) -> float:
    """fp32 loss of `state` on `batch`, on the CPU, without autocast."""
    load_trainable_state(model, state)
    with torch.no_grad():
        return lm_loss(model, *batch).item()


def l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in a))


def check_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    names = [n for n, _ in model.named_parameters()]
    assert list(state) == names
    params = dict(model.named_parameters())
    for n, t in state.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu", n
        assert t.shape == params[n].shape and bool(torch.isfinite(t).all()), n
        assert t.data_ptr() != params[n].data_ptr(), f"{n} aliases the live parameter"


# -- device / precision ----------------------------------------------------------------------

def test_resolve_precision():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("fp16", CPU) == "fp16"
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ValueError):
        resolve_precision("AUTO", CPU)


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error; this host has CUDA")
def test_resolve_device_cuda_without_cuda():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(name)


# -- training on the CPU ---------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_overfits_fixed_batch(tokens, precision):
    sampler = FixedBatch(tokens)
    model = build_model("gpt2-tiny", seed=0)
    start = trainable_state(model)
    trainer = LocalTrainer(model, sampler, CPU, precision, lr=3e-3)
    assert not trainer.scaler.is_enabled()
    steps = 30
    result = trainer.train_round(start, local_steps=steps)

    check_state(result.state, trainer.model)
    assert result.num_examples == steps * 1 * BATCH
    assert sampler.calls == steps
    assert result.skipped_steps == 0 and result.seconds > 0
    assert math.isfinite(result.train_loss)

    probe = build_model("gpt2-tiny", seed=1)
    batch = sampler.sample()
    before, after = batch_loss(probe, start, batch), batch_loss(probe, result.state, batch)
    assert after < before - 0.5, (before, after)
    # the round's mean loss sits between the start and the end
    assert after < result.train_loss < before + 0.1


def test_grad_accum_doubles_examples(tokens):
    model = build_model("gpt2-tiny", seed=0)
    start = trainable_state(model)
    counts = {}
    for accum in (1, 2):
        sampler = FixedBatch(tokens)
        trainer = LocalTrainer(build_model("gpt2-tiny", seed=0), sampler, CPU, "fp32", lr=1e-3)
        result = trainer.train_round(start, local_steps=3, grad_accum=accum)
        assert sampler.calls == 3 * accum
        counts[accum] = result.num_examples
    assert counts == {1: 3 * BATCH, 2: 6 * BATCH}


def test_grad_accum_of_repeated_batch_equals_one_batch(tokens):
    # Accumulating k copies of the same micro-batch, each scaled 1/k, is the same gradient as one.
    start = trainable_state(build_model("gpt2-tiny", seed=0))
    states = []
    for accum in (1, 2):
        trainer = LocalTrainer(build_model("gpt2-tiny", seed=0), FixedBatch(tokens), CPU, "fp32", lr=1e-3)
        states.append(trainer.train_round(start, local_steps=2, grad_accum=accum).state)
    for n in states[0]:
        torch.testing.assert_close(states[0][n], states[1][n], rtol=1e-4, atol=1e-5)


@pytest.mark.integration
def test_fedprox_huge_mu_stays_near_start(tokens):
    start = trainable_state(build_model("gpt2-tiny", seed=0))
    dist = {}
    for mu in (0.0, 1e4):
        trainer = LocalTrainer(build_model("gpt2-tiny", seed=0), FixedBatch(tokens), CPU, "fp32", lr=3e-3)
        result = trainer.train_round(start, local_steps=15, proximal_mu=mu)
        check_state(result.state, trainer.model)
        dist[mu] = l2(result.state, start)
    assert dist[0.0] > 0
    assert dist[1e4] < 0.5 * dist[0.0], dist


def test_global_state_is_loaded_each_round(tokens):
    # A round starts from the weights it is given, not from the replica's last weights.
    start = trainable_state(build_model("gpt2-tiny", seed=0))
    trainer = LocalTrainer(build_model("gpt2-tiny", seed=3), FixedBatch(tokens), CPU, "fp32", lr=1e-3)
    first = trainer.train_round(start, local_steps=1)
    assert l2(first.state, start) < 0.5 * l2(trainable_state(build_model("gpt2-tiny", seed=3)), start)
    for n in start:  # the caller's dict is not modified in place
        torch.testing.assert_close(start[n], trainable_state(build_model("gpt2-tiny", seed=0))[n])


def test_fp16_on_cpu_runs_with_scaler(tokens):
    trainer = LocalTrainer(build_model("gpt2-tiny", seed=0), FixedBatch(tokens), CPU, "fp16", lr=1e-3)
    assert trainer.scaler.is_enabled()
    start = trainable_state(trainer.model)
    result = trainer.train_round(start, local_steps=3)
    check_state(result.state, trainer.model)
    assert 0 <= result.skipped_steps < 3
    assert l2(result.state, start) > 0


def test_llama_tiny_builds_and_trains_a_step(tokens):
    model = build_model("llama-tiny", seed=0)
    assert type(model).__name__ == "LlamaForCausalLM"
    start = trainable_state(model)
    sampler = FixedBatch(tokens)
    trainer = LocalTrainer(model, sampler, CPU, "bf16", lr=1e-3)
    result = trainer.train_round(start, local_steps=1)
    check_state(result.state, trainer.model)
    assert result.num_examples == BATCH and math.isfinite(result.train_loss)
    assert l2(result.state, start) > 0
    # tied embeddings travel once and the state loads back into a fresh replica
    fresh = build_model("llama-tiny", seed=5)
    load_trainable_state(fresh, result.state)
    assert l2(trainable_state(fresh), result.state) == 0


# -- training on a GPU -----------------------------------------------------------------------

@needs_cuda
def test_cuda_fp16_with_grad_scaler(tokens):
    device = torch.device("cuda")
    sampler = FixedBatch(tokens)
    start = trainable_state(build_model("gpt2-tiny", seed=0))
    trainer = LocalTrainer(build_model("gpt2-tiny", seed=0), sampler, device, "fp16", lr=3e-3)
    assert trainer.scaler.is_enabled()
    result = trainer.train_round(start, local_steps=30)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in result.state.values())
    assert result.skipped_steps < 30
    probe = build_model("gpt2-tiny", seed=1)
    batch = sampler.sample()
    assert batch_loss(probe, result.state, batch) < batch_loss(probe, start, batch) - 0.5


@needs_cuda
def test_cuda_bf16(tokens):
    if not torch.cuda.is_bf16_supported():
        with pytest.raises(ValueError, match="bf16"):
            resolve_precision("bf16", torch.device("cuda"))
        assert resolve_precision("auto", torch.device("cuda")) == "fp16"
        return
    device = torch.device("cuda")
    assert resolve_precision("auto", device) == "bf16"
    sampler = FixedBatch(tokens)
    start = trainable_state(build_model("gpt2-tiny", seed=0))
    trainer = LocalTrainer(build_model("gpt2-tiny", seed=0), sampler, device, "bf16", lr=3e-3)
    assert not trainer.scaler.is_enabled()
    result = trainer.train_round(start, local_steps=30)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in result.state.values())
    probe = build_model("gpt2-tiny", seed=1)
    batch = sampler.sample()
    assert batch_loss(probe, result.state, batch) < batch_loss(probe, start, batch) - 0.5


# -- the wire path of an update --------------------------------------------------------------

@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return trainable_state(build_model("gpt2-tiny", seed=0))


def spec_of(state):
    return {n: tuple(t.shape) for n, t in state.items()}


def assemble(parts, spec, codecs) -> dict[str, torch.Tensor]:
    asm = wire.PartAssembler(spec, codecs)
    for i, p in enumerate(parts):
        assert not asm.complete() or i == len(parts)
        asm.add(p)
    assert asm.complete()
    return asm.finish()


@pytest.mark.parametrize("max_part_bytes", [wire.MAX_PART_BYTES, 4096])
def test_wire_roundtrip_none_is_exact(state, max_part_bytes):
    ef = C.ErrorFeedback(pb.CODEC_NONE)
    parts = list(wire.state_parts(state, lambda n, t: ef.compress(n, t)[0], max_part_bytes))
    assert len(parts) == wire.count_parts(spec_of(state), pb.CODEC_NONE, None, max_part_bytes)
    assert all(len(p.data) + len(p.scales) <= max_part_bytes for p in parts)
    out = assemble(parts, spec_of(state), {pb.CODEC_NONE})
    assert list(out) == list(state)
    for n in state:
        assert torch.equal(out[n], state[n]), n
    assert all(float(r.abs().max()) == 0 for r in ef.residuals.values())


@pytest.mark.parametrize("max_part_bytes", [wire.MAX_PART_BYTES, 4096])
def test_wire_roundtrip_int8_error_feedback(state, max_part_bytes):
    ef = C.ErrorFeedback(pb.CODEC_INT8)
    bs = C.DEFAULT_BLOCK_SIZE[pb.CODEC_INT8]
    parts = list(wire.state_parts(state, lambda n, t: ef.compress(n, t)[0], max_part_bytes))
    assert len(parts) == wire.count_parts(spec_of(state), pb.CODEC_INT8, None, max_part_bytes)
    assert all(p.offset % bs == 0 for p in parts)
    out = assemble(parts, spec_of(state), {pb.CODEC_INT8})
    exact = 0
    for n, x in state.items():
        flat = x.flatten()
        pad = -flat.numel() % bs
        scale = torch.cat([flat, flat.new_zeros(pad)]).view(-1, bs).abs().amax(1)
        # half a quantization step, plus float32 rounding of x / scale * 127 (~254 ulp of the step)
        bound = (scale / 127 / 2).repeat_interleave(bs)[: flat.numel()] * (1 + 1e-4) + 1e-12
        err = (out[n].flatten() - flat).abs()
        assert (err <= bound).all(), n
        exact += int(torch.equal(out[n], x))
        # error feedback keeps exactly what was lost for the next round
        torch.testing.assert_close(ef.residuals[n], x - out[n], rtol=0, atol=1e-7)
    assert exact < len(state)  # int8 really is lossy


@pytest.mark.parametrize("codec,block", [(pb.CODEC_NONE, None), (pb.CODEC_FP16, None), (pb.CODEC_INT8, None),
                                         (pb.CODEC_INT8, 64), (pb.CODEC_INT4, None), (pb.CODEC_INT4, 64)])
def test_count_parts_matches_state_parts(codec, block):
    # The coordinator checks an upload's num_parts against count_parts; it must agree with what
    # state_parts really yields, for any part budget and tensor size.
    shapes = {"a": (1024, 257), "b": (1001,), "c": (3,), "d": (64, 64)}
    for budget in (1001, 4096, 65536, wire.MAX_PART_BYTES):
        parts = list(wire.state_parts({n: torch.ones(s) for n, s in shapes.items()},
                                      lambda n, t: C.encode(t.flatten(), codec, block), budget))
        assert len(parts) == wire.count_parts(shapes, codec, block, budget), budget


def test_count_parts_large_int8_block64():
    # 4096x4096 at int8/64 is 17.0 MiB: split cuts whole blocks, so it takes 18 parts, not 17.
    shape = (4096, 4096)
    enc = C.encode(torch.zeros(math.prod(shape)), pb.CODEC_INT8, 64)
    assert wire.count_parts({"w": shape}, pb.CODEC_INT8, 64) == len(C.split(enc, wire.MAX_PART_BYTES))


def _int8_parts(state, budget=4096):
    return list(wire.state_parts(state, lambda n, t: C.encode(t.flatten(), pb.CODEC_INT8), budget))


def test_assembler_rejects_unknown_name(state):
    part = _int8_parts(state)[0]
    part.name = "transformer.h.99.attn.c_attn.weight"
    asm = wire.PartAssembler(spec_of(state), {pb.CODEC_INT8})
    with pytest.raises(wire.WireError, match="unknown tensor name"):
        asm.add(part)
    part.name = "x" * (wire.MAX_NAME_LEN + 1)
    with pytest.raises(wire.WireError, match="unknown tensor name"):
        asm.add(part)
    assert asm.buffers == {}


def test_assembler_rejects_wrong_shape(state):
    part = _int8_parts(state)[0]
    part.shape[:] = list(reversed(part.shape)) if len(part.shape) > 1 else [part.shape[0] + 1]
    asm = wire.PartAssembler(spec_of(state), {pb.CODEC_INT8})
    with pytest.raises(wire.WireError, match="shape"):
        asm.add(part)
    assert asm.buffers == {}


def test_assembler_rejects_disallowed_codec(state):
    parts = _int8_parts(state)
    asm = wire.PartAssembler(spec_of(state), {pb.CODEC_NONE})
    with pytest.raises(wire.WireError, match="codec"):
        asm.add(parts[0])
    assert asm.buffers == {} and not asm.complete()


def test_assembler_rejects_out_of_order_offset(state):
    parts = _int8_parts(state, budget=1024)
    name = parts[0].name
    mine = [p for p in parts if p.name == name]
    assert len(mine) >= 3 and mine[1].offset > 0
    asm = wire.PartAssembler(spec_of(state), {pb.CODEC_INT8})
    with pytest.raises(wire.WireError, match="offset"):
        asm.add(mine[1])            # skips the first part
    asm.add(mine[0])
    with pytest.raises(wire.WireError, match="offset"):
        asm.add(mine[0])            # the same part again
    with pytest.raises(wire.WireError, match="offset"):
        asm.add(mine[2])            # skips the second
    asm.add(mine[1])                # the right one still fits
    assert asm.filled[name] == mine[2].offset


def test_assembler_rejects_incomplete_and_overlong(state):
    parts = _int8_parts(state)
    asm = wire.PartAssembler(spec_of(state), {pb.CODEC_INT8})
    for p in parts[:-1]:
        asm.add(p)
    assert not asm.complete()
    with pytest.raises(wire.WireError, match="incomplete"):
        asm.finish()
    last = parts[-1]
    bad = type(last)()
    bad.CopyFrom(last)
    bad.count = last.count + 1      # runs past the end of the tensor
    with pytest.raises(wire.WireError, match="outside"):
        asm.add(bad)
    asm.add(last)
    assert asm.complete()


# -- gradient checkpointing ------------------------------------------------------------------

def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(gradients, forwards of the first block's MLP, bytes saved for backward) of one fp32 step."""
    from recompute import first_mlp, forwards, grads, saved_bytes

    model.train()
    with forwards(first_mlp(model)) as runs:
        with saved_bytes() as saved:
            loss = lm_loss(model, x, y)
        loss.backward()
    return grads(model), runs.n, saved.n


def _same_gradients_with_checkpointing(build, vocab: int) -> None:
    g = torch.Generator().manual_seed(7)
    x, y = (torch.randint(0, vocab, (2, 48), generator=g) for _ in range(2))
    plain, runs, saved = _step(build(), x, y)
    model = build()
    from fedswarm.models import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)
    ckpt, ckpt_runs, ckpt_saved = _step(model, x, y)
    assert (runs, ckpt_runs) == (1, 2), "a checkpointed block runs its forward again in the backward"
    assert ckpt_saved < 0.5 * saved, (ckpt_saved, saved)   # the blocks keep only their inputs
    assert set(ckpt) == set(plain) and plain
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_gradient_checkpointing_same_gradients_preset(preset):
    _same_gradients_with_checkpointing(lambda: build_model(preset, seed=0), 256)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from hf_fixtures import records, tiny_model

    return str(tiny_model(tmp_path_factory.mktemp("ckpt") / "llama", "llama", records("add", 60, 3)))


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_gradient_checkpointing_same_gradients_hf_folder(hf_llama, peft):
    """A Hugging Face folder, fully trained and with LoRA adapters on its frozen base (non-reentrant
    checkpointing: the adapters get their gradients although no block input requires grad)."""
    from fedswarm.lora import build_run_model

    cfg = RunConfig(model=hf_llama, peft=peft, lora_r=4, lora_alpha=8, seed=0)

    def build():
        model, g = build_run_model(cfg), torch.Generator().manual_seed(1)
        with torch.no_grad():   # trained adapters: at init lora_B = 0, so lora_A gets no gradient at all
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=g))
        return model

    _same_gradients_with_checkpointing(build, 300)


def test_gradient_checkpointing_flag_reaches_the_trainers_model(tmp_path, tokens):
    """`fedswarm client --gradient-checkpointing` -> the federated role's LocalTrainer -> every block of its model."""
    from fedswarm.app.cli import build_parser
    from fedswarm.client.daemon import FederatedRole
    from fedswarm.client.options import ClientSettings

    data = tmp_path / "code.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 400)
    argv = ["client", "--coordinator", "127.0.0.1:1", "--device", "cpu", "--data", str(data)]
    cfg = RunConfig(seq_len=SEQ_LEN, batch_size=BATCH)
    for flag, expected in (([], False), (["--gradient-checkpointing"], True)):
        daemon = FederatedRole(ClientSettings.from_args(build_parser(only="client").parse_args(argv + flag)))
        daemon.setup(cfg)   # what the session calls after the first join
        blocks = daemon.trainer.model.transformer.h
        assert [b.gradient_checkpointing for b in blocks] == [expected] * len(blocks)
    # and it trains: a round with checkpointing on
    result = daemon.trainer.train_round(trainable_state(daemon.trainer.model), local_steps=1)
    assert math.isfinite(result.train_loss)
