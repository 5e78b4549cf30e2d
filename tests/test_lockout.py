"""Lockout attacks on one real coordinator on loopback, scaled down through its serving-limit flags: calls that
never send their request, header-less uploads re-opened as soon as they are cut, one key dripping uploads of
one task, one session's flood of long-polls, silent connections at the open-file limit. Each is refused and
counted (the `rejections` counters match what the attacker saw) while an honest session from the same
address keeps getting Status, Heartbeat, health checks and its upload through."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import resource
import socket
import time
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedswarm.coordinator.serving import raise_open_file_limit
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals, wire
from fedswarm.sim.processes import coordinator_process, fetch_status

WAITING, PER_ADDRESS, PER_CONNECTION = 40, 16, 8
FIRST_MESSAGE_S, GRACE_S, CHUNK_S, UPLOAD_S = 1.5, 0.3, 1.5, 30.0
LIMITS = ["--max-waiting-calls", str(WAITING), "--max-waiting-per-address", str(PER_ADDRESS),
          "--max-waiting-per-connection", str(PER_CONNECTION), "--first-message-timeout", str(FIRST_MESSAGE_S),
          "--first-message-grace", str(GRACE_S), "--chunk-timeout", str(CHUNK_S), "--upload-timeout", str(UPLOAD_S),
          "--max-calls-per-session", "6", "--max-polls-per-session", "2", "--handshake-timeout", "1"]
RUN = ["--min-clients", "3", "--rounds", "3", "--local-steps", "1", "--seq-len", "32", "--batch-size", "2",
       "--upload-codec", "int8", "--eval-windows", "2", "--round-timeout", "120", "--lease", "300"]
OWN_CONNECTION = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
                  ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096),
                  ("grpc.use_local_subchannel_pool", 1)]
NAMES = ("honest", "bystander", "mallory")   # round 1 trains all three (FedAvg samples every client)
HONEST_MAX_S = 5.0   # an honest call's latency under attack, on a busy CI host (each must also succeed)
WAIT_REASONS = {"slow_request", "slow_header", "busy_connection", "busy_address", "busy"}


@dataclass
class Session:
    name: str
    client_id: int
    token: str
    task: pb.Task | None = None   # its open train task, once pulled


@dataclass
class Coordinator:
    proc: object
    address: str
    honest: Session
    bystander: Session   # another honest session (its upload answers round 1 during the drips)
    mallory: Session     # a member: one key, one session

    def rejections(self) -> collections.Counter:
        return collections.Counter(fetch_status(self.address)["rejections"])


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lockout")
    with coordinator_process(tmp, ["--state-dir", str(tmp / "state"), *RUN, *LIMITS]) as (proc, address):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            joined = [stub.Join(pb.JoinRequest(name=n, device="cpu", precision="fp32"), timeout=30)
                      for n in NAMES]
        yield Coordinator(proc, address, *[Session(n, j.client_id, j.session_token)
                                           for n, j in zip(NAMES, joined)])


def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=OWN_CONNECTION)


async def _honest_calls(address: str, who: Session, stop: asyncio.Event) -> list[float]:
    """Status, Heartbeat, Challenge and a health check in turn until `stop`; each must succeed. Latencies."""
    latencies = []
    async with _channel(address) as channel:
        stub, health = pb_grpc.CoordinatorStub(channel), health_pb2_grpc.HealthStub(channel)
        beat = pb.HeartbeatRequest(client_id=who.client_id, session_token=who.token)
        calls = [lambda: stub.Status(pb.StatusRequest(), timeout=10), lambda: stub.Heartbeat(beat, timeout=10),
                 lambda: stub.Challenge(pb.ChallengeRequest(), timeout=10),
                 lambda: health.Check(health_pb2.HealthCheckRequest(service="fedswarm.Coordinator"), timeout=10)]
        while not stop.is_set():
            for call in calls:
                started = time.monotonic()
                await call()
                latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
    return latencies


async def _silent(channel, method: str, stop: asyncio.Event, seen: collections.Counter) -> None:
    """Open a call on `method` that never sends its first message; when it is cut, open the next at once."""
    while not stop.is_set():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.stream_unary(method)(timeout=30)   # no request iterator: nothing is ever written
        seen[(err.value.code(), refusals.reason(err.value))] += 1


async def _flood(address: str, method: str, connections: int, per_connection: int, seconds: float,
                 honest: Session, during=None) -> tuple[collections.Counter, list[float], object]:
    """`connections` x `per_connection` silent calls re-opened for `seconds` beside the honest calls (and
    `during()`, awaited meanwhile); waits for every attack call to be cut."""
    stop, seen = asyncio.Event(), collections.Counter()
    channels = [_channel(address) for _ in range(connections)]
    attackers = [asyncio.create_task(_silent(ch, method, stop, seen)) for ch in channels for _ in range(per_connection)]
    honest_stop = asyncio.Event()
    prober = asyncio.create_task(_honest_calls(address, honest, honest_stop))
    await asyncio.sleep(FIRST_MESSAGE_S / 2)   # the shares are full now
    result = await during() if during else None
    await asyncio.sleep(max(0.0, seconds - FIRST_MESSAGE_S / 2))
    stop.set()
    await asyncio.gather(*attackers)
    honest_stop.set()
    latencies = await prober
    for ch in channels:
        await ch.close()
    return seen, latencies, result


def _check_counted(seen: collections.Counter, before: collections.Counter, after: collections.Counter,
                   late: str) -> None:
    reasons = collections.Counter()
    for (code, reason), n in seen.items():
        assert reason in WAIT_REASONS and code in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                   grpc.StatusCode.DEADLINE_EXCEEDED), (code, reason)
        reasons[reason] += n
    assert reasons[late] > 0 and reasons["busy_connection"] + reasons["busy_address"] > 0, reasons
    for reason in WAIT_REASONS:
        assert after[reason] - before[reason] == reasons[reason], (reason, after[reason] - before[reason], reasons)


@pytest.mark.timeout(120)
def test_calls_that_never_send_their_request_are_cut_and_counted(coord):
    """Unary calls (Status) that never send their request: at most the waiting shares wait their deadline, the
    rest are cut after the grace, every one counted; Status, Heartbeat, Challenge and Health keep answering."""
    before = coord.rejections()
    seen, latencies, _ = asyncio.run(_flood(coord.address, "/fedswarm.Coordinator/Status", 4, 30, 3.0, coord.honest))
    _check_counted(seen, before, coord.rejections(), "slow_request")
    assert latencies and max(latencies) < HONEST_MAX_S, sorted(latencies)[-5:]


async def _model_parts(stub, who: Session, task: pb.Task, codec: int) -> list[bytes]:
    shapes = {}
    async for chunk in stub.FetchModel(pb.FetchModelRequest(client_id=who.client_id, session_token=who.token,
                                                            task_id=task.task_id), timeout=60):
        shapes[chunk.part.name] = tuple(chunk.part.shape)

    def encode():
        return [pb.UpdateChunk(part=p).SerializeToString() for name, shape in shapes.items()
                for p in wire.tensor_parts(name, shape, C.encode(torch.full((torch.Size(shape).numel(),), 1e-3), codec))]
    return await asyncio.to_thread(encode)


async def _task(stub, who: Session) -> pb.Task:
    while who.task is None:
        task = await stub.PullTask(pb.PullTaskRequest(client_id=who.client_id, session_token=who.token, wait_s=5),
                                   timeout=30)
        if task.kind == pb.TASK_TRAIN:
            who.task = task
    return who.task


def _header(who: Session, task: pb.Task, parts: list[bytes]) -> bytes:
    header = pb.UpdateHeader(client_id=who.client_id, session_token=who.token, task_id=task.task_id, round=task.round,
                             num_examples=2, train_loss=3.0, num_tensors=len(parts), num_parts=len(parts))
    return pb.UpdateChunk(header=header).SerializeToString()


async def _upload(address: str, who: Session) -> float:
    """Answer the session's open task with a small valid update; seconds the upload took."""
    async with _channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        task = await _task(stub, who)
        parts = await _model_parts(stub, who, task, C.codec_by_name("int8"))
        push = channel.stream_unary("/fedswarm.Coordinator/PushUpdate", response_deserializer=pb.PushReply.FromString)
        started = time.monotonic()
        reply = await push(iter([_header(who, task, parts), *parts]), timeout=60)
        assert reply.accepted
        who.task = None
        return time.monotonic() - started


