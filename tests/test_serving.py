"""The aio service under load, with real processes: idle upload streams cost no worker (Status and Heartbeat
stay fast, the streams are cut at the first-message deadline), 200 long-polling sessions stay members while a
round commits, and the standard gRPC health service answers SERVING on the same port. In-process: the upload
stream bridge's deadlines and replacement, and how peers are grouped into addresses."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals, wire
from fedswarm.coordinator.admission import peer_address
from fedswarm.proto.refusals import Refused
from fedswarm.coordinator.serving import ServingLimits, StreamBridge
from fedswarm.sim.processes import coordinator_process, fetch_status

SMALL = ["--rounds", "1", "--local-steps", "1", "--seq-len", "32", "--batch-size", "2", "--upload-codec", "int8"]
OPTIONS = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
           ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096)]
IDLE_STREAMS = 64


async def _timed(call) -> float:
    started = time.monotonic()
    await call
    return time.monotonic() - started


@pytest.mark.timeout(180)
@pytest.mark.slow   # test_lockout.py floods a coordinator with small limits the same way, in less time
@pytest.mark.parametrize("idle", [IDLE_STREAMS, 1000])
def test_idle_upload_streams_leave_status_and_heartbeat_fast(tmp_path, idle):
    """`idle` PushUpdate streams that never send a byte, from a caller without a session, over connections of
    their own, against the default limits: Status, Heartbeat and Health keep answering within 1 s; every stream
    is cut with its reason (at most ServingLimits.max_waiting_per_address wait for their header, the rest are
    refused after the grace as busy_connection or busy_address)."""
    args = ["--state-dir", str(tmp_path / "state"), "--min-clients", "5", *SMALL]
    own_connection = [*OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    with coordinator_process(tmp_path, args) as (coord, address):
        async def scenario():
            async with grpc.aio.insecure_channel(address, options=own_connection) as channel:
                stub = pb_grpc.CoordinatorStub(channel)
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                joined = await stub.Join(pb.JoinRequest(name="beater", device="cpu", precision="fp32"), timeout=10)
                beat = pb.HeartbeatRequest(client_id=joined.client_id, session_token=joined.session_token)

                silence = asyncio.Event()

                async def never_sends():
                    await silence.wait()
                    yield b""
                idlers = [grpc.aio.insecure_channel(address, options=own_connection)
                          for _ in range((idle + 99) // 100)]   # 100 streams per connection
                streams = [idlers[i // 100].stream_unary("/fedswarm.Coordinator/PushUpdate")(never_sends(), timeout=60)
                           for i in range(idle)]
                latencies, window_end = [], time.monotonic() + 4.0   # well inside the 10 s first-message deadline
                while time.monotonic() < window_end:
                    latencies.append(await _timed(stub.Status(pb.StatusRequest(), timeout=5)))
                    latencies.append(await _timed(stub.Heartbeat(beat, timeout=5)))
                    latencies.append(await _timed(health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="fedswarm.Coordinator"), timeout=5)))
                assert max(latencies) < 1.0, sorted(latencies)[-5:]
                codes = collections.Counter()
                for call in streams:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    codes[(err.value.code(), refusals.reason(err.value))] += 1
                silence.set()
                for ch in idlers:
                    await ch.close()
                return codes
        codes = asyncio.run(scenario())
        waited = codes.pop((grpc.StatusCode.DEADLINE_EXCEEDED, "slow_header"), 0)
        busy = {r: codes.pop((grpc.StatusCode.RESOURCE_EXHAUSTED, r), 0) for r in ("busy_connection", "busy_address")}
        limits = ServingLimits()
        assert not codes and waited + sum(busy.values()) == idle, (waited, busy, codes)
        assert waited == min(idle, limits.max_waiting_per_address), (waited, busy)   # 100 per connection: 64 wait
        status = fetch_status(address)
        assert status["rejections"].get("slow_header", 0) == waited
        assert all(status["rejections"].get(r, 0) == n for r, n in busy.items()), (status["rejections"], busy)
        assert [c["name"] for c in status["clients"]] == ["beater"]
        assert coord.popen.poll() is None


SESSIONS = 200


async def _session(stub, i: int, stop: asyncio.Event, stats: dict) -> None:
    """Join, heartbeat every 2 s, long-poll; session 0 answers its train task with a small update."""
    joined = await stub.Join(pb.JoinRequest(name=f"light-{i}", device="cpu", precision="fp32"), timeout=30)
    cid, token = joined.client_id, joined.session_token

    async def beat():
        while not stop.is_set():
            started = time.monotonic()
            await stub.Heartbeat(pb.HeartbeatRequest(client_id=cid, session_token=token), timeout=30)
            stats["heartbeat"].append(time.monotonic() - started)
            try:
                await asyncio.wait_for(stop.wait(), 2.0)
            except asyncio.TimeoutError:
                pass
    beating = asyncio.create_task(beat())
    try:
        while not stop.is_set():
            task = await stub.PullTask(pb.PullTaskRequest(client_id=cid, session_token=token, wait_s=5), timeout=30)
            if task.kind == pb.TASK_DONE:
                break
            if task.kind == pb.TASK_TRAIN and i == 0:
                await _answer(stub, joined, task)
    finally:
        await beating


async def _answer(stub, joined, task) -> None:
    cid, token = joined.client_id, joined.session_token
    shapes = {}
    async for chunk in stub.FetchModel(pb.FetchModelRequest(client_id=cid, session_token=token, task_id=task.task_id),
                                       timeout=60):
        shapes[chunk.part.name] = tuple(chunk.part.shape)
    codec = C.codec_by_name(json.loads(joined.run_config_json)["upload_codec"])

    def encode():  # off the test's event loop, which carries every session's heartbeats
        return [p for name, shape in shapes.items()
                for p in wire.tensor_parts(name, shape, C.encode(torch.full((torch.Size(shape).numel(),), 1e-3), codec))]
    parts = await asyncio.to_thread(encode)
    header = pb.UpdateHeader(client_id=cid, session_token=token, task_id=task.task_id, round=task.round,
                             num_examples=2, train_loss=3.0, num_tensors=len(shapes), num_parts=len(parts))
    chunks = [pb.UpdateChunk(header=header)] + [pb.UpdateChunk(part=p) for p in parts]
    assert (await stub.PushUpdate(iter(chunks), timeout=60)).accepted


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_200_sessions_stay_members_while_a_round_commits(tmp_path):
    """Every session long-polls; all get a task (FedAvg samples everyone), one answers; the round commits at
    its timeout with one reply, and no session loses its lease meanwhile (every heartbeat answered)."""
    args = ["--state-dir", str(tmp_path / "state"), "--min-clients", str(SESSIONS), "--round-timeout", "14",
            "--lease", "8",   # the round outlasts a lease: only answered heartbeats keep the sessions
            *SMALL]
    with coordinator_process(tmp_path, args) as (coord, address):
        stats: dict = {"heartbeat": [], "status": [], "members": []}

        async def scenario():
            async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
                stub = pb_grpc.CoordinatorStub(channel)
                stop = asyncio.Event()
                sessions = [asyncio.create_task(_session(stub, i, stop, stats)) for i in range(SESSIONS)]
                deadline = time.monotonic() + 150
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    status = json.loads((await stub.Status(pb.StatusRequest(), timeout=10)).json)
                    stats["status"].append(time.monotonic() - started)
                    if status["state"] != "waiting":
                        stats["members"].append(len(status["clients"]))
                    if status["round"] >= 1:
                        stats["final"] = status
                        break
                    await asyncio.sleep(0.5)
                stop.set()
                for session in asyncio.as_completed(sessions):
                    try:
                        await session
                    except grpc.aio.AioRpcError as err:
                        pytest.fail(f"a session failed: {err.code()} {err.details()}")
        asyncio.run(scenario())
        final = stats.get("final")
        assert final is not None, f"round 1 never committed; members seen {stats['members'][-5:]}"
        assert final["rounds"][-1]["clients"] == ["light-0"]
        assert stats["members"] and min(stats["members"]) == SESSIONS, stats["members"]
        assert "lost its lease" not in coord.output()
        assert len(stats["heartbeat"]) >= SESSIONS   # latency figures belong to the load benchmark, not here


@contextlib.contextmanager
def _loop_thread():
    """An asyncio loop running in its own thread, as the server's is beside its upload workers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def _drip(every_s: float, count: int = 10**6):
    for i in range(count):
        await asyncio.sleep(every_s)
        yield b"part-%d" % i
    await asyncio.Event().wait()   # then silence


