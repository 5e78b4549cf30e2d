"""Random bytes and mutated valid messages on every RPC: a clear status, never UNKNOWN/INTERNAL,
the coordinator keeps serving and the global model does not move."""
from __future__ import annotations

import json
import random

import grpc
import pytest
import torch

from fedswarm.client.identity import Identity, signed_join_fields, status_request
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import wire
from fedswarm.sim.processes import coordinator_process, fetch_status, run_fedswarm

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
UNARY = ["Join", "Heartbeat", "PullTask", "Status", "Challenge"]
CASES = 120
# the updates mutated are int2z: mutated zlib streams and planes reach its decoder (int8 and the others are
# fuzzed without a server in test_codec.py)
UPLOAD_CODEC = "int2z"


def _mutations(valid: bytes, rng: random.Random, n: int, first_kind: int = 0):
    """Random bytes, bit flips, truncations, extensions and splices of a valid message."""
    for i in range(first_kind, first_kind + n):
        kind = i % 5
        if kind == 0 or not valid:
            yield rng.randbytes(rng.randrange(0, 256))
        elif kind == 1:
            b = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            yield bytes(b)
        elif kind == 2:
            yield valid[:rng.randrange(len(valid))]
        elif kind == 3:
            yield valid + rng.randbytes(rng.randrange(1, 64))
        else:
            cut = rng.randrange(len(valid))
            yield valid[:cut] + rng.randbytes(rng.randrange(1, 16)) + valid[cut:]


def _code(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fuzz_every_rpc(tmp_path):
    rng = random.Random(1234)
    # Authenticated run: a mutated copy of a signed update is refused whatever byte it touches.
    assert run_fedswarm("keygen", str(tmp_path / "keys"), "--clients", "1").returncode == 0
    key = tmp_path / "keys" / "client-0.key"
    ident = Identity.load(key)
    args = ["--authorized-keys", str(tmp_path / "keys" / "authorized_keys"), "--state-dir", str(tmp_path / "state"), "--rounds", "1", "--min-clients", "1", "--local-steps", "1",
            "--seq-len", "32", "--batch-size", "2", "--upload-codec", UPLOAD_CODEC]
    with coordinator_process(tmp_path, args) as (proc, address):
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.CoordinatorStub(channel)
        raw = {m: channel.unary_unary(f"/fedswarm.Coordinator/{m}") for m in UNARY}
        raw_fetch = channel.unary_stream("/fedswarm.Coordinator/FetchModel")
        raw_push = channel.stream_unary("/fedswarm.Coordinator/PushUpdate")

        # A real session with an open task, so mutated requests reach deep validation.
        joined = stub.Join(pb.JoinRequest(name="fuzzer", device="cpu", precision="fp32",
                                          **signed_join_fields(stub, ident, "fuzzer")), timeout=10)
        task = stub.PullTask(pb.PullTaskRequest(client_id=joined.client_id, session_token=joined.session_token,
                                                wait_s=30), timeout=40)
        assert task.kind == pb.TASK_TRAIN
        fetch_req = pb.FetchModelRequest(client_id=joined.client_id, session_token=joined.session_token,
                                         task_id=task.task_id)
        base = {}
        for chunk in stub.FetchModel(fetch_req, timeout=30):
            base[chunk.part.name] = tuple(chunk.part.shape)
        codec = C.codec_by_name(json.loads(joined.run_config_json)["upload_codec"])
        parts = [p for name, shape in base.items()
                 for p in wire.tensor_parts(name, shape, C.encode(torch.full((torch.Size(shape).numel(),), 1e-3), codec))]
        header = pb.UpdateHeader(client_id=joined.client_id, session_token=joined.session_token, task_id=task.task_id,
                                 round=task.round, num_examples=2, train_loss=3.0, num_tensors=len(base),
                                 num_parts=len(parts))
        raw_parts = [pb.UpdateChunk(part=p).SerializeToString() for p in parts]
        header.signature = ident.sign_update(joined.run_id, task.round, joined.client_id, task.task_id, 2, 3.0,
                                             len(parts), raw_parts)
        valid_stream = [pb.UpdateChunk(header=header).SerializeToString()] + raw_parts

        valid = {
            "Join": pb.JoinRequest(name="x", device="cpu", precision="bf16").SerializeToString(),
            "Heartbeat": pb.HeartbeatRequest(client_id=joined.client_id, session_token=joined.session_token).SerializeToString(),
            "PullTask": pb.PullTaskRequest(client_id=joined.client_id, session_token=joined.session_token, wait_s=0).SerializeToString(),
            "Status": status_request(stub, ident).SerializeToString(),
            "Challenge": b"",
        }
        seen: dict[str, set] = {}
        for method, good in valid.items():
            for body in _mutations(good, rng, CASES):
                code = _code(lambda: raw[method](body, timeout=10))
                assert code in ALLOWED, f"{method} answered {code} to {body!r}"
                seen.setdefault(method, set()).add(code)
        for body in _mutations(fetch_req.SerializeToString(), rng, CASES):
            code = _code(lambda: list(raw_fetch(body, timeout=10)))
            assert code in ALLOWED, f"FetchModel answered {code}"
            seen.setdefault("FetchModel", set()).add(code)
        for i in range(CASES):  # mutate one chunk of the stream (header or a part), or drop/duplicate one
            stream = list(valid_stream)
            k = rng.randrange(len(stream))
            if i % 7 == 5:
                del stream[k]
            elif i % 7 == 6:
                stream.insert(k, stream[k])
            else:
                stream[k] = next(_mutations(stream[k], rng, 1, first_kind=i))
            code = _code(lambda: raw_push(iter(stream), timeout=30))
            assert code in ALLOWED - {grpc.StatusCode.OK} or stream == valid_stream, f"PushUpdate answered {code}"
            seen.setdefault("PushUpdate", set()).add(code)
        # Oversized: one message above the limit is refused by size, not parsed.
        big = b"\x0a" + b"\xff" * (wire.MAX_MESSAGE_BYTES + 10)
        assert _code(lambda: raw["Join"](big, timeout=10)) == grpc.StatusCode.RESOURCE_EXHAUSTED

        status = fetch_status(address, key=key)
        assert status["round"] == 0, "a rejected update must not change the model"
        assert sum(status["rejections"].values()) > CASES
        for method in ("Join", "Heartbeat", "PullTask", "FetchModel", "PushUpdate"):
            assert seen[method] - {grpc.StatusCode.OK}, f"{method} never refused anything"

        # Still serving: the valid update is accepted and round 1 commits.
        reply = raw_push(iter(valid_stream), timeout=30)
        assert pb.PushReply.FromString(reply).accepted
        wait = __import__("threading").Event()
        for _ in range(600):
            if fetch_status(address, key=key)["round"] == 1:
                break
            wait.wait(0.1)
        assert fetch_status(address, key=key)["round"] == 1
        assert proc.popen.poll() is None
        channel.close()
