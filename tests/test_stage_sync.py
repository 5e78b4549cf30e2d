"""A peer's stage sync, a tensor at a time (client/swarm/stage_sync.py): the same upload bytes and residuals as
the whole-state path, and no second copy of the stage: the average's buffers become the snapshot, the old
snapshot's buffers hold the progress and then the residuals."""
import pytest
import torch

from fedswarm.client import work
from fedswarm.client.swarm.stage_sync import average_tensors, carry_unsent, encode_progress
from fedswarm.coordinator.downloads import full_copy
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.app.testing import middle_stage_server


@pytest.fixture
def server():
    with middle_stage_server() as s:
        yield s


def _step(server, mb: str, seed: int) -> None:
    from fedswarm.client.swarm.tensors import to_wire

    g = torch.Generator().manual_seed(seed)
    codec = C.codec_by_name("bf16")
    req = pb.StageRequest(run_id="run", stage=1, microbatch_id=mb, hidden=to_wire(torch.randn(2, 16, 128, generator=g), codec))
    server._timed_compute(req)
    req.backward = True
    req.grad_output.CopyFrom(to_wire(torch.randn(2, 16, 128, generator=g), codec))
    server._timed_compute(req)


def _stream(state: dict[str, torch.Tensor], max_part_bytes: int = 4096) -> list[pb.ModelChunk]:
    """What the coordinator sends for a stage average: float32 copies cut into parts."""
    return [pb.ModelChunk(part=p) for p in wire.state_parts(state, full_copy, max_part_bytes)]


@pytest.mark.parametrize("codec", ["int8", "int4", "fp16", "none", "topk"])
def test_encoding_a_tensor_part_by_part_gives_the_whole_path_bytes_and_residuals(codec):
    settings = {"upload_codec": codec, "topk_density": 0.5, "topk_bits": 8}
    whole, ours = C.ErrorFeedback.for_run(settings), C.ErrorFeedback.for_run(settings)
    g = torch.Generator().manual_seed(0)
    shape = (2500, 1001)   # several 1 MiB parts, the last one short
    for _ in range(2):    # the first upload has no residual, the next one carries one
        delta = torch.randn(shape, generator=g) * 1e-3
        expected = work.encode_delta(whole, {"w": delta.clone()})
        assert encode_progress(ours, "w", delta.clone()) == expected
        assert len(expected) == wire.count_parts({"w": shape}, ours.spec) > 1
        if codec == "none":
            assert "w" not in ours.residuals and float(whole.residuals["w"].abs().max()) == 0
        else:
            assert torch.equal(ours.residuals["w"], whole.residuals["w"])


def test_with_momentum_and_decay_the_target_sent_plus_the_residual_is_the_whole_paths():
    settings = {"upload_codec": "int8", "client_momentum": 0.9, "ef_decay": 0.5}
    whole, ours = C.ErrorFeedback.for_run(settings), C.ErrorFeedback.for_run(settings)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        delta = torch.randn(64, 512, generator=g)
        sent = _decoded(encode_progress(ours, "w", delta.clone()), (64, 512))
        target = whole.compress("w", delta.clone())[0]
        assert torch.allclose(sent + ours.residuals["w"], C.decode(target).view(64, 512) + whole.residuals["w"],
                              atol=1e-5)
        assert torch.allclose(ours.momenta["w"], whole.momenta["w"], atol=1e-6)


def _decoded(raw_parts: list[bytes], shape: tuple[int, ...]) -> torch.Tensor:
    spec = {"w": shape}
    assembler = wire.PartAssembler(spec, set(C.CODEC_NAMES.values()))
    for raw in raw_parts:
        assembler.add(pb.UpdateChunk.FromString(raw).part)
    return assembler.finish()["w"]


def test_an_upload_not_applied_is_carried_whole_into_the_next_one():
    feedback = C.ErrorFeedback.for_run({"upload_codec": "int8"})
    g = torch.Generator().manual_seed(2)
    first = torch.randn(100, 300, generator=g)
    encode_progress(feedback, "w", first.clone())
    second = torch.randn(100, 300, generator=g)
    target = feedback.residuals["w"] + second
    parts = encode_progress(feedback, "w", second.clone())
    carry_unsent(feedback, parts)
    assert torch.allclose(feedback.residuals["w"], target, atol=1e-6)


def test_the_average_arrives_a_tensor_at_a_time_and_a_retry_skips_what_was_adopted(server):
    state = {n: t + 1 for n, t in server.snapshot.items()}
    spec = {n: tuple(t.shape) for n, t in state.items()}
    chunks = _stream(state)
    seen, stream = [], iter(chunks)
    for name, tensor in average_tensors(stream, spec):
        assert torch.equal(tensor, state[name])
        seen.append((name, stream.__length_hint__()))   # chunks not read yet
    assert [n for n, _ in seen] == list(state)
    assert seen[0][1] > 0 and all(a[1] > b[1] for a, b in zip(seen, seen[1:])), "tensors waited for the stream"
    skip = set(list(state)[:3])
    assert [n for n, _ in average_tensors(iter(chunks), spec, skip)] == list(state)[3:]
    with pytest.raises(wire.WireError, match="incomplete"):
        list(average_tensors(iter(chunks[:-1]), spec))


