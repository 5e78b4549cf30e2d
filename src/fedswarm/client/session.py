"""One client session with the coordinator: join, re-join, heartbeats, credentials, retries.

What the session's tasks mean is its role's (`Role`: federated, evaluator, peer, trainer); the session knows
none of them. `aio_session.AsyncSession` is the same contract on a `grpc.aio` channel: both take their
retry policy, channel options and heartbeat interval from here."""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from fedswarm.client.identity import Identity, open_channel, signed_join_fields
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals, wire
from fedswarm.run_config import RunConfig
from fedswarm.settings import opt

log = logging.getLogger("fedswarm.client")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
DEFAULT_HEARTBEAT_S = 2.0   # until a join says otherwise
BEATS_PER_LEASE = 3         # a heartbeat at most every lease/3: two may be lost before the lease lapses


@dataclass
class ClientTimeouts:
    """Every wait the daemon does, named; each is a flag of `fedswarm client` and a key of [client]."""

    rpc_s: float = opt(30.0, "seconds a unary call to the coordinator may take", flag="--rpc-timeout", metavar="S")
    pull_wait_s: float = opt(10.0, "seconds a task long-poll asks the coordinator to wait",
                             flag="--pull-wait", metavar="S")
    transfer_s: float = opt(300.0, "seconds a model download or an update upload may take",
                            flag="--transfer-timeout", metavar="S")
    backoff_initial_s: float = opt(0.5, "first retry delay while the coordinator is unreachable (doubles)",
                                   flag="--backoff-initial", metavar="S")
    backoff_max_s: float = opt(10.0, "longest retry delay while the coordinator is unreachable",
                               flag="--backoff-max", metavar="S")
    give_up_s: float = opt(0.0, "stop retrying after this many seconds unreachable (0: never)",
                           flag="--give-up-after", metavar="S")
    pending_s: float = opt(120.0, "seconds to keep re-sending an update the coordinator calls early",
                           flag="--pending-timeout", metavar="S")
    unknown_retries: int = opt(3, "times a call that hit an unexpected coordinator error (UNKNOWN) is retried",
                               flag="--unknown-retries", metavar="N")


def channel_options(t: ClientTimeouts, own_connection: bool = False) -> list[tuple[str, int]]:
    """The options of every channel a session opens (sync or aio). `own_connection`: one connection per
    session, as separate client hosts would have (the virtual clients of one process)."""
    options = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
               ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096),
               # gRPC's own reconnect backoff (1 s growing to 120 s) would otherwise override backoff_max_s
               ("grpc.initial_reconnect_backoff_ms", int(t.backoff_initial_s * 1000)),
               ("grpc.max_reconnect_backoff_ms", int(t.backoff_max_s * 1000))]
    return options + [("grpc.use_local_subchannel_pool", 1)] if own_connection else options


def heartbeat_every(interval_s: float, lease_s: float) -> float:
    """Seconds between heartbeats: the coordinator's interval, but never more than a third of its lease."""
    every = interval_s if interval_s > 0 else DEFAULT_HEARTBEAT_S
    return min(every, lease_s / BEATS_PER_LEASE) if lease_s > 0 else every


@dataclass(frozen=True)
class RetryPolicy:
    """One retry rule for every session call: capped exponential backoff with jitter, on transient codes
    and "retry soon" reasons; a few tries on UNKNOWN; give up after give_up_s (0: never), and on an
    ABORTED ("come back shortly") that never resolves, after pending_s."""

    initial_s: float = 0.5
    max_s: float = 10.0
    give_up_s: float = 0.0
    pending_s: float = 120.0
    unknown_retries: int = 3

    @classmethod
    def of(cls, t: ClientTimeouts) -> "RetryPolicy":
        return cls(t.backoff_initial_s, t.backoff_max_s, t.give_up_s, t.pending_s, t.unknown_retries)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt `attempt` (0-based): initial x 2^attempt, jittered x[0.5, 1.5], capped."""
        base = min(self.initial_s * 2 ** min(attempt, 64), self.max_s)
        return min(base * (rng or random).uniform(0.5, 1.5), self.max_s)

    def start(self) -> "Retrying":
        return Retrying(self)


class Retrying:
    """One call's retries under a policy: `wait_after(err)` is the delay before the next try, or None: raise."""

    def __init__(self, policy: RetryPolicy):
        self.policy, self.started, self.attempt, self.unknown = policy, time.monotonic(), 0, 0

    def wait_after(self, err: grpc.RpcError) -> float | None:
        p, code, why = self.policy, err.code(), refusals.reason(err)
        self.unknown += code == grpc.StatusCode.UNKNOWN
        transient = code in RETRYABLE or why in refusals.RETRY_SOON or \
            (code == grpc.StatusCode.UNKNOWN and self.unknown <= p.unknown_retries)
        elapsed = time.monotonic() - self.started
        if not transient or why in refusals.FINAL or (p.give_up_s and elapsed > p.give_up_s):
            return None
        if code == grpc.StatusCode.ABORTED and elapsed > p.pending_s:
            return None   # "come back shortly" that never resolves: give the work up
        self.attempt += 1
        return p.delay(self.attempt - 1)


