"""Delta downloads: the coordinator's as-served states (coordinator/downloads.py) against the client's
reconstruction (client/daemon.py reconstruct), over the real proto messages; and one real run."""
from __future__ import annotations

import argparse

import pytest
import torch

from fedswarm.client.daemon import DigestMismatch, Held, reconstruct
from fedswarm.coordinator import downloads
from fedswarm.coordinator.downloads import ServedVersions, model_chunks
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.sim.launcher import add_arguments as add_sim_arguments
from fedswarm.sim.launcher import run_sim
from fedswarm.sim.report import allreduce_bytes

SHAPES = {"w": (300, 70), "b": (70,), "emb": (1000, 16)}


def random_walk(versions: int, seed: int = 0, step: float = 1e-2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    walk = [state]
    for _ in range(versions - 1):
        state = {n: t + step * torch.randn(t.shape, generator=g) for n, t in state.items()}
        walk.append(state)
    return walk


def over_the_wire(served, steps, max_part_bytes: int = 8192) -> list[pb.ModelChunk]:
    """Serialize and parse every chunk, as gRPC does."""
    return [pb.ModelChunk.FromString(c.SerializeToString()) for c in model_chunks(served, steps, max_part_bytes)]


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("codec", ["int8", "int4", "fp16", "bf16", "int2z"])
def test_client_reconstructs_the_served_bits_along_the_chain(codec):
    cid = C.codec_by_name(codec)
    versions = ServedVersions(cid, keep=3)
    walk = random_walk(6)
    first = versions.served(0, walk[0])
    held = reconstruct(over_the_wire(first, None), None, cid)          # no version yet: a full copy
    assert identical(held.state, walk[0]) and held.steps == 0 and held.digest == first.digest
    full_bytes = sum(c.ByteSize() for c in over_the_wire(first, None))
    levels = {"int8": 127, "int4": 7, "fp16": 2 ** 10, "bf16": 2 ** 7, "int2z": 2}[codec]
    for v in range(1, 6):
        delta = max(float((walk[v][n] - held.state[n]).abs().max()) for n in SHAPES)  # G_v - S_{v-1}
        served = versions.served(v, walk[v])
        steps = versions.chain(v, held.version, held.digest)
        assert steps is not None and [s.version for s in steps] == [v]
        chunks = over_the_wire(served, steps)
        held = reconstruct(chunks, held, cid)
        assert held.version == v and held.steps == 1
        assert identical(held.state, served.state), "client and coordinator must hold the same bits"
        assert wire.state_digest(held.state) == served.digest
        ratio = sum(c.ByteSize() for c in chunks) / full_bytes
        assert ratio <= {"int8": 0.26, "int4": 0.14, "fp16": 0.51, "bf16": 0.51, "int2z": 0.06}[codec], ratio
        # server-side error feedback: S stays within half a quantization step of G; errors do not add up
        err = max(float((served.state[n] - walk[v][n]).abs().max()) for n in SHAPES)
        assert err <= delta / (2 * levels) * 1.01 + 1e-6, (err, delta)
    # a late joiner gets a full float32 copy of the same as-served state, not of G
    late = reconstruct(over_the_wire(versions.served(5, walk[5]), None), None, cid)
    assert identical(late.state, held.state) and not identical(late.state, walk[5])


def test_int2z_steps_encoded_a_piece_at_a_time_in_memory_or_on_disk(tmp_path, monkeypatch):
    """A step encoded in pieces is joined into one encoding (int2z: its magnitude planes deflated together)
    and cut into parts again: the client holds the served bits either way."""
    monkeypatch.setattr(downloads, "PIECE", 4096)   # 21,000 values: 6 pieces of 4 blocks
    cid = C.codec_by_name("int2z")
    walk = random_walk(3, seed=1)
    disk, memory = ServedVersions(cid, persist=tmp_path / "served.safetensors"), ServedVersions(cid)
    held = reconstruct(over_the_wire(memory.served(0, walk[0]), None), None, cid)
    disk.served(0, walk[0])
    for v in (1, 2):
        on_disk, in_memory = disk.served(v, walk[v]), memory.served(v, walk[v])
        assert on_disk.digest == in_memory.digest and on_disk.step_bytes == in_memory.step_bytes
        assert on_disk.step["w"] == in_memory.step["w"] == C.encode((walk[v]["w"] - held.state["w"]).flatten(), cid)
        chunks = over_the_wire(on_disk, disk.chain(v, held.version, held.digest), max_part_bytes=1024)
        held = reconstruct(chunks, held, cid)
        assert held.digest == on_disk.digest and len(chunks) > 10


def test_chain_over_skipped_versions_eviction_and_wrong_digest():
    cid = C.codec_by_name("int8")
    versions = ServedVersions(cid, keep=3)
    walk = random_walk(6)
    held = None
    for v in range(3):
        served = versions.served(v, walk[v])
        held = held or Held(0, served.state, served.digest)   # the client stops at version 0
    assert versions.chain(2, 0, held.digest) is not None
    steps = versions.chain(2, 0, held.digest)
    assert [s.version for s in steps] == [1, 2]                       # a client that skipped a round
    got = reconstruct(over_the_wire(served, steps), held, cid)
    assert identical(got.state, served.state) and got.steps == 2
    assert versions.chain(2, 0, b"\0" * 32) is None                   # not what we served: full copy
    for v in range(3, 6):
        versions.served(v, walk[v])
    assert versions.chain(5, 0, held.digest) is None                  # evicted: full copy
    assert versions.chain(5, 2, served.digest) is None                # evicted as well (keep=3: 3, 4, 5)
    assert versions.chain(5, 3, versions.digest(3)) is not None
    assert versions.served(5, walk[5]).state is not None
    with pytest.raises(RuntimeError, match="older"):
        versions.served(4, walk[4])                                 # only the newest state is kept


def test_only_steps_a_chain_can_serve_are_kept():
    """A chain is served only while it is smaller than a full copy, so a step older than that is dropped at
    once (eight int8 steps of a 124M model held twice its fp32 size): int8 keeps 3, int4 about 7."""
    walk = random_walk(9)
    for codec, kept in (("int8", 3), ("int4", 7)):
        versions = ServedVersions(C.codec_by_name(codec), keep=8)
        for v in range(9):
            versions.served(v, walk[v])
        with_steps = [v for v in range(1, 9) if versions._versions.get(v) and versions._versions[v].step]
        assert with_steps == list(range(9 - kept, 9)), (codec, with_steps)
        assert versions.chain(8, 8 - kept, versions.digest(8 - kept)) is not None
        assert versions.chain(8, 7 - kept, versions.digest(7 - kept)) is None   # a full copy, as before


def test_tampered_delta_is_caught_by_the_digest():
    cid = C.codec_by_name("int8")
    versions = ServedVersions(cid)
    walk = random_walk(2)
    held = reconstruct(over_the_wire(versions.served(0, walk[0]), None), None, cid)
    chunks = over_the_wire(versions.served(1, walk[1]), versions.chain(1, 0, held.digest))
    part = chunks[-1].part
    part.data = bytes([part.data[0] ^ 1]) + part.data[1:]
    with pytest.raises(DigestMismatch, match="version 1"):
        reconstruct(chunks, held, cid)
    with pytest.raises(wire.WireError, match="holds no version"):
        reconstruct(chunks, None, cid)


def test_codec_none_serves_the_global_itself():
    versions = ServedVersions(C.codec_by_name("none"))
    walk = random_walk(2)
    versions.served(0, walk[0])
    served = versions.served(1, walk[1])
    assert identical(served.state, walk[1]) and served.digest == wire.state_digest(walk[1])
    assert versions.chain(1, 0, versions.digest(0)) is None


def test_restart_keeps_the_served_state(tmp_path):
    cid = C.codec_by_name("int4")
    walk = random_walk(4)
    first = ServedVersions(cid, persist=tmp_path / "served.safetensors")
    for v in range(3):
        before = first.served(v, walk[v])
    again = ServedVersions(cid, persist=tmp_path / "served.safetensors")
    assert again.digest(2) == before.digest
    assert identical(again.served(2, walk[2]).state, before.state)
    # the next version continues the chain exactly as the first coordinator would have
    assert identical(again.served(3, walk[3]).state, first.served(3, walk[3]).state)
    other_codec = ServedVersions(C.codec_by_name("int8"), persist=tmp_path / "served.safetensors")
    assert other_codec.digest(2) is None


def sim_args(out, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    return parser.parse_args(["--out", str(out), "--quiet", "--precision", "fp32", *argv])


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_int8_delta_downloads_in_a_real_run(tmp_path):
    from fedswarm.sim.report import allreduce_bytes
    from fedswarm.app.testing import sim_args


    report = run_sim(sim_args(tmp_path, "--clients", "2", "--rounds", "3", "--local-steps", "3",
                              "--download-codec", "int8", "--seq-len", "32", "--batch-size", "4"), log=lambda *_: None)
    rounds = report["rounds"]
    assert report["rejections"] == {}, "no upload refused for a wrong base digest"
    first = rounds[1]   # the clients built version 0 from the run's seed: the coordinator agrees, sends nothing
    assert first["bytes_down"] == 0 and first["bytes_down_raw"] > 0
    for r in rounds[2:]:
        assert r["bytes_down_raw"] == first["bytes_down_raw"]
        assert 0 < r["bytes_down"] <= 0.26 * r["bytes_down_raw"], r   # int8 deltas vs float32 copies
        assert r["tokens"] == 2 * 3 * 4 * 32
    # a client whose digest did not match would have fetched a full copy: bytes_down near bytes_down_raw above
    comm = report["communication"]
    assert comm["tokens"] == 3 * 2 * 3 * 4 * 32 and comm["workers"] == 2
    assert comm["socket_bytes_down"] >= comm["model_bytes_down"] > 0
    assert comm["allreduce_fp32_bytes"] == allreduce_bytes(comm["tokens"], 2, comm["parameters"], 4 * 32)
    assert comm["allreduce_over_socket"] == pytest.approx(
        comm["allreduce_fp32_bytes"] / (comm["socket_bytes_up"] + comm["socket_bytes_down"]), rel=1e-2)
    assert [r["socket_down"] for r in rounds] == sorted(r["socket_down"] for r in rounds)


def test_allreduce_bytes_formula():
    # 4 workers, 1M parameters, 10 steps of 1,000 tokens each per worker: 10 x 4 x 2 x 3/4 x 4 MB
    assert allreduce_bytes(40_000, 4, 1_000_000, 1_000) == 10 * 4 * 2 * 3 // 4 * 4_000_000
    assert allreduce_bytes(40_000, 1, 1_000_000, 1_000) == 0


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_fetch_model_over_grpc_full_copy_deltas_or_nothing(tmp_path):
    """A hand-driven client on a real coordinator: no version -> a float32 copy; the initial model it built
    itself -> nothing; a wrong digest -> a float32 copy again."""
    import grpc

    from fedswarm.models import build_model, trainable_state
    from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
    from fedswarm.sim.processes import coordinator_process

    args = ["--state-dir", str(tmp_path / "state"), "--rounds", "1", "--min-clients", "1", "--local-steps", "1",
            "--download-codec", "int8", "--seq-len", "32", "--batch-size", "4"]
    initial = trainable_state(build_model("gpt2-tiny", seed=0))
    with coordinator_process(tmp_path, args) as (_, address), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        joined = stub.Join(pb.JoinRequest(name="by-hand", device="cpu", precision="fp32"), timeout=30)
        session = dict(client_id=joined.client_id, session_token=joined.session_token)
        task = stub.PullTask(pb.PullTaskRequest(wait_s=30, **session), timeout=60)
        assert task.kind == pb.TASK_TRAIN

        def fetch(**held):
            return list(stub.FetchModel(pb.FetchModelRequest(task_id=task.task_id, **session, **held), timeout=60))

        full = fetch()
        got = reconstruct(full, None, C.CODEC_NAMES["int8"])
        assert not any(c.delta for c in full) and full[0].version == 0 and full[0].digest == got.digest
        assert identical(got.state, initial)
        assert sum(c.ByteSize() for c in full) >= 4 * sum(t.numel() for t in initial.values())
        assert fetch(has_version=True, held_version=0, held_digest=wire.state_digest(initial)) == []
        wrong = fetch(has_version=True, held_version=0, held_digest=b"\1" * 32)
        assert identical(reconstruct(wrong, None, C.CODEC_NAMES["int8"]).state, initial)
        stale = fetch(has_version=True, held_version=7, held_digest=got.digest)   # a version it cannot have
        assert not any(c.delta for c in stale) and len(stale) == len(full)