def _drain(bridge: StreamBridge) -> tuple[list, Refused | None, float]:
    got, started = [], time.monotonic()
    try:
        for item in bridge:
            got.append(item)
    except Refused as err:
        return got, err, time.monotonic() - started
    return got, None, time.monotonic() - started


def test_stream_bridge_cuts_a_dripping_upload_at_its_whole_deadline():
    with _loop_thread() as loop:
        requests = _drip(0.05)
        bridge = StreamBridge(b"header", requests, loop, idle_s=1.0, total_s=0.4)
        got, err, took = _drain(bridge)
    assert err is not None and err.reason == "upload_deadline" and err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got[0] == b"header" and len(got) >= 3 and 0.35 < took < 2.0, (len(got), took)


def test_stream_bridge_cuts_a_silent_upload_at_its_chunk_deadline():
    with _loop_thread() as loop:
        got, err, took = _drain(StreamBridge(b"header", _drip(0.01, count=2), loop, idle_s=0.3, total_s=60))
    assert err is not None and err.reason == "slow_upload" and got == [b"header", b"part-0", b"part-1"]
    assert 0.25 < took < 2.0, took


def test_stream_bridge_refused_from_the_loop_frees_its_worker_at_once():
    """What a newer upload of the same task does to the older: the worker waiting for a chunk raises at once."""
    replaced = Refused(grpc.StatusCode.ABORTED, "upload_replaced", "a newer upload replaced this one")
    with _loop_thread() as loop:
        bridge = StreamBridge(b"header", _drip(3600), loop, idle_s=30, total_s=60)
        loop.call_later(0.2, bridge.refuse, replaced)
        got, err, took = _drain(bridge)
    assert err is replaced and got == [b"header"] and took < 2.0, took


@pytest.mark.parametrize("peer, address", [
    ("ipv4:10.0.0.3:5123", "10.0.0.3"), ("ipv6:[::1]:5123", "::/64"), ("ipv6:%5B::1%5D:5123", "::/64"),
    ("ipv6:%5B2001:db8::5%5D:80", "2001:db8::/64"),   # as grpc writes them, brackets URL-encoded
    ("ipv6:[2001:db8:1:2:aaaa::7]:443", "2001:db8:1:2::/64"), ("ipv6:[::ffff:192.0.2.9]:80", "192.0.2.9"),
    ("unix:/tmp/sock", "unix:/tmp/sock")])
def test_peer_address_groups_ipv6_by_its_64(peer, address):
    assert peer_address(peer) == address
