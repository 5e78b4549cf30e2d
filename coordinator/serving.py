"""The coordinator's grpc.aio server: limits on what a caller can hold, worker pools, health service.

Waiting (long-polls, idle streams, slow readers) happens on the event loop and holds no thread;
CPU work of a model transfer runs on small bounded pools so Status and Heartbeat stay fast."""
from __future__ import annotations

import asyncio
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedswarm.proto import wire
from fedswarm.proto.refusals import REASON_KEY  # noqa: F401 - the service sets it on every refusal


@dataclass
class ServingLimits:
    """Everything a caller can hold, bounded; every timeout named."""

    max_sessions: int = 5000              # joined clients (a join beyond is RESOURCE_EXHAUSTED too_many_sessions)
    max_concurrent_rpcs: int = 12000      # beyond, gRPC answers RESOURCE_EXHAUSTED at once
    max_pending_rpcs: int = 12000         # calls queued in gRPC core before the loop takes them (core's default,
                                          # 1000, cancels calls in bursts: 1000 sessions' synchronized polls)
    max_awaiting_header: int = 256        # PushUpdate streams allowed to wait for their first message at once
    first_message_s: float = 10.0         # a PushUpdate stream must send its header within this
    chunk_idle_s: float = 30.0            # ... and each later chunk within this of the previous one
    upload_workers: int = 16              # threads consuming PushUpdate streams past a valid header
    cpu_workers: int = 4                  # threads for model downloads' setup and chunks
    keepalive_time_s: float = 60.0        # the server pings an idle connection this often ...
    keepalive_timeout_s: float = 20.0     # ... and closes it if the ping is not answered within this
    min_client_ping_s: float = 10.0       # clients may not ping more often than this
    max_connection_idle_s: float = 600.0  # a connection with no RPC for this long is closed (clients reconnect)
    max_connection_age_s: float = 3600.0  # connections are recycled after this (with a grace for RPCs in flight)
    max_connection_age_grace_s: float = 600.0
    upload_pool: futures.ThreadPoolExecutor = field(init=False, repr=False)
    cpu_pool: futures.ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self):
        self.upload_pool = futures.ThreadPoolExecutor(self.upload_workers, thread_name_prefix="upload")
        self.cpu_pool = futures.ThreadPoolExecutor(self.cpu_workers, thread_name_prefix="transfer")

    def options(self) -> list[tuple[str, int]]:
        ms = lambda s: int(s * 1000)  # noqa: E731
        return [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
                ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096),
                ("grpc.server.max_pending_requests", self.max_pending_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", 2 * self.max_pending_rpcs),
                ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
                ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_s)),
                ("grpc.http2.max_ping_strikes", 3),
                ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)),
                ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s))]

    def shutdown(self) -> None:
        self.upload_pool.shutdown(wait=False, cancel_futures=True)
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)


class StreamRefused(Exception):
    """A client stream broke its limits while a worker consumed it (the service turns it into a refusal)."""

    def __init__(self, code: grpc.StatusCode, reason: str, detail: str):
        super().__init__(detail)
        self.code, self.reason, self.detail = code, reason, detail


class StreamBridge:
    """A blocking iterator (for a worker thread) over an aio request stream whose first message was read."""

    _END = object()

    def __init__(self, first, requests, loop: asyncio.AbstractEventLoop, idle_s: float):
        self._pending, self._requests, self._loop, self._idle_s = first, requests, loop, idle_s
        self._ended = first is None

    def __iter__(self):
        return self

    def __next__(self):
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        if self._ended:
            raise StopIteration
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(anext(self._requests, self._END), self._idle_s), self._loop)
        try:
            item = future.result(self._idle_s + 5.0)
        except (asyncio.TimeoutError, futures.TimeoutError):
            future.cancel()
            raise StreamRefused(grpc.StatusCode.DEADLINE_EXCEEDED, "slow_upload",
                                f"no upload chunk for {self._idle_s:.0f} s") from None
        except (futures.CancelledError, asyncio.CancelledError, grpc.RpcError, grpc.aio.AioRpcError) as err:
            raise StreamRefused(grpc.StatusCode.CANCELLED, "stream_broken", f"the upload stream broke: {err}") from None
        if item is self._END:
            self._ended = True
            raise StopIteration
        return item


class Server:
    """The aio server with the Coordinator service and the standard health service on one port."""

    def __init__(self, service_handler: grpc.GenericRpcHandler, limits: ServingLimits):
        self.limits = limits
        self.grpc = grpc.aio.server(options=limits.options(), maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
        self.grpc.add_generic_rpc_handlers((service_handler,))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)

    def bind(self, address: str, tls: grpc.ServerCredentials | None) -> int:
        """The port bound (0: could not bind)."""
        try:
            return self.grpc.add_secure_port(address, tls) if tls else self.grpc.add_insecure_port(address)
        except RuntimeError:
            return 0

    async def start(self) -> None:
        await self.grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("fedswarm.Coordinator", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace_s)
        self.limits.shutdown()
