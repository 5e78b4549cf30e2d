"""The coordinator's grpc.aio server: limits on what a caller can hold, worker pools, health service.

Waiting (long-polls, idle streams, slow readers) happens on the event loop and holds no thread;
CPU work of a model transfer runs on small bounded pools so Status and Heartbeat stay fast. Our own
limits (coordinator/admission.py) sit below gRPC core's, so our code refuses first and counts why."""
from __future__ import annotations

import asyncio
import collections
import logging
import resource
import time
from concurrent import futures
from dataclasses import dataclass, field, fields

import grpc
from grpc_health.v1 import health, health_pb2

from fedswarm.coordinator.admission import Admission
from fedswarm.coordinator.connections import ConnectionWatch
from fedswarm.proto import wire
from fedswarm.settings import opt
from fedswarm.proto.refusals import Reason, Refused

log = logging.getLogger(__name__)
HEALTH_SERVICE = "grpc.health.v1.Health"
FEW_OPEN_FILES = 8192   # below this soft limit, say so: every connection holds a file
FILE_RESERVE = 256      # open files kept from connections (checkpoints, the database, /proc, logs)


@dataclass
class ServingLimits:
    """Everything a caller can hold, bounded; every timeout named. The fields with help are flags of
    `fedswarm coordinator`."""

    max_sessions: int = opt(5000, "most joined clients at once (a join beyond is refused too_many_sessions)",
                            metavar="N")
    # a call that has not sent its first message (a unary request, an upload's header) waits in these shares;
    # one that starts while a share is full gets only first_message_grace_s (an honest call needs no more)
    max_waiting: int = opt(2048, "calls that may wait for their first message (a request, an upload's header) "
                                 "at once, in all", flag="--max-waiting-calls", metavar="N")
    max_waiting_per_address: int = opt(256, "calls from one address (IPv6: one /64) that may wait for their "
                                            "first message at once", metavar="N")
    max_waiting_per_connection: int = opt(64, "calls on one connection that may wait for their first message "
                                              "at once", metavar="N")
    first_message_s: float = opt(10.0, "seconds a call may take to send its first message",
                                 flag="--first-message-timeout", metavar="S")
    first_message_grace_s: float = opt(1.0, "seconds a call gets for its first message when it starts while "
                                            "its connection's, address's or the server's waiting share is full",
                                       flag="--first-message-grace", metavar="S")
    ban_after: int = opt(2000, "calls from one address that do not send their first message in time, and its "
                               "connections shut down beyond its share, within --ban-window, after which the "
                               "address is banned for --ban-seconds (each of its calls is held for "
                               "--first-message-timeout, then refused)", metavar="N")
    ban_window_s: float = opt(10.0, "seconds over which --ban-after counts", flag="--ban-window", metavar="S")
    ban_s: float = opt(60.0, "seconds a banned address stays banned", flag="--ban-seconds", metavar="S")
    chunk_idle_s: float = opt(30.0, "seconds an upload may take between two chunks", flag="--chunk-timeout",
                              metavar="S")
    upload_s: float = opt(600.0, "seconds a whole upload may take from its header", flag="--upload-timeout",
                          metavar="S")
    # a call with a valid session
    max_calls_per_session: int = opt(8, "calls one session may have in flight (polls, downloads, uploads, "
                                        "heartbeats)", metavar="N")
    max_polls_per_session: int = opt(2, "PullTask long-polls one session may hold; a newer one answers the "
                                        "oldest at once", metavar="N")
    max_health_watches: int = 64          # grpc.health.v1 Watch streams at once (probes use Check) ...
    max_health_watches_per_address: int = 4   # ... and from one address
    max_connections_per_address: int = opt(1024, "TCP connections one address (IPv6: one /64) may hold; the "
                                                 "newest beyond are shut down (at most a quarter of the "
                                                 "connections the open-file limit allows)", metavar="N")
    handshake_s: float = opt(10.0, "seconds a new connection may take for its TLS and HTTP/2 handshake "
                                   "(a silent one is closed)", flag="--handshake-timeout", metavar="S")
    core_headroom: int = 16384            # calls gRPC core admits beyond the sum of our caps (quick calls, graces)
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
        for f in fields(self):
            value = getattr(self, f.name) if f.init else 1
            if not value > 0:
                flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                raise ValueError(f"{flag if 'help' in f.metadata else f.name} must be > 0, not {value}")
        self.upload_pool = futures.ThreadPoolExecutor(self.upload_workers, thread_name_prefix="upload")
        self.cpu_pool = futures.ThreadPoolExecutor(self.cpu_workers, thread_name_prefix="transfer")

    def core_max_calls(self) -> int:
        """gRPC core's cap on calls at once: above every call our own limits let in, so ours refuse first."""
        return (self.max_waiting + self.max_sessions * self.max_calls_per_session + self.max_health_watches
                + self.core_headroom)

    def connection_share(self) -> int:
        """The connections one address may hold: the flag, at most a quarter of what gRPC may accept."""
        return max(1, min(self.max_connections_per_address, max_connections() // 4))

    def options(self) -> list[tuple[str, int]]:
        ms = lambda s: int(s * 1000)  # noqa: E731
        return [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
                ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096),
                # calls queued in core before the loop takes them (core's default, 1000, cancels calls in
                # bursts: 1000 sessions' synchronized polls)
                ("grpc.server.max_pending_requests", self.core_max_calls()),
                ("grpc.server.max_pending_requests_hard_limit", 2 * self.core_max_calls()),
                ("grpc.server_handshake_timeout_ms", ms(self.handshake_s)),
                ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
                ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_s)),
                ("grpc.http2.max_ping_strikes", 3),
                ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)),
                ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s)),
                ("grpc.max_allowed_incoming_connections", max_connections())]

    def shutdown(self) -> None:
        self.upload_pool.shutdown(wait=False, cancel_futures=True)
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)


