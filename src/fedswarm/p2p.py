"""SwarmNode: one hivemind DHT node plus a P2P replica serving protobuf stage handlers.

Every network operation carries a deadline of ours (``SwarmTimeouts``): hivemind's
``call_protobuf_handler`` and ``DHT.get/store`` have none of their own.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from contextlib import suppress

from hivemind import DHT
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE, P2PDaemonError, P2PHandlerError
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time
from fedswarm.proto.refusals import Reason
from fedswarm.signed_records import by_owner, private_key, validator
from fedswarm.swarm_settings import SwarmTimeouts


# hivemind renames the WARNING level to "WARN" for every logger in the process, which breaks
# Flower's log formatter (KeyError: 'WARN'); give the level its standard name back.
logging.addLevelName(logging.WARNING, "WARNING")

__all__ = ["PeerCallError", "SwarmTimeouts", "SwarmNode", "STREAM_SUFFIX", "new_identity", "listen_maddrs"]

logger = logging.getLogger(__name__)

STREAM_SUFFIX = ".stream"  # each handler is served twice: unary `name` and streaming `name.stream`
# Unary calls ride p2pd's persistent connection, whose frames cap at 4 MiB each way (request AND reply):
# a stage-0 forward sends a few KiB of ids and gets MiBs of activations back, so streaming is the default.
# hivemind 1.1.12 bug: an oversized unary *reply* crashes the server's error path (it builds a
# PersistentConnectionRequest with a nonexistent field), so the caller would hear nothing until its
# deadline. Our unary wrapper refuses such replies itself, which reaches the caller as a clean error.
_UNARY_REPLY_LIMIT = DEFAULT_MAX_MSG_SIZE - 4096  # room for the envelope (call id, framing)
MAX_ELEMENTS = 1 << 24        # elements of one activation tensor (client/swarm/tensors.py refuses more)
UNSIGNED_SEEN_MAX = 10_000    # unsigned record subkeys remembered, so each is counted once


class Refusals:
    """Data-plane input refused, by reason (totals since start; reported in heartbeats)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, reason: Reason, n: int = 1) -> None:
        with self._lock:
            self._counts[Reason(reason).value] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# A stage request carries at most two activations of MAX_ELEMENTS (fp32 at most), plus its envelope. A message
# whose length prefix says more is refused before a byte of it is read (hivemind would read it whole, and only
# then would the handler see who sent it); `P2P_REFUSALS` counts it as "oversized_message".
MAX_P2P_MESSAGE = 2 * 4 * MAX_ELEMENTS + (16 << 20)
P2P_REFUSALS = Refusals()
REFUSED_DRAIN_S = 10.0   # how long a refused stream's remaining request is read and dropped before it is closed
_OUR_FAULT = ("protocol not supported", "protocols not supported", "not registered", "exceeds")


class PeerCallError(Exception):
    """A call to a peer failed; ``kind`` is "timeout", "error" (the peer answered with a failure) or "unreachable"."""

    def __init__(self, peer_id: str, kind: str, reason: str):
        assert kind in ("timeout", "error", "unreachable"), kind
        self.peer_id, self.kind, self.reason = peer_id, kind, reason
        super().__init__(f"call to peer {peer_id} failed ({kind}): {reason}")


class OversizedMessage(ValueError):
    """A P2P message longer than MAX_P2P_MESSAGE: refused unread."""


async def _receive_bounded(reader: asyncio.StreamReader) -> bytes:
    """hivemind's P2P.receive_raw_data with a bound checked on the length prefix, before the payload is read."""
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > MAX_P2P_MESSAGE:
        P2P_REFUSALS.add(Reason.OVERSIZED_MESSAGE)
        logger.warning("refused a P2P message of %d bytes unread (at most %d)", length, MAX_P2P_MESSAGE)
        raise OversizedMessage(f"a message of {length} bytes is over the limit of {MAX_P2P_MESSAGE}")
    return await reader.readexactly(length)


P2P.receive_raw_data = staticmethod(_receive_bounded)   # every P2P stream of this process (stage and DHT traffic)


async def _receive_request(input_type, reader: asyncio.StreamReader, limit: int):
    """One protobuf request of at most `limit` bytes (None at the caller's end-of-stream); OversizedMessage,
    counted, when its length prefix says more, before the payload is read."""
    if await reader.readexactly(1) != P2P.MESSAGE_MARKER:
        return None
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if length > limit:
        P2P_REFUSALS.add(Reason.OVERSIZED_MESSAGE)
        logger.warning("refused a request of %d bytes unread (this caller may send at most %d)", length, limit)
        raise OversizedMessage(f"a request of {length} bytes is over this run's limit of {limit} for its micro-batch")
    request = input_type()
    request.ParseFromString(await reader.readexactly(length))
    return request