@pytest.mark.timeout(120)
def test_headerless_uploads_reopened_at_once_leave_an_honest_upload_through(coord):
    """Header-less PushUpdate streams, each re-opened as soon as it is cut, hold no more than the waiting shares;
    the honest session's upload, sent meanwhile from the same address, is accepted."""
    before = coord.rejections()
    seen, latencies, took = asyncio.run(_flood(coord.address, "/fedswarm.Coordinator/PushUpdate", 4, 30, 3.0,
                                               coord.honest, during=lambda: _upload(coord.address, coord.honest)))
    _check_counted(seen, before, coord.rejections(), "slow_header")
    assert took < 10.0 and max(latencies) < HONEST_MAX_S, (took, sorted(latencies)[-5:])


async def _drip(push, header: bytes, parts: list[bytes], hurry: asyncio.Event, seen: collections.Counter) -> None:
    """An upload that sends a valid part every CHUNK_S / 3 (inside the chunk deadline), all at once after `hurry`."""
    async def chunks():
        yield header
        for part in parts:
            yield part
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hurry.wait(), CHUNK_S / 3)
    try:
        seen["accepted" if (await push(chunks(), timeout=60)).accepted else "refused"] += 1
    except grpc.aio.AioRpcError as err:
        seen[refusals.reason(err)] += 1


