"""The Coordinator gRPC service (grpc.aio). Handlers take raw bytes and parse them here, so a
malformed request gets INVALID_ARGUMENT (stock grpcio would answer INTERNAL). Every refusal
carries its reason in the trailing metadata key `fedswarm-reason` (refusals.REASON_KEY)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from google.protobuf.message import DecodeError

from fedswarm.coordinator.aggregate import ArraysView, DecodedUpdate
from fedswarm.coordinator.auth import AuthError, Authenticator, SeenSet
from fedswarm.coordinator.config import CoordinatorTimeouts, RunConfig
from fedswarm.coordinator.downloads import ServedVersions, full_copy, model_chunks
from fedswarm.coordinator.driver import RunProgress
from fedswarm.coordinator.grid import LongPoll, SessionGrid
from fedswarm.coordinator.integrity import Inadmissible, UpdateNormBound, check_values, l2_norm
from fedswarm.coordinator.membership import Member, Membership, SessionsFull
from fedswarm.coordinator.privacy import clip_limit
from fedswarm.coordinator.admission import Admission, peer_host
from fedswarm.coordinator.serving import ServingLimits, StreamBridge
from fedswarm.coordinator.status import StatusLimits, StatusReport
from fedswarm.coordinator.swarm_registry import PEER_ID
from fedswarm.metrics import counted_down
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import refusals, signing, wire
from fedswarm.proto.refusals import Reason, Refused

log = logging.getLogger(__name__)
SERVICE = "fedswarm.Coordinator"
MAX_NAME = 128
MAX_UPDATE_BYTES_FACTOR = 1.5   # an update stream may not exceed 1.5x the model's fp32 size (+1 MiB)
DECODE_BUDGET_BYTES = 2 << 30    # uploads checked and folded at once: this over the model's fp32 size (at least 1)
MAX_EVAL_LOSS = 1e4             # nats per token; a real model's loss is far below (a uniform 2^20 vocab: 13.9)


def invalid(reason: Reason, detail: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, reason, detail)


def unauthenticated(err: AuthError) -> Refused:
    """A refused proof; too many unexpired proofs is RESOURCE_EXHAUSTED (retry shortly), not a bad identity."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if err.reason in refusals.RETRY_SOON else grpc.StatusCode.UNAUTHENTICATED
    return Refused(code, err.reason, err.detail)