async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    """Read and drop what the caller still sends (at most `limit` bytes, 64 KiB at a time): closing a stream
    with its data unread resets it, and the caller would hear "stream closed" instead of the refusal."""
    while limit > 0:
        chunk = await reader.read(min(1 << 16, limit))
        if not chunk:
            return
        limit -= len(chunk)


def _gated_stream(p2p: P2P, name: str, handler, input_type, gate):
    """A stream handler speaking hivemind's protobuf stream protocol (one request, then end-of-stream; replies,
    or an RPCError) that awaits ``gate(context)`` before it reads the request; a refused caller's request is
    never parsed or held (`_discard` drops it). The gate may return the most bytes this caller's request may
    hold (its role's bound); a longer one is refused on its length prefix, unread."""
    async def serve(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
        with contextlib.closing(writer):
            try:
                limit = await gate(context)
                request = await _receive_request(input_type, reader, min(limit or MAX_P2P_MESSAGE, MAX_P2P_MESSAGE))
            except asyncio.IncompleteReadError:   # the caller went away
                return
            except Exception as err:  # noqa: BLE001 - refused unread: say why, then let the caller's writes end
                with suppress(Exception):
                    await P2P.send_protobuf(RPCError(message=str(err)), writer)
                    await asyncio.wait_for(_discard(reader, MAX_P2P_MESSAGE + 64), REFUSED_DRAIN_S)
                return
            try:
                if request is None:
                    return
                end = asyncio.create_task(P2P.receive_protobuf(input_type, reader))   # the caller's end-of-stream
                try:
                    await P2P.send_protobuf(await handler(request, context), writer)
                finally:
                    end.cancel()
            except asyncio.IncompleteReadError:   # the caller went away
                return
            except Exception as err:  # noqa: BLE001 - the caller hears why, as from hivemind's own handler
                with suppress(Exception):
                    await P2P.send_protobuf(RPCError(message=str(err)), writer)
    return serve


def new_identity() -> tuple[bytes, str]:
    """A fresh libp2p identity: (the private key as p2pd reads it, its base58 peer id). A client learns its
    peer id before it starts its node, so the id can go into its signed join."""
    key = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes()).SerializeToString()
    return key, PeerID.from_identity(key).to_base58()


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, 0
    if not port.isdigit() or not host:
        raise ValueError(f"{address!r}: use IP or IP:PORT (e.g. 10.0.0.5 or 10.0.0.5:4100)")
    return host, int(port)


def listen_maddrs(host: str, announce: str = "") -> tuple[list[str], list[str] | None]:
    """(host_maddrs, announce_maddrs) for `--p2p-host IP[:PORT]` and `--p2p-announce IP[:PORT]`.

    libp2p cannot announce port 0, so with --p2p-announce and no port a free port of `host` is picked and
    both addresses use it."""
    host_ip, port = _split(host)
    if not announce:
        return [f"/ip4/{host_ip}/tcp/{port}"], None
    announce_ip, announce_port = _split(announce)
    if not port:
        with socket.socket() as probe:
            probe.bind((host_ip, 0))
            port = probe.getsockname()[1]
    return [f"/ip4/{host_ip}/tcp/{port}"], [f"/ip4/{announce_ip}/tcp/{announce_port or port}"]