@pytest.mark.timeout(120)
def test_one_key_dripping_uploads_of_one_task_cannot_stall_uploads(coord):
    """20 uploads of mallory's one task, each dripping valid parts (more streams than the 16 upload workers):
    each newer stream replaces the older (upload_replaced) and the bystander's upload goes through while the
    newest still drips; that one then completes (the task's one answer), and round 1 commits."""
    async def scenario():
        async with _channel(coord.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            task = await _task(stub, coord.mallory)
            parts = await _model_parts(stub, coord.mallory, task, C.codec_by_name("int8"))
            push = channel.stream_unary("/fedswarm.Coordinator/PushUpdate", response_deserializer=pb.PushReply.FromString)
            seen, hurry, drippers = collections.Counter(), asyncio.Event(), []
            for _ in range(20):
                drippers.append(asyncio.create_task(_drip(push, _header(coord.mallory, task, parts), parts, hurry, seen)))
                await asyncio.sleep(0.02)
            took = await _upload(coord.address, coord.bystander)
            replaced_by_then = seen["upload_replaced"] + seen["session_busy"]
            hurry.set()
            await asyncio.gather(*drippers)
            coord.mallory.task = None
            return seen, took, replaced_by_then
    before = coord.rejections()
    seen, took, replaced_by_then = asyncio.run(scenario())
    after = coord.rejections()
    assert seen["accepted"] == 1 and seen["upload_replaced"] + seen["session_busy"] == 19 == replaced_by_then, seen
    for reason in ("upload_replaced", "session_busy"):
        assert after[reason] - before[reason] == seen[reason], reason
    assert took < 10.0, took   # a dripper takes 52 parts x 0.5 s: the bystander's upload did not wait for that


@pytest.mark.timeout(120)
def test_one_sessions_flood_of_long_polls_holds_two(coord):
    """60 concurrent PullTask long-polls of one session: it holds two; a newer poll answers its oldest at once
    (poll_superseded) or, past the session's 6 calls in flight, is refused (session_busy); honest calls go on."""
    async def scenario():
        async with _channel(coord.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            req = pb.PullTaskRequest(client_id=coord.mallory.client_id, session_token=coord.mallory.token, wait_s=2)

            async def poll():
                started = time.monotonic()
                try:
                    task = await stub.PullTask(req, timeout=30)
                    if task.kind == pb.TASK_TRAIN:
                        coord.mallory.task = task
                    return "none" if task.kind == pb.TASK_NONE else "task", time.monotonic() - started
                except grpc.aio.AioRpcError as err:
                    return refusals.reason(err), time.monotonic() - started
            stop = asyncio.Event()
            prober = asyncio.create_task(_honest_calls(coord.address, coord.honest, stop))
            outcomes = await asyncio.gather(*[poll() for _ in range(60)])
            stop.set()
            return outcomes, await prober
    before = coord.rejections()
    outcomes, latencies = asyncio.run(scenario())
    after = coord.rejections()
    kinds = collections.Counter(kind for kind, _ in outcomes)
    assert set(kinds) <= {"none", "task", "session_busy"} and kinds["task"] <= 1, kinds   # round 2's, if out
    superseded = after["poll_superseded"] - before["poll_superseded"]
    assert after["session_busy"] - before["session_busy"] == kinds["session_busy"]
    # it never held more than 2: every other poll was answered at once or refused
    assert superseded + kinds["session_busy"] >= 60 - 2 - kinds["task"] and superseded <= kinds["none"], \
        (superseded, kinds)
    assert max(latencies) < HONEST_MAX_S, sorted(latencies)[-5:]


@pytest.mark.timeout(120)
def test_silent_connections_at_the_open_file_limit_are_closed(coord):
    """The coordinator raised its open-file limit at start (logged). Lowered from outside to 30 files above
    what it holds, 60 silent TCP connections use them up; they are closed after --handshake-timeout 1 s, so a
    new honest connection gets in within seconds."""
    assert "open-file limit" in coord.proc.output()
    pid, (host, port) = coord.proc.pid, coord.address.rsplit(":", 1)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    silent = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 30, hard))
        silent = [socket.create_connection((host, int(port))) for _ in range(60)]
        started = time.monotonic()
        with grpc.insecure_channel(coord.address, options=OWN_CONNECTION) as channel:   # a new connection
            reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=15)
        took = time.monotonic() - started
        silent[0].settimeout(5)
        while silent[0].recv(4096):   # the server's settings, then its close at the handshake timeout
            pass
    finally:
        for sock in silent:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert json.loads(reply.json)["run_id"] and took < 10, took


def test_raise_open_file_limit_lifts_the_soft_limit_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard open-file limit above 256, not {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
