"""PushUpdate: read the header, receive the parts, verify, deliver. Every check comes before the work it
guards; the update's weight comes from the run's mode (coordinator/modes.py), never from the client."""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch
from flwr.app import ConfigRecord, Message, MetricRecord

from fedswarm.coordinator.aggregate import DecodedUpdate, task_round
from fedswarm.coordinator.auth import AuthError, Authenticator, SeenSet
from fedswarm.coordinator.driver import CLIENT_METRIC, RunProgress
from fedswarm.coordinator.grid import SessionGrid
from fedswarm.coordinator.integrity import Inadmissible, UpdateNormBound, check_values, l2_norm
from fedswarm.coordinator.membership import Member, Membership
from fedswarm.coordinator.privacy import clip_limit, clipped
from fedswarm.coordinator.rpc import (MAX_NAME, Counters, TaskBases, invalid, is_evaluate, is_secagg, open_task, parse,
                                      replayed,
                                      session, task_closed, task_stage, unauthenticated, unsigned)
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import signing, wire
from fedswarm.proto.refusals import Reason, Refused
from fedswarm.run_config import RunConfig

log = logging.getLogger(__name__)
MAX_UPDATE_BYTES_FACTOR = 1.5   # an update stream may not exceed 1.5x the model's fp32 size (+1 MiB)
DECODE_BUDGET_BYTES = 2 << 30    # uploads checked and folded at once: this over the model's fp32 size (at least 1)
MAX_CLIENT_METRICS = 16          # figures a client may report with an update (UpdateHeader.metrics)


@dataclass
class Upload:
    """An upload whose header was checked against its task."""

    h: pb.UpdateHeader
    member: Member
    msg: Message                          # the task's instruction (adopted: an open one of the same round)
    base: dict[str, torch.Tensor]         # the weights it was trained from
    spec: dict[str, tuple[int, ...]]      # what the update holds: the task's model (or stage)
    received: int                         # bytes read so far

    @property
    def task_id(self) -> str:
        return self.msg.metadata.message_id   # differs from h.task_id when adopted after a restart

    @property
    def adopted(self) -> bool:
        """Sent for a task a restarted coordinator lost, and taken as the answer to its re-run."""
        return self.task_id != self.h.task_id

    @property
    def raw_bytes(self) -> int:
        return 4 * sum(math.prod(shape) for shape in self.spec.values())


