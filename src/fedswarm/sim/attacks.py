"""Attacks on a coordinator's serving limits, over a real socket: what `tests/test_lockout.py` runs scaled down
and `python -m fedswarm.sim.bench_attacks` runs at the size a security review used.

Every attacker here is a grpc.aio client doing what a stranger or a member can do: open calls that never
send their first message, drip valid parts of an upload, flood long-polls. `probe` is the honest side: Status,
Heartbeat, Challenge and a health check in turn, each timed and each required to succeed."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals, wire

OWN_CONNECTION = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
                  ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096),
                  ("grpc.use_local_subchannel_pool", 1)]   # each channel its own TCP connection
WAIT_REASONS = {refusals.Reason.SLOW_REQUEST, refusals.Reason.SLOW_HEADER, refusals.Reason.BUSY_CONNECTION,
                refusals.Reason.BUSY_ADDRESS, refusals.Reason.BUSY}


@dataclass
class Session:
    name: str
    client_id: int
    token: str
    task: pb.Task | None = None   # its open train task, once pulled


def closed(sock: socket.socket) -> bool:
    """Whether the coordinator ended raw TCP connection `sock`; what it sent (its HTTP/2 settings) is read and
    dropped."""
    sock.setblocking(False)
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def channel(address: str) -> grpc.aio.Channel:
    """A channel on a TCP connection of its own."""
    return grpc.aio.insecure_channel(address, options=OWN_CONNECTION)


def join(address: str, names: tuple[str, ...]) -> list[Session]:
    """Sessions joined without a key (a coordinator with no --authorized-keys)."""
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        joined = [stub.Join(pb.JoinRequest(name=n, device="cpu", precision="fp32"), timeout=30) for n in names]
    return [Session(n, j.client_id, j.session_token) for n, j in zip(names, joined)]


async def probe(address: str, who: Session | None, stop: asyncio.Event, pause_s: float = 0.05) -> dict[str, list[float]]:
    """Status, Heartbeat (with `who`'s session), Challenge and Health in turn until `stop`, on one connection;
    each must succeed (an error propagates). Seconds per call, by method. The calls run on a thread with an
    event loop of their own, so the attacker's calls on the caller's loop do not delay them client-side."""
    halt = threading.Event()
    worker = asyncio.ensure_future(asyncio.to_thread(lambda: asyncio.run(_probe(address, who, halt, pause_s))))
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({worker, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    halt.set()
    return await worker


async def _probe(address: str, who: Session | None, halt: threading.Event, pause_s: float) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    async with channel(address) as ch:
        stub, health = pb_grpc.CoordinatorStub(ch), health_pb2_grpc.HealthStub(ch)
        calls = {"Status": lambda: stub.Status(pb.StatusRequest(), timeout=10),
                 "Challenge": lambda: stub.Challenge(pb.ChallengeRequest(), timeout=10),
                 "Health": lambda: health.Check(health_pb2.HealthCheckRequest(service="fedswarm.Coordinator"),
                                                timeout=10)}
        if who is not None:
            beat = pb.HeartbeatRequest(client_id=who.client_id, session_token=who.token)
            calls["Heartbeat"] = lambda: stub.Heartbeat(beat, timeout=10)
        while not halt.is_set():
            for name, call in calls.items():
                started = time.monotonic()
                await call()
                latencies[name].append(time.monotonic() - started)
            await asyncio.sleep(pause_s)
    return latencies


async def silent(ch: grpc.aio.Channel, method: str, stop: asyncio.Event, seen: collections.Counter,
                 timeout_s: float = 30.0) -> None:
    """Open a call on `method` that never sends its first message; when it is cut, open the next at once.
    `seen` counts how each ended, as (code, reason)."""
    while not stop.is_set():
        try:
            await ch.stream_unary(method)(timeout=timeout_s)   # no request iterator: nothing is ever written
            seen[("OK", "")] += 1
        except grpc.aio.AioRpcError as err:
            seen[(err.code(), refusals.reason(err))] += 1


async def flood(address: str, method: str, connections: int, per_connection: int, seconds: float,
                honest: Session | None, during=None, settle_s: float = 1.0, probe_address: str | None = None):
    """`connections` x `per_connection` silent calls on `method`, each re-opened as soon as it is cut, for
    `seconds`, with `probe` running beside them (on `probe_address`, default `address`: the attacker's) and
    `during()` awaited `settle_s` in. Waits for every attack call to end. (seen, probe latencies, during's
    result)."""
    stop, seen = asyncio.Event(), collections.Counter()
    channels = [channel(address) for _ in range(connections)]
    attackers = [asyncio.create_task(silent(ch, method, stop, seen)) for ch in channels for _ in range(per_connection)]
    honest_stop = asyncio.Event()
    prober = asyncio.create_task(probe(probe_address or address, honest, honest_stop))
    started = time.monotonic()
    await asyncio.sleep(settle_s)   # the shares are full now
    result = await during() if during else None
    await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
    stop.set()
    await asyncio.gather(*attackers)
    honest_stop.set()
    latencies = await prober
    for ch in channels:
        await ch.close()
    return seen, latencies, result


async def open_task(stub, who: Session, wait_s: float = 5.0) -> pb.Task:
    """The session's open train task (long-polled for until one comes)."""
    while who.task is None:
        task = await stub.PullTask(pb.PullTaskRequest(client_id=who.client_id, session_token=who.token,
                                                      wait_s=wait_s), timeout=wait_s + 25)
        if task.kind == pb.TASK_TRAIN:
            who.task = task
    return who.task


async def model_parts(stub, who: Session, task: pb.Task, codec: int, value: float = 1e-3) -> list[bytes]:
    """An update's serialized parts: every tensor of the task's model shifted by `value`, encoded with `codec`."""
    shapes = {}
    async for chunk in stub.FetchModel(pb.FetchModelRequest(client_id=who.client_id, session_token=who.token,
                                                            task_id=task.task_id), timeout=120):
        shapes[chunk.part.name] = tuple(chunk.part.shape)

    def encode():
        return [pb.UpdateChunk(part=p).SerializeToString() for name, shape in shapes.items()
                for p in wire.tensor_parts(name, shape, C.encode(torch.full((torch.Size(shape).numel(),), value), codec))]
    return await asyncio.to_thread(encode)


def header(who: Session, task: pb.Task, parts: list[bytes], num_examples: int = 2) -> bytes:
    h = pb.UpdateHeader(client_id=who.client_id, session_token=who.token, task_id=task.task_id, round=task.round,
                        num_examples=num_examples, train_loss=3.0, num_tensors=len(parts), num_parts=len(parts))
    return pb.UpdateChunk(header=h).SerializeToString()


def pusher(ch: grpc.aio.Channel):
    return ch.stream_unary("/fedswarm.Coordinator/PushUpdate", response_deserializer=pb.PushReply.FromString)


async def upload(address: str, who: Session, codec: str = "int8", value: float = 1e-3) -> tuple[bool, float]:
    """Answer the session's open task with an update of `value` everywhere; (accepted, seconds the push took)."""
    async with channel(address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        task = await open_task(stub, who)
        parts = await model_parts(stub, who, task, C.codec_by_name(codec), value)
        started = time.monotonic()
        reply = await pusher(ch)(iter([header(who, task, parts), *parts]), timeout=120)
        who.task = None
        return reply.accepted, time.monotonic() - started


async def drip(push, head: bytes, parts: list[bytes], every_s: float, hurry: asyncio.Event,
               seen: collections.Counter) -> None:
    """An upload that sends a valid part every `every_s` (inside the chunk deadline), all at once after `hurry`."""
    async def chunks():
        yield head
        for part in parts:
            yield part
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hurry.wait(), every_s)
    try:
        seen["accepted" if (await push(chunks(), timeout=600)).accepted else "refused"] += 1
    except grpc.aio.AioRpcError as err:
        seen[refusals.reason(err) or err.code().name] += 1