def _child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc); [] where unavailable."""
    out: list[int] = []
    with suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def _is_p2pd(pid: int) -> bool:
    with suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"p2pd" in f.read().split(b"\0")[0]
    return False


class SwarmNode:
    """One per process: a hivemind DHT node + a P2P replica whose handlers run on a background asyncio loop.

    It binds ``host`` ("IP[:PORT]", default loopback, any free port) and announces ``announce`` when others
    must dial another address (NAT). ``client_mode``: a node that only dials out (trainers): it stores and
    reads records but serves no DHT requests. ``identity`` (from new_identity()) fixes its peer id.
    ``fork_lock`` is held only while the DHT process is forked (a caller's gRPC threads must be quiet then).
    Handlers run on the loop: offload heavy compute (``asyncio.to_thread``) so calls and replies keep flowing.
    """

    def __init__(self, initial_peers: list[str] | None = None, timeouts: SwarmTimeouts | None = None,
                 host: str = "127.0.0.1", announce: str = "", client_mode: bool = False,
                 identity: bytes | None = None, fork_lock: threading.Lock | None = None):
        """`fork_lock` is held only while hivemind forks the DHT process (no gRPC call may be in flight then),
        not while it starts up, so the caller's heartbeats keep its lease alive meanwhile."""
        self.timeouts = timeouts or SwarmTimeouts()
        self._closed = False
        self._dht_lock = threading.Lock()
        self._p2pd_pids: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._p2p: P2P | None = None
        host_maddrs, announce_maddrs = listen_maddrs(host, announce)
        self._unsigned_seen: set[bytes] = set()  # subkeys of records that named no owner (anyone could write them)
        self._unsigned_new = 0
        # every node has a key of its own, known here: its records are signed with the key its peer id names
        identity = identity if identity is not None else new_identity()[0]
        self._validator = validator(identity)   # signs this node's records, checks everyone's (signed_records.py)
        self.signing_key = private_key(identity)   # signs this node's stage receipts (receipts.py)
        fd, identity_file = tempfile.mkstemp(prefix="fedswarm-p2p-", suffix=".key")
        with os.fdopen(fd, "wb") as f:   # p2pd reads the key at start; the file lives only until then
            f.write(identity)
        extra = {"identity_path": identity_file, "check_if_identity_free": False}
        if announce_maddrs:
            extra["announce_maddrs"] = announce_maddrs
        started = time.monotonic()
        try:
            with fork_lock or contextlib.nullcontext():
                self._dht = DHT(initial_peers=list(initial_peers or []) or None, start=True, await_ready=False,
                                host_maddrs=host_maddrs, startup_timeout=self.timeouts.startup_s,
                                client_mode=client_mode, record_validators=[self._validator], **extra)
            self._dht.wait_until_ready(self.timeouts.startup_s)
        except BaseException:
            if getattr(self, "_dht", None) is not None:
                self.shutdown()
            raise
        finally:
            os.unlink(identity_file)
        try:
            self._p2pd_pids = [p for p in _child_pids(self._dht.pid) if _is_p2pd(p)]
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-node-loop", daemon=True)
            self._thread.start()
            self._p2p = self.submit(self._dht.replicate_p2p()).result(self.timeouts.startup_s)
            self.peer_id: str = self._p2p.peer_id.to_base58()
            logger.info("DHT node and p2pd up in %.2f s", time.monotonic() - started)
        except BaseException:
            self.shutdown()
            raise

    # ---- loop plumbing ----

    def submit(self, coro) -> concurrent.futures.Future:
        """Run a coroutine on the node's loop; returns a concurrent future."""
        if self._closed:
            coro.close()
            raise RuntimeError("SwarmNode is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro, timeout: float):
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()

    def maddrs(self) -> list[str]:
        """Visible multiaddrs of this node (with /p2p/<id>), to hand to others as initial peers."""
        return [str(m) for m in self._run(self._p2p.get_visible_maddrs(latest=True), self.timeouts.dht_op_s)]

    # ---- stage traffic ----

    def add_handler(self, name: str, handler, input_type, gate=None) -> None:
        """Serve ``handler(request, context) -> reply`` as ``name`` (unary) and ``name + STREAM_SUFFIX`` (stream).
        With ``gate(context)``, the stream is served by `_gated_stream`: the gate runs before the request is
        read (hivemind's own stream handler reads it first); the unary path, capped at 4 MiB by p2pd, is not."""
        async def unary(request, context):
            reply = await handler(request, context)
            if reply.ByteSize() > _UNARY_REPLY_LIMIT:
                raise ValueError(f"reply of {reply.ByteSize()} bytes exceeds the unary limit; call with stream=True")
            return reply

        async def _add():
            await self._p2p.add_protobuf_handler(name, unary, input_type)
            if gate is None:
                await self._p2p.add_protobuf_handler(name + STREAM_SUFFIX, handler, input_type, stream_output=True)
            else:
                await self._p2p.add_binary_stream_handler(name + STREAM_SUFFIX,
                                                          _gated_stream(self._p2p, name, handler, input_type, gate))
        self._run(_add(), self.timeouts.startup_s)

    def call(self, peer_id: str, name: str, request, output_type, timeout: float | None = None,
             stream: bool = True):
        """Blocking call from any thread but the node's loop; raises PeerCallError."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("SwarmNode.call() would deadlock on the node's own loop; use acall()")
        deadline = self.timeouts.call_s if timeout is None else timeout
        fut = self.submit(self.acall(peer_id, name, request, output_type, deadline, stream))
        try:
            return fut.result(deadline + 1.0)  # acall enforces the deadline; this margin only guards the loop
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise PeerCallError(peer_id, "timeout", f"{name}: no reply within {deadline:.2f}s (node loop stalled)")

    async def acall(self, peer_id: str, name: str, request, output_type, timeout: float | None = None,
                    stream: bool = True):
        """Call ``name`` at ``peer_id`` on the node's loop; raises PeerCallError.

        ``stream=False`` uses hivemind's unary path: ~3x lower latency, but request and reply must fit 4 MiB.
        """
        deadline = self.timeouts.call_s if timeout is None else timeout
        try:
            pid = PeerID.from_base58(peer_id)
        except Exception as e:
            raise PeerCallError(peer_id, "error", f"bad peer id: {e!r}") from None
        coro = (self._call_stream(pid, name + STREAM_SUFFIX, request, output_type) if stream
                else self._p2p.call_protobuf_handler(pid, name, request, output_type))
        try:
            return await asyncio.wait_for(coro, deadline)
        except TimeoutError:  # asyncio.TimeoutError is TimeoutError since 3.11
            raise PeerCallError(peer_id, "timeout", f"{name}: no reply within {deadline:.2f}s") from None
        except P2PHandlerError as e:
            raise PeerCallError(peer_id, "error", f"{name}: handler failed: {e}") from None
        except (P2PDaemonError, ConnectionError, OSError, asyncio.IncompleteReadError, EOFError) as e:
            kind = "error" if any(s in str(e).lower() for s in _OUR_FAULT) else "unreachable"
            raise PeerCallError(peer_id, kind, f"{name}: {type(e).__name__}: {e}") from None

    async def _call_stream(self, pid: PeerID, name: str, request, output_type):
        responses = await self._p2p.iterate_protobuf_handler(pid, name, request, output_type)
        try:
            async for reply in responses:
                return reply
        finally:
            await responses.aclose()
        raise ConnectionError("stream closed before a reply (peer went away?)")

    # ---- DHT records ----

    def _dht_op(self, what: str, start) -> tuple[bool, object]:
        """Run a DHT op (a callable returning an MPFuture) under dht_op_s: (True, result), or (False, None) on
        timeout or failure (logged), so callers can tell "nothing stored" from "no answer"."""
        if self._closed:
            raise RuntimeError("SwarmNode is shut down")
        with self._dht_lock:  # the DHT's pipe is shared by all threads; sends are kept whole
            fut = start()
        try:
            return True, fut.result(self.timeouts.dht_op_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            logger.warning(f"DHT {what} took longer than {self.timeouts.dht_op_s:.1f}s; giving up on it")
        except Exception as e:
            logger.warning(f"DHT {what} failed: {e!r}")
        return False, None

    def announce(self, key: str, value: dict, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key`` until now + ttl (default record_ttl_s), signed: under this node's own
        owner subkey, which no other key can write (signed_records.py); True if stored."""
        expiration = get_dht_time() + (self.timeouts.record_ttl_s if ttl is None else ttl)
        _, stored = self._dht_op(f"store {key}", lambda: self._dht.store(
            key, value, expiration, subkey=self._validator.local_public_key, return_future=True))
        return bool(stored)

    def lookup(self, key: str) -> dict[str, dict] | None:
        """peer id -> value of the unexpired records under ``key`` that their peer signed ({} if none); None
        if the DHT did not answer within dht_op_s (the caller keeps what it knew: no answer is not "no
        replicas"). Entries under any other subkey are dropped and counted (take_unsigned_records)."""
        answered, found = self._dht_op(f"get {key}", lambda: self._dht.get(key, latest=True, return_future=True))
        if not answered:
            return None
        if found is None or not isinstance(found.value, dict):
            return {}
        now = get_dht_time()
        owned, unsigned = by_owner({sub: item.value for sub, item in found.value.items()
                                    if item.expiration_time > now})
        with self._dht_lock:
            fresh = {repr(sub)[:200].encode() for sub in unsigned} - self._unsigned_seen
            if len(self._unsigned_seen) < UNSIGNED_SEEN_MAX:
                self._unsigned_seen |= fresh
            self._unsigned_new += len(fresh)
        return owned

    def take_unsigned_records(self) -> int:
        """Records under a subkey no peer signed that lookups met since the last call (each counted once)."""
        with self._dht_lock:
            new, self._unsigned_new = self._unsigned_new, 0
        return new

    # ---- teardown ----

    def shutdown(self) -> None:
        """Idempotent: stop the loop thread, the P2P replica and the DHT process (its p2pd child too)."""
        if getattr(self, "_shut", False):
            return
        self._shut = True
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            if self._p2p is not None:
                with suppress(Exception):
                    asyncio.run_coroutine_threadsafe(self._p2p.shutdown(), self._loop).result(self.timeouts.shutdown_s)
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeouts.shutdown_s)
        self._closed = True
        if self._loop is not None and not self._loop.is_running():
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            with suppress(Exception):
                self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()
        if self._dht.is_alive():
            self._dht.shutdown_timeout = self.timeouts.shutdown_s
            with suppress(Exception):
                self._dht.shutdown()
            if self._dht.is_alive():
                with suppress(ProcessLookupError):
                    os.kill(self._dht.pid, signal.SIGKILL)
                self._dht.join(self.timeouts.shutdown_s)
        for pid in self._p2pd_pids:  # orphaned only if the DHT died without cleaning up
            if _is_p2pd(pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "SwarmNode":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