class Uploads:
    def __init__(self, cfg: RunConfig, run_id: str, members: Membership, grid: SessionGrid, progress: RunProgress,
                 auth: Authenticator, mode, bases: TaskBases, counters: Counters, answered: SeenSet,
                 upload_workers: int, privacy=None):
        self.cfg, self.run_id, self.members, self.grid, self.progress = cfg, run_id, members, grid, progress
        self.auth, self.mode, self.bases, self.counters, self.answered = auth, mode, bases, counters, answered
        # what every update's parts must be encoded with (--secure-aggregation: masked vectors, uint32 mod 2^32)
        self.codec = C.CodecSpec(pb.CODEC_MASKED) if cfg.secure_aggregation else C.CodecSpec.of(cfg, "upload")
        self.norm_bound = UpdateNormBound(cfg.max_update_norm_ratio)   # recent accepted norms (integrity.py)
        self.seen_signatures = SeenSet(lambda: progress.committed_round)
        self.upload_workers = upload_workers
        self.privacy = privacy   # --dp-clip's PrivacyLedger (privacy.py): its C may adapt round by round
        self._fold_slots: threading.BoundedSemaphore | None = None   # sized by the model at the first upload
        self._lock = threading.Lock()

    def push_update(self, chunks: Iterator[bytes], context) -> pb.PushReply:
        upload = self._read_header(chunks)
        assembler, digest = self._receive(chunks, upload)
        delta = self._verify(upload, assembler, digest)
        if self.cfg.secure_aggregation:   # the masked vector, as integers: nothing to clip or check in it
            masked = {n: C.masked_values(delta.encoded[n]).reshape(s) for n, s in upload.spec.items()}
            return self._deliver(upload, masked, masked=True)
        return self._deliver(upload, delta)

    # -- read the header -------------------------------------------------------------------
    def _read_header(self, chunks: Iterator[bytes]) -> Upload:
        first = next(chunks, None)
        if first is None:
            raise invalid(Reason.EMPTY_STREAM, "PushUpdate stream carried no header")
        head = parse(pb.UpdateChunk, first)
        if head.WhichOneof("kind") != "header":
            raise invalid(Reason.NO_HEADER, "the first UpdateChunk must be a header")
        h = head.header
        member = session(self.members, h.client_id, h.session_token)
        if (member.client_id, h.task_id) in self.answered or bytes(h.signature) in self.seen_signatures:
            raise replayed(h.task_id, "an update")
        if self.auth.enabled and len(h.signature) != signing.SIGNATURE_BYTES:
            raise unsigned("update")
        msg = self._task(h, member)
        base = self.bases.base(msg.metadata.message_id, msg)
        upload = Upload(h, member, msg, base, {n: tuple(t.shape) for n, t in base.items()}, len(first))
        self._check_header(upload)
        return upload

    def _task(self, h: pb.UpdateHeader, member: Member) -> Message:
        msg = self.grid.open_instruction(h.task_id, member.client_id) or self._adopt(h, member)
        if msg is None:
            msg = open_task(self.grid, h.task_id, member)   # refused: closed, or an id too long
        if is_evaluate(msg):
            raise invalid(Reason.WRONG_TASK_KIND, "this task asks for an evaluation: answer it with PushEval, not an update")
        if is_secagg(msg):
            raise invalid(Reason.WRONG_TASK_KIND, "this task is a secure-aggregation stage: answer it with PushSecAgg")
        return msg

    def _check_header(self, up: Upload) -> None:
        h = up.h
        if h.base_digest and h.base_digest != self.mode.served_digest(up.msg):
            raise invalid(Reason.BAD_BASE, "the update was trained from weights other than this task's model: "
                          "download the task's model again")
        expected_parts = wire.count_parts(up.spec, self.codec)
        if h.num_parts != expected_parts:
            raise invalid(Reason.BAD_PART_COUNT, f"num_parts {h.num_parts}, expected {expected_parts} "
                          f"for codec {self.cfg.upload_codec}")
        if not math.isfinite(h.train_loss) or h.num_examples == 0 or h.num_examples > 10**9:
            raise invalid(Reason.BAD_HEADER, "train_loss must be finite and num_examples in 1..1e9")
        if len(h.metrics) > MAX_CLIENT_METRICS or not all(
                0 < len(k) <= MAX_NAME // 4 and k.isprintable() and math.isfinite(v) for k, v in h.metrics.items()):
            raise invalid(Reason.BAD_HEADER, f"metrics: at most {MAX_CLIENT_METRICS}, each a printable name of "
                          f"1..{MAX_NAME // 4} characters and a finite value")

    def _adopt(self, h: pb.UpdateHeader, member: Member) -> Message | None:
        """An upload for a task this coordinator does not know (it restarted mid-round): accept it as the
        answer to this client's open instruction of the same round over the very same weights."""
        if len(h.base_digest) != 32 or self.cfg.secure_aggregation:   # masked with keys the re-run does not use
            return None
        for msg in self.grid.open_for_node(member.client_id):
            if not is_evaluate(msg) and task_round(msg) == h.round and self.mode.served_digest(msg) == h.base_digest:
                log.info("adopted %s's upload for round %d (task %s predates a restart)", member.name, h.round,
                         h.task_id[:12])
                return msg
        with self.progress.lock:
            pending = self.progress.current_round == h.round and self.progress.configured_round < h.round
        if pending:  # the re-run of that round has not sent its instructions yet: come back shortly
            raise Refused(grpc.StatusCode.ABORTED, Reason.TASK_PENDING,
                          f"round {h.round} is being configured after a restart; retry shortly")
        return None

    # -- receive the parts -----------------------------------------------------------------
    def _receive(self, chunks: Iterator[bytes], up: Upload) -> tuple[wire.PartAssembler, signing.UpdateDigest]:
        """Each part parsed, hashed and checked as it comes; the stream bounded by the model's size."""
        h = up.h
        max_bytes = int(up.raw_bytes * MAX_UPDATE_BYTES_FACTOR) + (1 << 20)
        assembler = wire.PartAssembler(up.spec, {self.codec}, keep_encoded=True)  # decoded tensor by tensor when folded
        digest = signing.UpdateDigest(h.num_examples, h.train_loss, h.num_parts)
        parts = 0
        for raw in chunks:
            up.received += len(raw)
            if up.received > max_bytes:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OVERSIZED, f"update stream over {max_bytes} bytes")
            chunk = parse(pb.UpdateChunk, raw)
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
        return assembler, digest

    # -- verify ----------------------------------------------------------------------------
    def _verify(self, up: Upload, assembler: wire.PartAssembler, digest: signing.UpdateDigest) -> dict:
        """The signature over what came (the task's own round, so one for another round cannot verify); then
        every announced part present."""
        h, member = up.h, up.member
        try:
            self.auth.check_update(member.public_key, h.signature, self.run_id, task_round(up.msg),
                                   member.client_id, h.task_id, digest.digest())
        except AuthError as err:
            log.warning("refused update from %s for task %s: %s", member.name, h.task_id[:64], err.reason)
            raise unauthenticated(err) from None
        try:
            return assembler.finish()
        except wire.WireError as err:
            raise invalid(Reason.INCOMPLETE, str(err)) from None

    # -- deliver ---------------------------------------------------------------------------
    def _deliver(self, up: Upload, delta: dict[str, torch.Tensor], masked: bool = False) -> pb.PushReply:
        """Clipped, admitted (finite, bounded, a plausible norm) and folded into the round, one budget's worth
        of uploads at a time (each decodes tensor by tensor: their transients add up). A `masked` vector
        (--secure-aggregation) is added into the round's masked sum as it is."""
        h, member = up.h, up.member
        with self._fold_slot(up.raw_bytes):
            norm = None
            if not masked:
                delta = self._clip(delta)
                norm = self._admit(up.msg, up.base, delta)
            update = DecodedUpdate(up.base, delta, client=self._client(up), metrics=self._metrics(up))
            try:
                delivered = self.grid.deliver_update(up.task_id, member.client_id, update)  # folded or spilled
            except Inadmissible as err:   # the fold's own overflow check
                raise invalid(err.reason, err.detail) from None
        if not delivered:
            raise task_closed("the task closed while uploading")
        if norm is not None:
            self.norm_bound.accept(_norm_key(up.msg), norm)
        self.answered.add((member.client_id, h.task_id))
        self.answered.add((member.client_id, up.task_id))
        if h.signature:
            self.seen_signatures.add(bytes(h.signature))
        self.members.count_round(member)
        self.bases.forget(up.task_id)
        return pb.PushReply(accepted=True, message="ok", bytes_received=up.received)

    def _metrics(self, up: Upload) -> MetricRecord:
        """The reply's metrics: the weight the mode gives it, and what it cost on the wire."""
        h = up.h
        return MetricRecord({
            "num-examples": self.mode.weight(up.msg, h), "train_loss": float(h.train_loss),
            "bytes-up": int(up.received), "bytes-up-raw": int(up.raw_bytes),
            "bytes-down": self.bases.take_sent(up.task_id, h.task_id), "bytes-down-raw": int(up.raw_bytes),
            "train-seconds": float(h.train_seconds)})

    def _client(self, up: Upload) -> ConfigRecord:
        """Who answered, whether its upload was adopted, and the figures it reported (apart from the metrics
        Flower averages, whose keys must be the same in every reply)."""
        return ConfigRecord({"name": up.member.name, "adopted": up.adopted,
                             **{CLIENT_METRIC + k: float(v) for k, v in sorted(up.h.metrics.items())}})

    def _clip(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scale an update whose L2 norm exceeds C (--clip-update-norm; central DP: --dp-clip, or the ledger's
        adaptive C) down to C (counted)."""
        limit = clip_limit(self.cfg, self.privacy)
        if not limit:
            return delta
        norm = l2_norm(delta.values())
        if self.privacy is not None:
            self.privacy.observe(norm, limit)
        delta, cut = clipped(delta, norm, limit)
        if cut:
            self.counters.clipped()
        return delta

    def _admit(self, msg: Message, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> float:
        """The update's L2 norm; refused unless the weights it leads to are finite and bounded and its norm is
        within --max-update-norm-ratio of the recent ones (integrity.py)."""
        try:
            check_values(base, delta)
            return self.norm_bound.check(_norm_key(msg), delta, base)
        except Inadmissible as err:
            log.warning("refused an update for task %s: %s", msg.metadata.message_id[:12], err.detail)
            raise invalid(err.reason, err.detail) from None

    def _fold_slot(self, model_bytes: int) -> threading.BoundedSemaphore:
        """Uploads checked and folded at once: as many as DECODE_BUDGET_BYTES holds of the model's fp32 size.
        Two 124M-model uploads checked together stacked their embeddings' transients (0.6x the model each)."""
        with self._lock:
            if self._fold_slots is None:
                slots = max(1, min(self.upload_workers, DECODE_BUDGET_BYTES // max(model_bytes, 1)))
                self._fold_slots = threading.BoundedSemaphore(slots)
            return self._fold_slots


def _norm_key(msg: Message) -> str:
    """Which accepted norms an update is compared with: the model's, or (swarm) its stage's."""
    stage = task_stage(msg)
    return f"stage {stage}" if stage >= 0 else "model"