def retry(what: str, call, policy: RetryPolicy, sleep: Callable[[float], object] = time.sleep):
    """Call until it succeeds or the policy gives up (then its last error is raised)."""
    tries = policy.start()
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            wait = tries.wait_after(err)
            if wait is None:
                raise
            log.warning("%s failed (%s: %s); retrying in %.1f s", what, err.code().name, err.details(), wait)
            sleep(wait)


class JoinRefused(Exception):
    """The coordinator does not accept this client's key or proof: retrying will not help."""


class SessionReplaced(Exception):
    """Another daemon joined with this client's key; only one may run per key, so this one stops."""


@dataclass(frozen=True)
class Credentials:
    """The session the coordinator gave this client; a re-join swaps the whole object at once, so a request
    built from one snapshot never pairs one session's id with another's token."""

    client_id: int = 0
    token: str = ""
    run_id: str = ""

    def ids(self) -> dict:
        """The session fields of a request."""
        return {"client_id": self.client_id, "session_token": self.token}


class Role(Protocol):
    """What a session's work means: federated client, evaluator, swarm peer or trainer. The session sets
    `session` before it joins, calls `setup` once after the first join (heartbeats already run),
    `heartbeat_fields` and `on_heartbeat` on its heartbeat thread, then `run` and finally `close`."""

    name: str          # the JoinRequest role
    p2p_peer_id: str   # swarm roles: the libp2p peer id the signed join binds ("" otherwise)
    session: "Session"

    def setup(self, cfg: RunConfig) -> None: ...
    def on_task(self, task: pb.Task) -> None: ...
    def heartbeat_fields(self) -> dict: ...
    def on_heartbeat(self, reply: pb.HeartbeatReply) -> None: ...
    def run(self) -> int: ...
    def close(self) -> None: ...