def test_a_sync_holds_no_second_copy_of_the_stage(server):
    """The average's buffers become the snapshot and the weights' source; the old snapshot's buffers hold the
    progress, which becomes the residual: after the sync, no tensor was allocated for the average, the
    progress or the residuals, and the weights are average + progress."""
    _step(server, "m1", 0)
    before = {n: t.clone() for n, t in server.snapshot.items()}
    trained = {n: p.detach().clone() for n, p in server.module.named_parameters()}
    old_snapshot = {n: t.untyped_storage().data_ptr() for n, t in server.snapshot.items()}
    average = {n: t + 0.5 for n, t in before.items()}
    spec = {n: tuple(t.shape) for n, t in average.items()}
    feedback = C.ErrorFeedback.for_run({"upload_codec": "int8"})
    server.begin_sync(1, spec)
    for name, tensor in average_tensors(iter(_stream(average)), spec):
        buffer = tensor.untyped_storage().data_ptr()
        progress = server.adopt(name, tensor).result()
        assert server.snapshot[name].untyped_storage().data_ptr() == buffer, "the average was copied"
        assert progress.untyped_storage().data_ptr() == old_snapshot[name], "the progress was allocated"
        assert torch.allclose(progress, trained[name] - before[name])
        encode_progress(feedback, name, progress)
        assert feedback.residuals[name].untyped_storage().data_ptr() == old_snapshot[name]
    assert server.end_sync() == 2 * 16
    for name, param in server.module.named_parameters():
        assert torch.allclose(param.detach(), average[name] + trained[name] - before[name])
        assert torch.equal(server.snapshot[name], param.detach())


def test_a_non_finite_tensor_of_the_average_keeps_the_replicas_own_and_is_counted(server):
    _step(server, "m1", 3)
    name = next(iter(server.snapshot))
    trained = dict(server.module.named_parameters())[name].detach().clone()
    server.begin_sync(1, list(server.snapshot))
    server.adopt(name, torch.full_like(trained, float("nan"))).result()
    assert server.refusals.snapshot() == {"non_finite_average": 1}
    assert torch.equal(dict(server.module.named_parameters())[name].detach(), trained)
    assert torch.equal(server.snapshot[name], trained)


def test_a_sync_tensor_is_adopted_before_the_requests_queued_ahead_of_it(server):
    """The coordinator's round waits on the sync: each tensor goes in at the worker's next request, not after
    every request already queued."""
    import threading

    from fedswarm.client.swarm.tensors import to_wire

    order, gate = [], threading.Event()
    server.pool.submit(gate.wait)   # the worker is busy; two requests queue behind it
    codec = C.codec_by_name("bf16")
    for mb in ("m1", "m2"):
        req = pb.StageRequest(run_id="run", stage=1, microbatch_id=mb, hidden=to_wire(torch.randn(2, 16, 128), codec))
        server.pool.submit(server._timed_compute, req).add_done_callback(lambda _f, mb=mb: order.append(mb))
    name = next(iter(server.snapshot))
    server.adopt(name, server.snapshot[name].clone()).add_done_callback(lambda _f: order.append("sync"))
    gate.set()
    server.pool.submit(lambda: None).result()
    assert order == ["sync", "m1", "m2"]


def test_the_adopter_uploads_the_progress_each_tensor_replaced(server):
    from fedswarm.client.swarm.stage_sync import Adopter

    _step(server, "m0", 4)
    progress = {n: p.detach() - server.snapshot[n] for n, p in server.module.named_parameters()}
    average = {n: t.clone() for n, t in server.snapshot.items()}
    spec = {n: tuple(t.shape) for n, t in average.items()}
    server.begin_sync(1, spec)
    adopter = Adopter(server, C.ErrorFeedback.for_run({"upload_codec": "none"}))
    for name, tensor in average_tensors(iter(_stream(average)), spec):
        adopter.add(name, tensor)
    adopter.flush()
    assert adopter.adopted == set(spec) and server.end_sync() == 2 * 16
    assert len(adopter.parts) == wire.count_parts(spec, adopter.feedback.spec)
    assert all(torch.allclose(_decoded_part_tensor(adopter.parts, n, spec[n]), progress[n]) for n in spec)


def _decoded_part_tensor(raw_parts: list[bytes], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    assembler = wire.PartAssembler({name: shape}, set(C.CODEC_NAMES.values()))
    for raw in raw_parts:
        part = pb.UpdateChunk.FromString(raw).part
        if part.name == name:
            assembler.add(part)
    return assembler.finish()[name]
