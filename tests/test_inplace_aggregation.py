"""The coordinator's in-place paths give the same bits as the whole-tensor formulas they replace: a fold of an
upload decoded part by part, a mean finished in its running sum's buffers, FedAvgM's and DiLoCo's server steps
computed in the mean's buffers, and served steps encoded and applied a piece at a time (in memory or on disk)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedswarm.client.daemon import reconstruct
from fedswarm.coordinator.aggregate import MeanFold, TensorArray, read_only_view
from fedswarm.coordinator.downloads import ServedVersions, model_chunks
from fedswarm.coordinator.server_steps import momentum_sgd, nesterov
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import topk as T
from fedswarm.proto import wire

SHAPES = {"emb": (300, 64), "w": (64, 64), "b": (64,)}


def state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s, generator=g) for n, s in SHAPES.items()}


def record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({n: Array(t.numpy()) for n, t in tensors.items()})


def values(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {n: np.array(a.numpy()) for n, a in arrays.items()}


def encoded_upload(delta: dict[str, torch.Tensor]) -> wire.DecodeOnRead:
    """An int8 upload as the service holds it: validated parts, several per tensor, decoded on read."""
    spec = C.CodecSpec(C.CODEC_NAMES["int8"])
    assembler = wire.PartAssembler({n: tuple(t.shape) for n, t in delta.items()}, {spec}, keep_encoded=True)
    for part in wire.state_parts(delta, lambda n, t: spec.encode(t.flatten()), max_part_bytes=2048):
        assembler.add(pb.TensorPart.FromString(part.SerializeToString()))
    return assembler.finish()


def test_a_fold_of_parts_and_its_mean_in_place_are_the_whole_tensor_bits():
    base, weights = state(0), {"a": 3.0, "b": 40.0}
    uploads = {k: encoded_upload(state(i + 1, 0.1)) for i, k in enumerate(weights)}
    piecewise, whole = MeanFold(record(base)), MeanFold(record(base))
    for k, w in weights.items():
        piecewise.add(k, uploads[k], w)
        whole.add(k, {n: uploads[k][n] for n in SHAPES}, w)   # each tensor decoded whole
    got, reference, total = piecewise.mean(weights), whole.mean(weights), sum(weights.values())
    for n in SHAPES:
        assert isinstance(got[n], TensorArray) and not got[n].numpy().flags.writeable
        np.testing.assert_array_equal(got[n].numpy(), reference[n].numpy())
        expected = base[n] + sum(w * uploads[k][n] for k, w in weights.items()) / total
        np.testing.assert_allclose(got[n].numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
        serialized = Array(dtype=got[n].dtype, shape=tuple(got[n].shape), stype=got[n].stype, data=got[n].data)
        np.testing.assert_array_equal(serialized.numpy(), got[n].numpy())   # Flower's form, built on demand
        assert read_only_view(got[n]) is got[n].tensor


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_fedavgm_step_in_place_is_flowers_formula_bit_for_bit(mu):
    lr, current, momentum, ref_current, ref_momentum = 0.7, record(state(0)), None, values(record(state(0))), None
    for rnd in range(1, 4):
        mean = {n: t.numpy() for n, t in state(rnd).items()}
        pg = [ref_current[n] - mean[n] for n in SHAPES]   # flwr FedAvgM.aggregate_train, array by array
        if mu > 0.0:
            ref_momentum = pg if ref_momentum is None else [mu * mv + g for mv, g in zip(ref_momentum, pg)]
            pg = ref_momentum
        ref_current = {n: np.asarray(ref_current[n] - lr * g) for n, g in zip(SHAPES, pg)}
        current, momentum = momentum_sgd(current, record(state(rnd)), lr, mu, momentum)
        for n in SHAPES:
            np.testing.assert_array_equal(current[n].numpy(), ref_current[n])
    assert (momentum is None) == (mu == 0.0)


def test_diloco_step_in_place_is_the_nesterov_formula_bit_for_bit():
    lr, mu, current, momentum = 0.7, 0.9, record(state(0)), None
    ref_current, ref_momentum = values(record(state(0))), None
    for rnd in range(1, 4):
        new_momentum, out = [], {}
        for i, n in enumerate(SHAPES):   # DiLoCo.aggregate_train before the in-place step
            old = ref_current[n]
            grad = old - state(rnd)[n].numpy()
            m = grad if ref_momentum is None else mu * ref_momentum[i] + grad
            new_momentum.append(m)
            out[n] = np.asarray(old - lr * (grad + mu * m), dtype=old.dtype)
        ref_current, ref_momentum = out, new_momentum
        current, momentum = nesterov(current, record(state(rnd)), lr, mu, momentum)
        for i, n in enumerate(SHAPES):
            np.testing.assert_array_equal(current[n].numpy(), ref_current[n])
            np.testing.assert_array_equal(momentum[i], ref_momentum[i])


SPECS = {"int8": C.CodecSpec(C.CODEC_NAMES["int8"]), "int4": C.CodecSpec(C.CODEC_NAMES["int4"]),
         "fp16": C.CodecSpec(C.CODEC_NAMES["fp16"]),
         "topk": C.CodecSpec(C.CODEC_NAMES["topk"], 1024, T.k_for(1024, 1 / 16), T.DEFAULT_BITS)}


@pytest.mark.parametrize("persist", [False, True], ids=["memory", "file"])
@pytest.mark.parametrize("codec", list(SPECS))
def test_served_steps_made_a_piece_at_a_time_are_the_whole_tensor_bytes(codec, persist, tmp_path):
    spec = SPECS[codec]
    pieces = ServedVersions(spec, keep=4, persist=tmp_path / "served.safetensors" if persist else None)
    block = spec.encode(torch.zeros(0)).block_size
    pieces.piece = 4 * block if block else 1000   # several pieces per tensor
    whole = ServedVersions(spec, keep=4)    # each tensor here is one piece of PIECE values
    assert pieces.piece < 300 * 64 <= whole.piece
    walk = [state(0)] + [{n: t + 0.01 * state(v)[n] for n, t in state(0).items()} for v in range(1, 4)]
    held = reconstruct([pb.ModelChunk.FromString(c.SerializeToString())
                        for c in model_chunks(pieces.served(0, walk[0]), None, 8192)], None, spec)
    whole.served(0, walk[0])
    for v in range(1, 4):
        got, ref = pieces.served(v, walk[v]), whole.served(v, walk[v])
        assert got.digest == ref.digest and got.step_bytes == ref.step_bytes
        assert all(got.step[n] == ref.step[n] for n in SHAPES), "the same encoded bytes as encoding whole"
        assert list(got.step) == list(SHAPES), "steps stream in the model's order"
        steps = pieces.chain(v, held.version, held.digest)
        held = reconstruct([pb.ModelChunk.FromString(c.SerializeToString())
                            for c in model_chunks(got, steps, 8192)], held, spec)
        assert held.digest == got.digest, "the client holds the coordinator's served bits"
