"""One client session on a `grpc.aio` channel: join, heartbeats, re-join, long-poll, download, upload.

It holds no thread: hundreds of sessions share one event loop (sim/virtual.py's virtual clients,
sim/bench_load.py's load sessions). What a role does with a task is not here (client/work.py)."""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

import grpc
import torch

from fedswarm.client.session import ClientTimeouts, Credentials, JoinRefused, RetryPolicy, channel_options, \
    heartbeat_every
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals, wire
from fedswarm.run_config import RunConfig

log = logging.getLogger("fedswarm.session")


class SessionRefused(JoinRefused):
    """The coordinator refused this session's join (UNAUTHENTICATED / INVALID_ARGUMENT): retrying will not help."""


def assemble(parts: list[pb.TensorPart]) -> dict[str, torch.Tensor]:
    assembler = wire.PartAssembler({p.name: tuple(p.shape) for p in parts}, {C.CODEC_NAMES["none"]})
    for part in parts:
        assembler.add(part)
    return assembler.finish()


def open_aio_channel(address: str, own_connection: bool = True,
                     timeouts: ClientTimeouts | None = None) -> grpc.aio.Channel:
    """A plaintext channel (the sim runs on loopback or a private Ray network), with every session's options."""
    return grpc.aio.insecure_channel(address, options=channel_options(timeouts or ClientTimeouts(), own_connection))