class StreamBridge:
    """A blocking iterator (for a worker thread) over an aio request stream whose first message was read:
    each further message within `idle_s` of the previous, the whole stream within `total_s`. `refuse(err)`
    (from the loop) ends it at once with `err`, even while the worker waits for a message."""

    _END = object()

    def __init__(self, first, requests, loop: asyncio.AbstractEventLoop, idle_s: float, total_s: float):
        self._pending, self._requests, self._loop, self._idle_s = first, requests, loop, idle_s
        self._total_s, self._deadline = total_s, time.monotonic() + total_s
        self._ended = first is None
        self._refusal: Refused | None = None
        self._waiting: futures.Future | None = None

    def refuse(self, err: Refused) -> None:
        self._refusal = err
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()

    def __iter__(self):
        return self

    def __next__(self):
        if self._refusal is not None:
            raise self._refusal
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        if self._ended:
            raise StopIteration
        left = self._deadline - time.monotonic()
        wait = min(self._idle_s, left)
        if wait <= 0:
            raise self._over_time()
        self._waiting = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(anext(self._requests, self._END), wait), self._loop)
        try:
            if self._refusal is not None:   # refused between the check above and the wait
                self._waiting.cancel()
            item = self._waiting.result(wait + 5.0)
        except (asyncio.TimeoutError, futures.TimeoutError):
            self._waiting.cancel()
            raise (self._over_time() if wait < self._idle_s else
                   Refused(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.SLOW_UPLOAD,
                           f"no upload chunk for {self._idle_s:g} s")) from None
        except (futures.CancelledError, asyncio.CancelledError, grpc.RpcError, grpc.aio.AioRpcError) as err:
            if self._refusal is not None:
                raise self._refusal from None
            raise Refused(grpc.StatusCode.CANCELLED, Reason.STREAM_BROKEN, f"the upload stream broke: {err}") from None
        finally:
            self._waiting = None
        if item is self._END:
            self._ended = True
            raise StopIteration
        return item

    def _over_time(self) -> Refused:
        return Refused(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.UPLOAD_DEADLINE,
                       f"the upload took longer than {self._total_s:g} s: send it over a faster link, or ask "
                       f"the operator for a longer --upload-timeout")


def health_handler(servicer: health.aio.HealthServicer, admission: Admission) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health as streams: the request is read under the first-message deadline (a stock
    unary handler waits for it without one) and Watch streams are capped."""
    async def request(requests, context) -> health_pb2.HealthCheckRequest:
        raw = await admission.first_message(requests, context, Reason.SLOW_REQUEST)
        if raw is None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, Reason.NO_REQUEST, "the call carried no request")
        try:
            return health_pb2.HealthCheckRequest.FromString(raw)
        except Exception:  # noqa: BLE001 - DecodeError and friends: the caller's bytes are bad
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, Reason.MALFORMED,
                          "cannot parse HealthCheckRequest") from None

    async def check(requests, context):
        try:
            return await servicer.Check(await request(requests, context), context)
        except Refused as err:
            await admission.refuse(context, err)

    async def watch(requests, context):
        try:
            req = await request(requests, context)
            with admission.watch(context):
                await servicer.Watch(req, context)
        except Refused as err:
            await admission.refuse(context, err)

    ser = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
        "Check": grpc.stream_unary_rpc_method_handler(check, response_serializer=ser),
        "Watch": grpc.stream_stream_rpc_method_handler(watch, response_serializer=ser)})


class Server:
    """The aio server with the Coordinator service and the standard health service on one port."""

    def __init__(self, service_handler: grpc.GenericRpcHandler, limits: ServingLimits,
                 admission: Admission | None = None):
        """`admission`: the service's (CoordinatorService.admission), so health refusals land in its counters;
        without it they are counted in `self.rejections`."""
        self.limits, self.rejections = limits, collections.Counter()
        if admission is None:
            admission = Admission(limits, lambda reason: self.rejections.update((reason,)))
        self.grpc = grpc.aio.server(options=limits.options(), maximum_concurrent_rpcs=limits.core_max_calls())
        self.health = health.aio.HealthServicer()
        self.grpc.add_generic_rpc_handlers((service_handler, health_handler(self.health, admission)))
        self.watch = ConnectionWatch(set(), limits.connection_share(), admission.count, admission.strike)

    def bind(self, address: str, tls: grpc.ServerCredentials | None) -> int:
        """The port bound (0: could not bind)."""
        try:
            port = self.grpc.add_secure_port(address, tls) if tls else self.grpc.add_insecure_port(address)
        except RuntimeError:
            return 0
        if port:
            self.watch.ports.add(port)
        return port

    async def start(self) -> None:
        await self.grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("fedswarm.Coordinator", health_pb2.HealthCheckResponse.SERVING)
        self.watch.start()

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.watch.stop()
        await self.grpc.stop(grace_s)
        self.limits.shutdown()


def max_connections() -> int:
    """Connections gRPC may accept at once: the open-file soft limit less FILE_RESERVE, so silent
    connections can never take the files a commit, the database or a checkpoint needs."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft >= (1 << 31) - 1:
        return (1 << 31) - 1
    return max(soft - FILE_RESERVE, 64)


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (every connection holds a file); logged.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(open("/proc/sys/fs/nr_open").read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d (the hard limit)", soft, target)
            soft = target
        except (OSError, ValueError) as err:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, err)
    else:
        log.info("open-file limit %d", soft)
    if soft != resource.RLIM_INFINITY and soft < FEW_OPEN_FILES:
        log.warning("the open-file limit is %d: each connection holds a file, so this many silent connections "
                    "lock everyone out; raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, compose ulimits)",
                    soft)
    return soft