class CoordinatorService:
    def __init__(self, cfg: RunConfig, run_id: str, grid: SessionGrid, membership: Membership,
                 progress: RunProgress, timeouts: CoordinatorTimeouts,
                 auth: Authenticator | None = None, swarm=None, limits: ServingLimits | None = None,
                 state_dir: Path | None = None, status_limits: StatusLimits | None = None):
        self.cfg, self.run_id, self.grid, self.members = cfg, run_id, grid, membership
        self.auth = auth or Authenticator(None)  # None: dev mode, anyone may join
        # replayed-update guards, each item kept until a round after its own commits (auth.SeenSet)
        self._answered = SeenSet(lambda: progress.committed_round)
        self._seen_signatures = SeenSet(lambda: progress.committed_round)
        self.progress, self.timeouts = progress, timeouts
        self.swarm = swarm  # SwarmContext in --mode swarm: registry, driver, DHT peers
        self.report = StatusReport(cfg, run_id, progress, membership, swarm, status_limits)
        self.upload = C.CodecSpec.of(cfg, "upload")   # what every update's parts must be encoded with
        self.rejections: collections.Counter[str] = collections.Counter()  # under _counter_lock
        self.clipped_updates = 0                                            # under _counter_lock
        self.norm_bound = UpdateNormBound(cfg.max_update_norm_ratio)       # recent accepted norms (integrity.py)
        self._counter_lock = threading.Lock()
        self.limits = limits or ServingLimits()
        self.admission = Admission(self.limits, self.count)   # waiting shares, per-session caps (admission.py)
        self._base_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._cache_lock = threading.Lock()
        self._fold_slots: threading.BoundedSemaphore | None = None   # sized by the model at the first upload
        # what clients hold of each global version; deltas from it in the download codec (swarm: full copies)
        self.downloads = ServedVersions(C.CodecSpec.of(cfg, "download"),
                                        persist=Path(state_dir) / "served.safetensors" if state_dir else None)
        # a version served before a crash but never committed will be re-made (from other weights) by the re-run
        self.downloads.forget_newer(progress.committed_round)
        self._bytes_down: dict[str, int] = {}   # task id -> bytes of ModelChunk messages sent for it

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
        })

    def count(self, reason: Reason) -> None:
        with self._counter_lock:
            self.rejections[Reason(reason).value] += 1

    async def _refuse(self, context, rej: Refused) -> None:
        await self.admission.refuse(context, rej)

    def _parse_unary(self, msg_type, raw: bytes | None):
        if raw is None:
            raise invalid(Reason.NO_REQUEST, "the call carried no request message")
        if len(raw) > wire.MAX_MESSAGE_BYTES:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OVERSIZED, f"request of {len(raw)} bytes")
        return _parse(msg_type, raw)

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

    def _session(self, client_id: int, token: str) -> Member:
        member = self.members.check(client_id, token)
        if member is None:
            if self.members.was_replaced(client_id):
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.SESSION_REPLACED,
                              "a newer session joined with this client's key: only one daemon per key may run")
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.BAD_SESSION,
                          "unknown client or session token: join again")
        return member

    # -- RPCs ------------------------------------------------------------------------
    def join(self, req: pb.JoinRequest, context) -> pb.JoinReply:
        if not req.name or len(req.name) > MAX_NAME or not req.name.isprintable():
            raise invalid(Reason.BAD_NAME, f"name must be 1..{MAX_NAME} printable characters")
        if len(req.device) > MAX_NAME or len(req.precision) > 16:
            raise invalid(Reason.BAD_JOIN, "device/precision field too long")
        role = req.role or "client"
        try:
            key_name = self.auth.check_join(req.name, role[:16], req.public_key, req.signature, req.challenge, req.nonce,
                                            p2p_peer_id=req.p2p_peer_id)
        except AuthError as err:
            log.warning("refused join of %r: %s", req.name, err.reason)
            raise unauthenticated(err) from None
        allowed = ("peer", "trainer") if self.swarm else ("client", "evaluator")
        if role not in allowed:
            raise invalid(Reason.BAD_ROLE, f"role {role[:16]!r} does not fit this {self.cfg.mode} run (use {' or '.join(allowed)})")
        if role == "evaluator" and self.cfg.evaluate == "central":
            raise invalid(Reason.BAD_ROLE, "this run evaluates on the coordinator only (--evaluate central): an evaluator "
                          "would never be asked; start the run with --evaluate clients or both, or run a client")
        try:
            member, resumed = self.members.join(req.name, req.device, req.precision,
                                                req.resume_client_id, req.resume_token,
                                                public_key=bytes(req.public_key) if self.auth.enabled else b"",
                                                role=role, address=peer_host(context.peer()))
        except SessionsFull as err:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_MANY_SESSIONS, str(err)) from None
        if member.replaced:  # one live session per key: the older one was dropped (its tasks failed)
            self.count(Reason.REPLACED_SESSION)
            log.warning("client %s joined with the key of session %d, which it replaces", req.name, member.replaced)
        stage = -1
        if self.swarm:
            if req.p2p_peer_id and not PEER_ID.fullmatch(req.p2p_peer_id):
                raise invalid(Reason.BAD_PEER_ID, "p2p_peer_id must be a base58 libp2p peer id")
        if role == "peer":
            stage = self.swarm.registry.stage(member.client_id)
            if stage < 0:
                stage = self.swarm.registry.assign(member.client_id, member.name, req.p2p_peer_id)
        elif role == "trainer":
            self.swarm.registry.add_trainer(member.client_id, member.name, req.p2p_peer_id)
        if resumed:
            self.grid.requeue_for(member.client_id)
        log.info("client %s %s as %d%s", req.name, "re-joined" if resumed else "joined", member.client_id,
                 f" (key {key_name})" if key_name else "")
        return pb.JoinReply(client_id=member.client_id, session_token=member.token, run_id=self.run_id,
                            run_config_json=self.cfg.to_json(),
                            heartbeat_interval_s=self.timeouts.heartbeat_interval_s, lease_s=self.timeouts.lease_s,
                            dht_peers=self.swarm.dht_peers if self.swarm else [], stage=stage,
                            roster=self.swarm.registry.roster() if self.swarm else None)

    def heartbeat(self, req: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        member = self._session(req.client_id, req.session_token)
        stage = -1
        if self.swarm and member.role == "peer":
            if not (math.isfinite(req.throughput) and req.throughput >= 0):
                raise invalid(Reason.BAD_HEARTBEAT, "throughput must be a finite number >= 0")
            if not (math.isfinite(req.switch_s) and req.switch_s >= 0):
                raise invalid(Reason.BAD_HEARTBEAT, "switch_s must be a finite number of seconds >= 0")
            self.swarm.registry.report_peer(member.client_id, req.throughput, int(req.optimizer_steps),
                                            req.load if math.isfinite(req.load) else 0.0, serving=req.stage,
                                            refused=dict(req.refused), switch_s=req.switch_s)
            stage = self.swarm.registry.stage(member.client_id)
        elif self.swarm and member.role == "trainer":
            self.swarm.registry.report_trainer(member.client_id, member.name, int(req.microbatches_completed),
                                               int(req.microbatches_retried), int(req.microbatches_lost), int(req.tokens),
                                               req.train_loss if math.isfinite(req.train_loss) and req.train_loss > 0 else None,
                                               refused=dict(req.refused))
        return pb.HeartbeatReply(state=self.progress.state, round=self.progress.committed_round, stage=stage,
                                 roster=self.swarm.registry.roster() if self.swarm else None)

    async def pull_task(self, req: pb.PullTaskRequest, context) -> pb.Task:
        member = self._session(req.client_id, req.session_token)
        if not math.isfinite(req.wait_s) or req.wait_s < 0:
            raise invalid(Reason.BAD_WAIT, "wait_s must be a finite number >= 0")
        if self.progress.done.is_set():
            return pb.Task(kind=pb.TASK_DONE, round=self.progress.committed_round)
        poll = LongPoll()   # a session holds limits.max_polls_per_session: a newer poll answers its oldest
        msg = await self.grid.take_task_async(member.client_id, min(req.wait_s, self.timeouts.max_pull_wait_s),
                                              poll, max_polls=self.limits.max_polls_per_session)
        if poll.superseded:
            self.count(Reason.POLL_SUPERSEDED)
        if not context.cancelled():  # the long-poll renews the lease too, unless the client went away meanwhile
            self.members.check(req.client_id, req.session_token)
        if msg is None:
            kind = pb.TASK_DONE if self.progress.done.is_set() else pb.TASK_NONE
            return pb.Task(kind=kind, round=self.progress.committed_round)
        config = dict(msg.content["config"]) if "config" in msg.content else {}
        kind = pb.TASK_EVALUATE if _is_evaluate(msg) else pb.TASK_TRAIN
        return pb.Task(kind=kind, task_id=msg.metadata.message_id, round=int(msg.metadata.group_id or config.get("server-round", 0)),
                       config_json=json.dumps(config), num_tensors=len(msg.content["arrays"]))

    def fetch_model(self, req: pb.FetchModelRequest, context) -> Iterator[pb.ModelChunk]:
        member = self._session(req.client_id, req.session_token)
        max_bytes = min(req.max_part_bytes or wire.MAX_PART_BYTES, wire.MAX_PART_BYTES)
        if max_bytes < 1024:
            raise invalid(Reason.BAD_PART_SIZE, "max_part_bytes must be >= 1024")
        if not req.task_id and req.stage > 0:  # swarm: a stage's latest committed average
            if not self.swarm or req.stage > len(self.swarm.driver.stage_names):
                raise invalid(Reason.BAD_STAGE, f"no stage {req.stage - 1} in this run")
            base = self.swarm.driver.stage_state(req.stage - 1)
            if base is None:
                raise Refused(grpc.StatusCode.UNAVAILABLE, Reason.NOT_READY,
                              "the coordinator is still loading the swarm's stages: retry shortly")
        elif self.swarm:  # a stage average: the stages of one round differ, so no version chain
            base = self._base_state(req.task_id, self._open_task(req.task_id, member))
        else:
            msg = self._open_task(req.task_id, member)
            return counted_down(self._count_down(req.task_id, self._download(req, msg, max_bytes)))
        return counted_down(pb.ModelChunk(part=p) for p in wire.state_parts(base, full_copy, max_bytes))

    def _download(self, req: pb.FetchModelRequest, msg: Message, max_bytes: int) -> Iterator[pb.ModelChunk]:
        """The task's version as-served: encoded steps from the version the client holds, else a full copy."""
        version = _task_version(msg)
        served = self.downloads.served(version, self._base_state(req.task_id, msg))
        steps = self.downloads.chain(version, req.held_version, bytes(req.held_digest)) if req.has_version else None
        yield from model_chunks(served, steps, max_bytes)

    def _count_down(self, task_id: str, chunks: Iterator[pb.ModelChunk]) -> Iterator[pb.ModelChunk]:
        for chunk in chunks:
            with self._cache_lock:
                self._bytes_down[task_id] = self._bytes_down.get(task_id, 0) + chunk.ByteSize()
            yield chunk

    def push_update(self, chunks: Iterator[bytes], context) -> pb.PushReply:
        received = 0
        first = next(chunks, None)
        if first is None:
            raise invalid(Reason.EMPTY_STREAM, "PushUpdate stream carried no header")
        received += len(first)
        head = _parse(pb.UpdateChunk, first)
        if head.WhichOneof("kind") != "header":
            raise invalid(Reason.NO_HEADER, "the first UpdateChunk must be a header")
        h = head.header
        member = self._session(h.client_id, h.session_token)
        if (member.client_id, h.task_id) in self._answered or bytes(h.signature) in self._seen_signatures:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.REPLAYED_UPDATE,
                          f"an update for task {h.task_id[:64]!r} was already delivered (replay)")
        if self.auth.enabled and len(h.signature) != signing.SIGNATURE_BYTES:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.BAD_SIGNATURE,
                          "the update is not signed: start the client with --key")
        msg = self.grid.open_instruction(h.task_id, member.client_id) or self._adopt(h, member)
        if msg is None:
            msg = self._open_task(h.task_id, member)   # raises FAILED_PRECONDITION
        task_id = msg.metadata.message_id            # differs from h.task_id when adopted after a restart
        if _is_evaluate(msg):
            raise invalid(Reason.WRONG_TASK_KIND, "this task asks for an evaluation: answer it with PushEval, not an update")
        base = self._base_state(task_id, msg)
        if h.base_digest and h.base_digest != self._served_digest(msg):
            raise invalid(Reason.BAD_BASE, "the update was trained from weights other than this task's model: "
                          "download the task's model again")
        spec = {n: tuple(t.shape) for n, t in base.items()}  # what this task's model (or stage) holds
        raw_update_bytes = 4 * sum(math.prod(shape) for shape in spec.values())
        max_update_bytes = int(raw_update_bytes * MAX_UPDATE_BYTES_FACTOR) + (1 << 20)
        expected_parts = wire.count_parts(spec, self.upload)
        if h.num_parts != expected_parts:
            raise invalid(Reason.BAD_PART_COUNT, f"num_parts {h.num_parts}, expected {expected_parts} "
                          f"for codec {self.cfg.upload_codec}")
        if not math.isfinite(h.train_loss) or h.num_examples == 0 or h.num_examples > 10**9:
            raise invalid(Reason.BAD_HEADER, "train_loss must be finite and num_examples in 1..1e9")
        assembler = wire.PartAssembler(spec, {self.upload}, keep_encoded=True)  # decoded tensor by tensor when folded
        digest = signing.UpdateDigest(h.num_examples, h.train_loss, h.num_parts)
        parts = 0
        for raw in chunks:
            received += len(raw)
            if received > max_update_bytes:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OVERSIZED,
                              f"update stream over {max_update_bytes} bytes")
            chunk = _parse(pb.UpdateChunk, raw)
            if chunk.WhichOneof("kind") != "part":
                raise invalid(Reason.BAD_CHUNK, "only TensorPart chunks may follow the header")
            digest.add_chunk(raw)
            parts += 1
            if parts > h.num_parts:
                raise invalid(Reason.BAD_PART_COUNT, f"more than the announced {h.num_parts} parts")
            try:
                assembler.add(chunk.part)
            except wire.WireError as err:
                raise invalid(Reason.BAD_TENSOR, str(err)) from None
        try:  # the task's own round, so a signature for another round cannot verify
            self.auth.check_update(member.public_key, h.signature, self.run_id, _task_round(msg),
                                   member.client_id, h.task_id, digest.digest())
        except AuthError as err:
            log.warning("refused update from %s for task %s: %s", member.name, h.task_id[:64], err.reason)
            raise unauthenticated(err) from None
        try:
            delta = assembler.finish()
        except wire.WireError as err:
            raise invalid(Reason.INCOMPLETE, str(err)) from None
        with self._fold_slot(raw_update_bytes):   # each decodes tensor by tensor: their transients add up
            delta = self._clip(delta)
            norm = self._admit(msg, base, delta)   # finite, bounded, within --max-update-norm-ratio (integrity.py)
            update = DecodedUpdate(base, delta, client=ConfigRecord({"name": member.name}), metrics=MetricRecord({
                "num-examples": self._weight(msg, h), "train_loss": float(h.train_loss),
                "bytes-up": int(received), "bytes-up-raw": int(raw_update_bytes),
                "bytes-down": self._bytes_down_of(task_id, h.task_id), "bytes-down-raw": int(raw_update_bytes),
                "train-seconds": float(h.train_seconds)}))
            try:
                delivered = self.grid.deliver_update(task_id, member.client_id, update)  # folded or spilled
            except Inadmissible as err:   # the fold's own overflow check
                raise invalid(err.reason, err.detail) from None
        if not delivered:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, Reason.TASK_CLOSED, "the task closed while uploading")
        self.norm_bound.accept(_norm_key(msg), norm)
        self._answered.add((member.client_id, h.task_id))
        self._answered.add((member.client_id, task_id))
        if h.signature:
            self._seen_signatures.add(bytes(h.signature))
        self.members.count_round(member)
        with self._cache_lock:
            self._base_cache.pop(task_id, None)
        return pb.PushReply(accepted=True, message="ok", bytes_received=received)

    def push_eval(self, req: pb.EvalResult, context) -> pb.PushReply:
        """A client's answer to a TASK_EVALUATE task: its held-out loss and the tokens it scored (bounded by the
        run's --eval-windows x --seq-len, so no evaluator outweighs the others by claiming more), or why it
        cannot evaluate (a failed reply, so the round does not wait for it)."""
        member = self._session(req.client_id, req.session_token)
        if (member.client_id, req.task_id) in self._answered:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.REPLAYED_UPDATE,
                          f"an answer for task {req.task_id[:64]!r} was already delivered (replay)")
        if self.auth.enabled and len(req.signature) != signing.SIGNATURE_BYTES:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.BAD_SIGNATURE,
                          "the evaluation result is not signed: start the client with --key")
        msg = self._open_task(req.task_id, member)
        if not _is_evaluate(msg):
            raise invalid(Reason.WRONG_TASK_KIND, "this task asks for training: answer it with PushUpdate")
        self._check_eval(req, msg)
        try:
            self.auth.check_update(member.public_key, req.signature, self.run_id, _task_round(msg), member.client_id,
                                   req.task_id, signing.eval_digest(req.loss, req.tokens))
        except AuthError as err:
            raise unauthenticated(err) from None
        if req.error:
            log.warning("%s cannot evaluate round %d: %s", member.name, _task_round(msg), req.error)
            delivered = self.grid.deliver_error(req.task_id, member.client_id, f"{member.name}: {req.error}")
        else:
            delivered = self.grid.deliver_reply(req.task_id, member.client_id, RecordDict({
                "metrics": MetricRecord({"eval_loss": float(req.loss), "num-examples": int(req.tokens)}),
                "client": ConfigRecord({"name": member.name})}))
        if not delivered:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, Reason.TASK_CLOSED, "the task closed before its answer came")
        self._answered.add((member.client_id, req.task_id))
        return pb.PushReply(accepted=True, message="ok")

    def _check_eval(self, req: pb.EvalResult, msg: Message) -> None:
        if req.error:
            if len(req.error) > MAX_NAME * 4 or not req.error.isprintable():
                raise invalid(Reason.BAD_EVAL, f"error must be at most {MAX_NAME * 4} printable characters")
            return
        max_tokens = self.cfg.eval_windows * self.cfg.seq_len
        if not (math.isfinite(req.loss) and 0 <= req.loss <= MAX_EVAL_LOSS) or not 1 <= req.tokens <= max_tokens:
            raise invalid(Reason.BAD_EVAL, f"loss must be in [0, {MAX_EVAL_LOSS:g}] and tokens in 1..{max_tokens} "
                          f"(--eval-windows x --seq-len)")
        served = self.downloads.digest(_task_version(msg))
        if req.base_digest and served is not None and bytes(req.base_digest) != served:
            raise invalid(Reason.BAD_BASE, "the loss was measured on weights other than this task's model: "
                          "download the task's model again")

    def status(self, req: pb.StatusRequest, context) -> pb.StatusReply:
        try:
            self.auth.check_status(req.public_key, req.signature, req.challenge, req.nonce)
        except AuthError as err:
            raise unauthenticated(err) from None
        if req.history:   # a page of the round history
            return pb.StatusReply(json=json.dumps(self.report.history(req.from_round, req.max_rounds)))
        return pb.StatusReply(json=json.dumps(self.status_dict()))

    def challenge(self, req: pb.ChallengeRequest, context) -> pb.ChallengeReply:
        return pb.ChallengeReply(run_id=self.run_id, challenge=self.auth.challenge(), expires_in_s=self.auth.window_s)

    def status_dict(self) -> dict:
        """The Status object (coordinator/status.py): the last rounds, totals over all, bounded client lists."""
        return self.report.status(self._counters())

    # -- helpers ---------------------------------------------------------------------
    def _counters(self) -> dict:
        with self._counter_lock:
            rejections = collections.Counter(self.rejections)
            clipped = self.clipped_updates
        rejections.update(self.grid.updates.refused())   # aggregates refused before commit (driver)
        return {"rejections": dict(rejections), "clipped_updates": clipped}

    def _weight(self, msg: Message, h: pb.UpdateHeader) -> int:
        """An update's FedAvg weight: the examples the coordinator's task asked for (local steps x batch x
        accumulation), never the client's own figure. A swarm stage sync weighs the peer's token count, capped
        at the tokens the trainers reported through that stage since its last average."""
        config = msg.content["config"] if "config" in msg.content else {}
        if self.swarm is not None:
            return self.swarm.registry.sync_weight(int(config.get("stage", -1)), h.num_examples)
        steps = int(config.get("local-steps", self.cfg.local_steps))
        return steps * self.cfg.batch_size * self.cfg.grad_accum

    def _clip(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scale an update whose L2 norm exceeds C (--clip-update-norm; central DP: --dp-clip) down to C (counted)."""
        limit = clip_limit(self.cfg)
        if not limit:
            return delta
        norm = l2_norm(delta.values())
        if not norm > limit:
            return delta
        with self._counter_lock:
            self.clipped_updates += 1
        scale = limit / norm
        return {n: d * scale for n, d in delta.items()}

    def _admit(self, msg: Message, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> float:
        """The update's L2 norm; refused unless the weights it leads to are finite and bounded and its norm is
        within --max-update-norm-ratio of the recent ones (integrity.py)."""
        try:
            check_values(base, delta)
            return self.norm_bound.check(_norm_key(msg), delta, base)
        except Inadmissible as err:
            log.warning("refused an update for task %s: %s", msg.metadata.message_id[:12], err.detail)
            raise invalid(err.reason, err.detail) from None

    def _open_task(self, task_id: str, member: Member) -> Message:
        if len(task_id) > 64:
            raise invalid(Reason.BAD_TASK_ID, "task_id too long")
        msg = self.grid.open_instruction(task_id, member.client_id)
        if msg is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, Reason.TASK_CLOSED,
                          f"task {task_id[:64]!r} is not open for this client (finished, timed out or never sent)")
        return msg

    def _adopt(self, h: pb.UpdateHeader, member: Member) -> Message | None:
        """An upload for a task this coordinator does not know (it restarted mid-round): accept it as the
        answer to this client's open instruction of the same round over the very same weights."""
        if len(h.base_digest) != 32:
            return None
        for msg in self.grid.open_for_node(member.client_id):
            if not _is_evaluate(msg) and _task_round(msg) == h.round and self._served_digest(msg) == h.base_digest:
                log.info("adopted %s's upload for round %d (task %s predates a restart)", member.name, h.round, h.task_id[:12])
                return msg
        with self.progress.lock:
            pending = self.progress.current_round == h.round and self.progress.configured_round < h.round
        if pending:  # the re-run of that round has not sent its instructions yet: come back shortly
            raise Refused(grpc.StatusCode.ABORTED, Reason.TASK_PENDING,
                          f"round {h.round} is being configured after a restart; retry shortly")
        return None

    def _served_digest(self, msg: Message) -> bytes:
        """Digest of the weights a client of this task trains from (the as-served state of its version)."""
        base = self._base_state(msg.metadata.message_id, msg)
        return wire.state_digest(base) if self.swarm else self.downloads.served(_task_version(msg), base).digest

    def _bytes_down_of(self, *task_ids: str) -> int:
        with self._cache_lock:
            for stale in [t for t in self._bytes_down if t not in task_ids and not self.grid.is_open(t)]:
                del self._bytes_down[stale]
            return sum(self._bytes_down.pop(t, 0) for t in set(task_ids))

    def _fold_slot(self, model_bytes: int) -> threading.BoundedSemaphore:
        """Uploads checked and folded at once: as many as DECODE_BUDGET_BYTES holds of the model's fp32 size.
        Two 124M-model uploads checked together stacked their embeddings' transients (0.6x the model each)."""
        with self._cache_lock:
            if self._fold_slots is None:
                slots = max(1, min(self.limits.upload_workers, DECODE_BUDGET_BYTES // max(model_bytes, 1)))
                self._fold_slots = threading.BoundedSemaphore(slots)
            return self._fold_slots

    def _base_state(self, task_id: str, msg: Message) -> dict[str, torch.Tensor]:
        """The weights the task was configured with (decoded once per task)."""
        with self._cache_lock:
            state = self._base_cache.get(task_id)
            if state is None:
                for stale in [t for t in self._base_cache if not self.grid.is_open(t)]:
                    del self._base_cache[stale]
                arrays: ArrayRecord = msg.content["arrays"]
                state = self._base_cache[task_id] = ArraysView(arrays)   # decodes a tensor per read, holds none
            return state


def _parse(msg_type, raw: bytes):
    msg = msg_type()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise invalid(Reason.MALFORMED, f"cannot parse {msg_type.DESCRIPTOR.name}: {err}") from None
    return msg


def _norm_key(msg: Message) -> str:
    """Which accepted norms an update is compared with: the model's, or (swarm) its stage's."""
    config = msg.content["config"] if "config" in msg.content else {}
    stage = int(config.get("stage", -1))
    return f"stage {stage}" if stage >= 0 else "model"


def _is_evaluate(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.EVALUATE


def _task_version(msg: Message) -> int:
    """The global version a task's client downloads: a round trains from the previous round's model; the
    evaluation of round N scores round N's."""
    return _task_round(msg) - (0 if _is_evaluate(msg) else 1)


def _task_round(msg: Message) -> int:
    """The round PullTask announced for this instruction (what the client signs)."""
    config = msg.content["config"] if "config" in msg.content else {}
    return int(msg.metadata.group_id or config.get("server-round", 0))