class AsyncSession:
    """A session with the coordinator; `heartbeats()` runs as a task beside the work.

    `on_latency(kind, seconds)`, if given, is called after every successful Heartbeat ("heartbeat")
    and Join ("join"); `lost_leases` counts the times the coordinator had forgotten the session,
    `heartbeat_failures` the failed heartbeats by status code name."""

    def __init__(self, channel: grpc.aio.Channel, name: str, timeouts: ClientTimeouts | None = None,
                 on_latency: Callable[[str, float], None] | None = None, role: str = "client"):
        self.channel, self.name, self.role = channel, name, role
        self.t = timeouts or ClientTimeouts()
        self.policy = RetryPolicy.of(self.t)
        self.stub = pb_grpc.CoordinatorStub(channel)
        self._push_raw = channel.stream_unary("/fedswarm.Coordinator/PushUpdate", request_serializer=None,
                                              response_deserializer=pb.PushReply.FromString)
        self.on_latency = on_latency or (lambda kind, s: None)
        self.creds = Credentials()   # swapped whole by a re-join
        self.joined = pb.JoinReply()
        self.heartbeat_s = heartbeat_every(0.0, 0.0)
        self.run_cfg: RunConfig | None = None   # the run contract, from the join
        self.lost_leases = 0
        self.heartbeat_failures: collections.Counter[str] = collections.Counter()
        self.closed = asyncio.Event()
        self._join_lock = asyncio.Lock()

    @property
    def client_id(self) -> int:
        return self.creds.client_id

    @property
    def token(self) -> str:
        return self.creds.token

    @property
    def run_id(self) -> str:
        return self.creds.run_id

    async def with_retry(self, what: str, call):
        """Await `call()` until it succeeds or the session's retry policy (session.RetryPolicy) gives up."""
        tries = self.policy.start()
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as err:
                wait = tries.wait_after(err)
                if wait is None or self.closed.is_set():
                    raise
                log.debug("%s: %s failed (%s); retrying in %.1f s", self.name, what, err.code().name, wait)
                await asyncio.sleep(wait)

    async def join(self) -> None:
        """Join, or re-join keeping the id while the coordinator still knows the old session."""
        async with self._join_lock:
            async def attempt():
                c = self.creds
                req = pb.JoinRequest(name=self.name, device="cpu", precision="bf16", role=self.role,
                                     resume_client_id=c.client_id, resume_token=c.token)
                started = time.perf_counter()
                reply = await self.stub.Join(req, timeout=self.t.rpc_s)
                self.on_latency("join", time.perf_counter() - started)
                return reply
            try:
                reply = await self.with_retry("join", attempt)
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                    raise SessionRefused(f"the coordinator refused {self.name}: {err.details()}") from None
                raise
            if self.run_id and reply.run_id != self.run_id:
                raise SessionRefused(f"the coordinator now serves run {reply.run_id}, not {self.run_id}")
            self.creds = Credentials(reply.client_id, reply.session_token, reply.run_id)
            self.joined = reply
            self.heartbeat_s = heartbeat_every(reply.heartbeat_interval_s, reply.lease_s)
            self.run_cfg = RunConfig.from_json(reply.run_config_json)

    async def rejoin(self, why: str) -> None:
        self.lost_leases += 1
        log.warning("%s: the coordinator no longer knows the session (%s); joining again", self.name, why)
        await self.join()

    async def heartbeats(self) -> None:
        """Beat every heartbeat_s (from each beat's start) until closed; re-join when the coordinator forgot
        the session."""
        next_at = time.monotonic() + self.heartbeat_s
        while not self.closed.is_set():
            try:
                await asyncio.wait_for(self.closed.wait(), max(0.0, next_at - time.monotonic()))
                return
            except asyncio.TimeoutError:
                pass
            next_at = time.monotonic() + self.heartbeat_s
            started = time.perf_counter()
            try:
                await self.stub.Heartbeat(pb.HeartbeatRequest(**self.creds.ids()), timeout=self.t.rpc_s)
                self.on_latency("heartbeat", time.perf_counter() - started)
            except grpc.aio.AioRpcError as err:
                self.heartbeat_failures[err.code().name] += 1
                if refusals.reason(err) in refusals.REJOIN and not self.closed.is_set():  # typed, not text
                    await self.rejoin(err.details() or "")
                else:
                    log.debug("%s: heartbeat failed: %s", self.name, err.code().name)

    async def pull(self) -> pb.Task:
        """Long-poll for the next task (TASK_NONE when none came within pull_wait_s)."""
        async def call():
            req = pb.PullTaskRequest(**self.creds.ids(), wait_s=self.t.pull_wait_s)
            return await self.stub.PullTask(req, timeout=self.t.pull_wait_s + self.t.rpc_s)
        try:
            return await self.with_retry("pull task", call)
        except grpc.aio.AioRpcError as err:
            if refusals.reason(err) not in refusals.REJOIN:
                raise
            await self.rejoin(err.details() or "")
            return pb.Task(kind=pb.TASK_NONE)

    async def fetch_chunks(self, task_id: str, held_version: int | None = None,
                           held_digest: bytes = b"") -> list[pb.ModelChunk]:
        """The task's weights as they travel: a full float32 copy, or (holding `held_version`) delta steps."""
        async def download():
            req = pb.FetchModelRequest(**self.creds.ids(), task_id=task_id,
                                       has_version=held_version is not None, held_version=held_version or 0,
                                       held_digest=held_digest)
            return [chunk async for chunk in self.stub.FetchModel(req, timeout=self.t.transfer_s)]
        return await self.with_retry("model download", download)

    async def fetch_parts(self, task_id: str) -> list[pb.TensorPart]:
        """The task's weights as they travel (a full copy's float32 parts), not yet decoded."""
        return [chunk.part for chunk in await self.fetch_chunks(task_id)]

    async def fetch_model(self, task_id: str) -> dict[str, torch.Tensor]:
        """The task's weights, checked and decoded by wire.PartAssembler off the event loop."""
        return await asyncio.to_thread(assemble, await self.fetch_parts(task_id))

    async def push(self, chunks: list[bytes]) -> pb.PushReply:
        """Stream an encoded update (client/work.py's update_stream)."""
        return await self.with_retry("upload", lambda: self._push_raw(iter(chunks), timeout=self.t.transfer_s))

    def close(self) -> None:
        self.closed.set()
