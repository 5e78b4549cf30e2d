"""The Coordinator gRPC service (grpc.aio). Handlers take raw bytes and parse them here, so a
malformed request gets INVALID_ARGUMENT (stock grpcio would answer INTERNAL). Every refusal
carries its reason in the trailing metadata key `fedswarm-reason` (refusals.REASON_KEY).

The RPCs live by concern: session_rpcs.py (Join, Heartbeat, Challenge, Status), task_rpcs.py (PullTask,
FetchModel, PushEval), uploads.py (PushUpdate); what the run's mode decides, in modes.py. This module
builds them over the run's shared state and serves them."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from fedswarm.coordinator.admission import Admission
from fedswarm.coordinator.auth import Authenticator, SeenSet
from fedswarm.coordinator.config import CoordinatorTimeouts
from fedswarm.run_config import RunConfig
from fedswarm.coordinator.downloads import ServedVersions
from fedswarm.coordinator.driver import RunProgress
from fedswarm.coordinator.grid import SessionGrid
from fedswarm.coordinator.membership import Membership
from fedswarm.coordinator.modes import mode_policy
from fedswarm.coordinator.rpc import Counters, TaskBases, invalid, parse
from fedswarm.coordinator.secagg_rpcs import SecAggRpcs
from fedswarm.coordinator.serving import ServingLimits, StreamBridge
from fedswarm.coordinator.session_rpcs import SessionRpcs
from fedswarm.coordinator.status import StatusLimits, StatusReport
from fedswarm.coordinator.task_rpcs import TaskRpcs
from fedswarm.coordinator.uploads import Uploads
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.proto.refusals import Reason, Refused

SERVICE = "fedswarm.Coordinator"


class CoordinatorService:
    """The service's shared state (sessions, the grid, the run's progress, counters, served versions) and
    the RPCs over it, with the run's mode policy chosen once here."""

    def __init__(self, cfg: RunConfig, run_id: str, grid: SessionGrid, membership: Membership,
                 progress: RunProgress, timeouts: CoordinatorTimeouts,
                 auth: Authenticator | None = None, swarm=None, limits: ServingLimits | None = None,
                 state_dir: Path | None = None, status_limits: StatusLimits | None = None, privacy=None):
        self.cfg, self.run_id, self.grid, self.members, self.progress = cfg, run_id, grid, membership, progress
        auth = auth or Authenticator(None)  # None: dev mode, anyone may join
        self.counters = Counters()
        self.limits = limits or ServingLimits()
        self.admission = Admission(self.limits, self.counters.count)   # waiting shares, per-session caps
        # what clients hold of each global version; deltas from it in the download codec (swarm: full copies)
        downloads = ServedVersions(C.CodecSpec.of(cfg, "download"),
                                   persist=Path(state_dir) / "served.safetensors" if state_dir else None)
        # a version served before a crash but never committed will be re-made (from other weights) by the re-run
        downloads.forget_newer(progress.committed_round)
        bases = TaskBases(grid)
        self.mode = mode_policy(cfg, swarm, downloads, bases)
        report = StatusReport(cfg, run_id, progress, membership, self.mode.status, status_limits)
        answered = SeenSet(lambda: progress.committed_round)   # replayed answers, kept until their round is past
        self.sessions = SessionRpcs(cfg, run_id, membership, grid, progress, timeouts, auth, self.mode, self.counters,
                                    report)
        self.tasks = TaskRpcs(cfg, run_id, membership, grid, progress, timeouts, self.limits, auth, self.mode,
                              downloads, self.counters, answered)
        self.uploads = Uploads(cfg, run_id, membership, grid, progress, auth, self.mode, bases, self.counters, answered,
                               self.limits.upload_workers, privacy=privacy)
        s, t = self.sessions, self.tasks   # each RPC by its name, as the handler serves it
        self.join, self.heartbeat, self.challenge, self.status, self.status_dict = (
            s.join, s.heartbeat, s.challenge, s.status, s.status_dict)
        self.pull_task, self.fetch_model, self.push_eval = t.pull_task, t.fetch_model, t.push_eval
        self.push_update = self.uploads.push_update
        self.push_secagg = SecAggRpcs(run_id, membership, grid, auth, answered).push_secagg

    # -- plumbing --------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        """The aio handlers. Every method is served as a stream, so its handler starts with the call and reads
        the request under a deadline (admission.py); a stock unary stub sees no difference on the wire. Quick
        bodies run on the event loop; model transfers run on bounded pools."""
        ser = lambda m: m.SerializeToString()  # noqa: E731
        unary = lambda t, fn: grpc.stream_unary_rpc_method_handler(self._unary(t, fn), response_serializer=ser)  # noqa: E731
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Join": unary(pb.JoinRequest, self.join),
            "Heartbeat": unary(pb.HeartbeatRequest, self.heartbeat),
            "PullTask": unary(pb.PullTaskRequest, self.pull_task),
            "FetchModel": grpc.stream_stream_rpc_method_handler(self._unary_stream(pb.FetchModelRequest, self.fetch_model), response_serializer=ser),
            "PushUpdate": grpc.stream_unary_rpc_method_handler(self._stream_unary(self.push_update), response_serializer=ser),
            "Status": unary(pb.StatusRequest, self.status),
            "Challenge": unary(pb.ChallengeRequest, self.challenge),
            "PushEval": unary(pb.EvalResult, self.push_eval),
            "PushSecAgg": unary(pb.SecAggReply, self.push_secagg),
        })

    async def _refuse(self, context, rej: Refused) -> None:
        await self.admission.refuse(context, rej)

    def _parse_unary(self, msg_type, raw: bytes | None):
        if raw is None:
            raise invalid(Reason.NO_REQUEST, "the call carried no request message")
        if len(raw) > wire.MAX_MESSAGE_BYTES:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OVERSIZED, f"request of {len(raw)} bytes")
        return parse(msg_type, raw)

    async def _request(self, msg_type, requests, context):
        """The call's one request, read under the first-message deadline and parsed."""
        return self._parse_unary(msg_type, await self.admission.first_message(requests, context, Reason.SLOW_REQUEST))

    def _session_slot(self, client_id: int, token: str):
        """A slot of the session's calls in flight while a call with a valid session runs (else no limit here:
        the body refuses the session)."""
        if client_id and self.members.check(client_id, token) is not None:
            return self.admission.session_call(client_id)
        return contextlib.nullcontext()

    def _unary(self, msg_type, fn: Callable) -> Callable:
        async def read_then_call(requests, context):
            try:
                req = await self._request(msg_type, requests, context)
                with self._session_slot(getattr(req, "client_id", 0), getattr(req, "session_token", "")):
                    result = fn(req, context)
                    return await result if asyncio.iscoroutine(result) else result
            except Refused as rej:
                await self._refuse(context, rej)
        return read_then_call

    def _unary_stream(self, msg_type, fn: Callable) -> Callable:
        """The body builds its iterator on a worker thread; each item is made there too; writing waits on
        flow control without a thread, so a slow reader holds none."""
        async def read_then_stream(requests, context):
            loop, done = asyncio.get_running_loop(), object()
            try:
                req = await self._request(msg_type, requests, context)
                with self._session_slot(req.client_id, req.session_token):
                    items = await loop.run_in_executor(self.limits.cpu_pool, fn, req, context)
                    while (item := await loop.run_in_executor(self.limits.cpu_pool, next, items, done)) is not done:
                        await context.write(item)
            except Refused as rej:
                await self._refuse(context, rej)
        return read_then_stream

    def _stream_unary(self, fn: Callable) -> Callable:
        """The header must come within limits.first_message_s, waited for on the loop (an idle stream holds no
        thread); then the body consumes the stream on an upload worker, each further message within
        limits.chunk_idle_s and all of it within limits.upload_s. One stream per open task: a newer one for
        the same task ends the older."""
        async def first_then_consume(requests, context):
            loop = asyncio.get_running_loop()
            try:
                first = await self.admission.first_message(requests, context, Reason.SLOW_HEADER)
                bridge = StreamBridge(first, requests, loop, self.limits.chunk_idle_s, self.limits.upload_s)
                owner = self._upload_owner(first)
                with contextlib.ExitStack() as held:
                    if owner is not None:
                        held.enter_context(self.admission.session_call(owner[0]))
                        held.enter_context(self.admission.only_upload(*owner, bridge))
                    return await loop.run_in_executor(self.limits.upload_pool, fn, bridge, context)
            except Refused as rej:
                await self._refuse(context, rej)

        return first_then_consume

    def _upload_owner(self, first: bytes | None) -> tuple[int, str] | None:
        """(session, task) of an upload whose header names a valid session; None leaves it to the body to refuse."""
        try:
            head = pb.UpdateChunk.FromString(first) if first and len(first) <= wire.MAX_MESSAGE_BYTES else None
        except (DecodeError, RuntimeError, ValueError):
            return None
        if head is None or head.WhichOneof("kind") != "header":
            return None
        h = head.header
        if self.members.check(h.client_id, h.session_token) is None:
            return None
        return h.client_id, h.task_id[:64]