class Session:
    """A client's session with the coordinator on a synchronous channel; a heartbeat thread keeps its lease."""

    def __init__(self, coordinator: str, name: str, role: Role | None = None, *, timeouts: ClientTimeouts | None = None,
                 device: str = "cpu", precision: str = "bf16", identity: Identity | None = None,
                 tls_ca: str | None = None):
        self.name, self.role, self.device, self.precision = name, role, device, precision
        self.role_name = role.name if role is not None else "client"
        self.t = timeouts or ClientTimeouts()
        self.policy = RetryPolicy.of(self.t)
        self.identity = identity   # signs joins and updates
        self.channel = open_channel(coordinator, tls_ca, options=channel_options(self.t))
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self._push_raw = self.channel.stream_unary(  # PushUpdate taking pre-serialized UpdateChunks
            "/fedswarm.Coordinator/PushUpdate", request_serializer=None, response_deserializer=pb.PushReply.FromString)
        self._creds, self._creds_lock = Credentials(), threading.Lock()
        self.joined = pb.JoinReply()   # the last join's reply (swarm roles read the stage and roster from it)
        self.run_cfg: RunConfig | None = None   # the run contract, from the first join
        self.heartbeat_s, self.lost_leases = DEFAULT_HEARTBEAT_S, 0
        self._hb_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._join_lock = threading.RLock()
        # hivemind starts its DHT with fork(): a gRPC call in flight at that moment leaves a held mutex in the
        # child (abseil "Check w->waitp->cond == nullptr failed"). Calls from background threads take this
        # lock, and so does whoever forks.
        self.fork_guard = threading.Lock()
        if role is not None:
            role.session = self

    @property
    def creds(self) -> Credentials:
        """A consistent snapshot of the session's id, token and run id."""
        with self._creds_lock:
            return self._creds

    @property
    def beat_timeout_s(self) -> float:
        """A heartbeat waits as long as any unary call: the coordinator renews the lease when it handles the
        beat, so a deadline cut to the lease would only cancel renewals queued behind load (and lose leases)."""
        return self.t.rpc_s

    def with_retry(self, what: str, call):
        """Call until it succeeds; the session's retry policy while the coordinator is unreachable."""
        return retry(what, call, self.policy)

    # -- join ----------------------------------------------------------------------------
    def join(self) -> None:
        """Join, or re-join keeping the id while the coordinator still knows the old session."""
        with self._join_lock:
            reply = self._join_reply()
            if self.creds.run_id and reply.run_id != self.creds.run_id:
                raise RuntimeError(f"the coordinator now serves run {reply.run_id}, not {self.creds.run_id}; "
                                   f"restart the client")
            with self._creds_lock:
                self._creds = Credentials(reply.client_id, reply.session_token, reply.run_id)
                self.joined = reply
                self.heartbeat_s = heartbeat_every(reply.heartbeat_interval_s, reply.lease_s)
            if self._heartbeat is None:  # before any slow setup: the lease must not lapse while the role loads
                self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
                self._heartbeat.start()
            if self.run_cfg is None:
                self.run_cfg = RunConfig.from_json(reply.run_config_json)
                if self.role is not None:
                    self.role.setup(self.run_cfg)
            log.info("joined run %s as %s (id %d) on %s/%s", reply.run_id, self.name, reply.client_id, self.device,
                     self.precision)

    def _join_reply(self) -> pb.JoinReply:
        peer_id = getattr(self.role, "p2p_peer_id", "")

        def attempt():  # a fresh challenge and nonce per attempt: a resent proof would count as a replay
            proof = signed_join_fields(self.stub, self.identity, self.name, self.role_name, self.t.rpc_s, peer_id)
            c = self.creds
            req = pb.JoinRequest(name=self.name, device=self.device, precision=self.precision,
                                 resume_client_id=c.client_id, resume_token=c.token, role=self.role_name,
                                 p2p_peer_id=peer_id, **proof)
            return self.stub.Join(req, timeout=self.t.rpc_s)
        for tries in range(1, 4):
            try:
                return self.with_retry("join", attempt)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                why = refusals.reason(err)
                if why in refusals.RETRY_JOIN and tries < 3:  # the coordinator restarted between challenge and join
                    log.warning("join refused (%s); signing a fresh challenge", why)
                    continue
                hint = "" if self.identity else " (this client has no --key)"
                raise JoinRefused(f"the coordinator refused to let {self.name} join ({why or err.code().name}): "
                                  f"{err.details()}{hint}") from None
        raise AssertionError("unreachable")

    def rejoin(self, why: str, what: str = "refused") -> None:
        self.lost_leases += 1
        log.warning("%s (%s): the coordinator no longer knows this session; joining again", what, why)
        self.join()

    # -- heartbeats ----------------------------------------------------------------------
    def heartbeat_request(self) -> pb.HeartbeatRequest:
        fields = self.role.heartbeat_fields() if self.role is not None else {}
        return pb.HeartbeatRequest(**self.creds.ids(), **fields)

    def beat(self) -> pb.HeartbeatReply:
        """One heartbeat (raises the call's error)."""
        with self.fork_guard:
            return self.stub.Heartbeat(self.heartbeat_request(), timeout=self.beat_timeout_s)

    def _heartbeat_loop(self) -> None:
        next_at = time.monotonic() + self.heartbeat_s
        # at a fixed rate from each beat's start: a slow reply delays the next beat by nothing
        while not self._hb_stop.wait(max(0.0, next_at - time.monotonic())):
            next_at = time.monotonic() + self.heartbeat_s
            try:
                reply = self.beat()
            except grpc.RpcError as err:
                self._beat_failed(err)
                continue
            if self.role is not None:
                try:
                    self.role.on_heartbeat(reply)
                except Exception:  # noqa: BLE001 - keep the heartbeat alive whatever a hook does
                    log.exception("heartbeat hook failed")

    def _beat_failed(self, err: grpc.RpcError) -> None:
        why = refusals.reason(err)
        if why in refusals.REJOIN and not self._hb_stop.is_set():
            try:
                self.rejoin(why, "heartbeat refused")
            except Exception:  # noqa: BLE001 - the next beat tries again
                log.exception("re-join from the heartbeat failed")
        elif why == refusals.REPLACED:
            log.error("heartbeat refused (%s): %s", why, err.details())
            self._hb_stop.set()
        else:
            log.debug("heartbeat failed: %s %s", err.code().name, why)

    # -- tasks ---------------------------------------------------------------------------
    def pull(self) -> pb.Task:
        """Long-poll for the next task (TASK_NONE when none came within pull_wait_s)."""
        return self.with_retry("pull task", lambda: self.stub.PullTask(
            pb.PullTaskRequest(**self.creds.ids(), wait_s=self.t.pull_wait_s),
            timeout=self.t.pull_wait_s + self.t.rpc_s))

    def push(self, chunks: list[bytes]) -> pb.PushReply:
        """Stream an encoded update (client/work.py's update_stream), retried while unreachable."""
        return self.with_retry("upload", lambda: self._push_raw(iter(chunks), timeout=self.t.transfer_s))

    def serve_tasks(self) -> int:
        """Pull tasks and hand each to the role until the run is done; re-join when the session is lost."""
        while True:
            try:
                task = self.pull()
                if task.kind == pb.TASK_DONE:
                    log.info("run finished at round %d; exiting", task.round)
                    return 0
                if task.kind != pb.TASK_NONE:
                    self.role.on_task(task)
            except grpc.RpcError as err:
                why = refusals.reason(err)
                if why in refusals.REJOIN:
                    self.rejoin(why)
                elif why == refusals.REPLACED:
                    raise SessionReplaced(f"{err.details()} (refused: {why})") from None
                elif err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):
                    log.warning("task dropped (%s): %s", why or err.code().name, err.details())
                else:
                    raise

    def run(self) -> int:
        """Join (the role sets up), run the role, then close."""
        try:
            self.join()
            return self.role.run()
        finally:
            self.close()

    def stop_heartbeats(self) -> None:
        self._hb_stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=self.beat_timeout_s + 1.0)

    def close(self) -> None:
        """Stop the heartbeats, close the role, then the channel."""
        self.stop_heartbeats()
        try:
            if self.role is not None:
                self.role.close()
        finally:
            self.channel.close()
