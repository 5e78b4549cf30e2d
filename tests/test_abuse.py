"""Abuse control with real processes: one live session per key (sybils), FedAvg weights computed by the
coordinator (a client's num_examples=1e9 gains nothing), --clip-update-norm, and a join proof replayed
after a coordinator restart. Each is refused (or neutralized) and counted."""
from __future__ import annotations

import math

import grpc
import pytest
import torch

from fedswarm.client.identity import Identity, signed_join_fields
from fedswarm.coordinator.store import Store
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals, wire
from fedswarm.sim.processes import coordinator_process, fetch_status, run_fedswarm, wait_until

SMALL = ["--rounds", "1", "--local-steps", "1", "--seq-len", "32", "--batch-size", "2"]
OPTIONS = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
           ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096)]


def _refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), refusals.reason(err.value)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_one_session_per_key_and_no_join_replay_after_restart(tmp_path):
    assert run_fedswarm("keygen", str(tmp_path / "keys"), "--clients", "1").returncode == 0
    key = tmp_path / "keys" / "client-0.key"
    ident = Identity.load(key)
    args = ["--authorized-keys", str(tmp_path / "keys" / "authorized_keys"), "--state-dir", str(tmp_path / "state"),
            "--min-clients", "3", *SMALL]
    with coordinator_process(tmp_path, args, name="coordinator-1") as (coord, address):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)

            def join(name: str) -> pb.JoinReply:
                proof = signed_join_fields(stub, ident, name)
                return stub.Join(pb.JoinRequest(name=name, device="cpu", precision="fp32", **proof), timeout=10)
            sybils = [join(f"sybil-{i}") for i in range(3)]   # one key trying to fill --min-clients 3
            status = fetch_status(address, key=key)
            assert [c["name"] for c in status["clients"]] == ["sybil-2"]
            assert status["rejections"]["replaced_session"] == 2
            assert status["state"] == "waiting", "three sessions of one key must not start a round"
            for old in sybils[:2]:
                beat = pb.HeartbeatRequest(client_id=old.client_id, session_token=old.session_token)
                assert _refusal(lambda: stub.Heartbeat(beat, timeout=10)) == \
                    (grpc.StatusCode.UNAUTHENTICATED, "session_replaced")
            # A proof recorded now (never used here) ...
            recorded = pb.JoinRequest(name="replayer", device="cpu", precision="fp32",
                                      **signed_join_fields(stub, ident, "replayer"))
    # ... is refused by the restarted coordinator (same state dir, same run): it signs the old process's challenge.
    with coordinator_process(tmp_path, args, name="coordinator-2") as (coord, address):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            assert _refusal(lambda: stub.Join(recorded, timeout=10)) == \
                (grpc.StatusCode.UNAUTHENTICATED, "stale_challenge")
        status = fetch_status(address, key=key)
        assert status["rejections"]["stale_challenge"] == 1
        assert status["clients"] == []


def _upload(stub, joined: pb.JoinReply, task: pb.Task, delta_of, num_examples: int) -> pb.PushReply:
    cid, token = joined.client_id, joined.session_token
    shapes = {c.part.name: tuple(c.part.shape) for c in stub.FetchModel(
        pb.FetchModelRequest(client_id=cid, session_token=token, task_id=task.task_id), timeout=60)}
    codec = C.codec_by_name("none")
    parts = [p for name, shape in shapes.items()
             for p in wire.tensor_parts(name, shape, C.encode(delta_of(name, shape).flatten(), codec))]
    header = pb.UpdateHeader(client_id=cid, session_token=token, task_id=task.task_id, round=task.round,
                             num_examples=num_examples, train_loss=1.0, num_tensors=len(shapes), num_parts=len(parts))
    chunks = [pb.UpdateChunk(header=header)] + [pb.UpdateChunk(part=p) for p in parts]
    return stub.PushUpdate(iter(chunks), timeout=60)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_weights_come_from_the_task_and_updates_are_clipped(tmp_path):
    """A claims 1e9 examples and sends a huge delta; B claims 1 and sends none. With weights from the tasks
    (equal) and the clip at 1.0, the global model moves by exactly 0.5 in A's direction."""
    state = tmp_path / "state"
    args = ["--state-dir", str(state), "--min-clients", "2", "--upload-codec", "none", "--clip-update-norm", "1.0",
            *SMALL]
    gen = torch.Generator().manual_seed(3)
    direction: dict[str, torch.Tensor] = {}

    def big(name, shape):
        direction[name] = torch.randn(shape, generator=gen)
        return direction[name] * 10.0

    with coordinator_process(tmp_path, args) as (coord, address):
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            joins = [stub.Join(pb.JoinRequest(name=n, device="cpu", precision="fp32"), timeout=10) for n in "AB"]

            def pull(j):
                task = stub.PullTask(pb.PullTaskRequest(client_id=j.client_id, session_token=j.session_token,
                                                        wait_s=5), timeout=30)
                return task.kind == pb.TASK_TRAIN and task
            tasks = [wait_until("a train task", lambda j=j: pull(j), 120, [coord]) for j in joins]
            assert _upload(stub, joins[0], tasks[0], big, num_examples=10**9).accepted
            assert _upload(stub, joins[1], tasks[1], lambda n, s: torch.zeros(s), num_examples=1).accepted
            status = wait_until("round 1", lambda: (s := fetch_status(address))["round"] == 1 and s, 120, [coord])
            assert status["clipped_updates"] == 1
    store = Store(state)
    try:
        before, after = store.load_checkpoint(0), store.load_checkpoint(1)
    finally:
        store.close()
    moved = {k: after[k].double() - before[k].double() for k in direction}
    norm = math.sqrt(sum(float((m ** 2).sum()) for m in moved.values()))
    assert norm == pytest.approx(0.5, rel=1e-3), norm     # client-given weights would give ~1.0 (clipped) or ~10
    d_norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in direction.values()))
    cosine = sum(float((moved[k] * direction[k].double()).sum()) for k in moved) / (norm * d_norm)
    assert cosine == pytest.approx(1.0, abs=1e-4)
