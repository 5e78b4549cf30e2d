"""A peer's stage sync, one tensor at a time.

Each tensor of the stage's new average is adopted as soon as its last part arrives (the stage server swaps
buffers: the average becomes the snapshot, the old snapshot holds the progress), and that progress is encoded
at once, part by part, with the run's error feedback updated in place, then dropped. So a sync holds, beside
the stage, one tensor of the average and the encoded upload (a quarter of the stage's size in int8), never
the whole average, the whole progress, a copy of the residuals or a whole tensor's encoding transients.
"""
from __future__ import annotations

import collections
import logging
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import Future

import torch

from fedswarm.client.swarm.tensors import BadStageInput
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.proto.refusals import Reason

log = logging.getLogger(__name__)


def average_tensors(chunks: Iterable[pb.ModelChunk], spec: dict[str, tuple[int, ...]],
                    skip: Iterable[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Each float32 tensor of a FetchModel stream as soon as its last part arrived, every part checked against
    `spec` (names, shapes, codec none) before it is decoded; tensors named in `skip` (adopted before a retry)
    are checked and dropped. WireError if the stream ends with a tensor incomplete."""
    assembler = wire.PartAssembler(spec, {C.CODEC_NAMES["none"]})
    skip = set(skip)
    for chunk in chunks:
        name = chunk.part.name
        assembler.add(chunk.part)
        if assembler.filled[name] == math.prod(spec[name]):
            tensor = assembler.buffers.pop(name).view(spec[name])
            if name not in skip:
                yield name, tensor
    if not assembler.complete():
        missing = [n for n, s in spec.items() if assembler.filled.get(n, 0) != math.prod(s)]
        raise wire.WireError(f"stream ended with {len(missing)} incomplete tensors, e.g. {missing[:3]}")


def encode_progress(feedback: C.ErrorFeedback, name: str, progress: torch.Tensor) -> list[bytes]:
    """Serialized UpdateChunk parts of one tensor of progress, as ErrorFeedback.compress and wire.tensor_parts
    would cut them, computed part by part in place: the target (progress, after the momentum step, plus the
    carried residual) is built in the residual's buffer, or in `progress`'s (which is consumed: it becomes
    the residual); each part's decoded value is subtracted from it there."""
    flat = progress.detach().reshape(-1)
    if flat.dtype != torch.float32 or flat.device.type != "cpu":
        flat = flat.to("cpu", torch.float32)
    if feedback.momentum:
        m = feedback.momenta.get(name)
        if m is None or m.shape != progress.shape:
            feedback.momenta[name] = flat.clone().view(progress.shape)
            m = feedback.momenta[name]
        else:
            m.mul_(feedback.momentum).add_(flat.view(progress.shape))
        flat.add_(m.reshape(-1), alpha=feedback.momentum)
    residual = feedback.residuals.get(name)
    if residual is not None and residual.shape == progress.shape:
        target = residual.reshape(-1)
        if feedback.decay != 1:
            target.mul_(feedback.decay)
        target.add_(flat)
    else:
        target = flat
    parts = []
    for offset, count in wire.part_ranges(target.numel(), feedback.spec):
        piece = target[offset:offset + count]
        enc = feedback.spec.encode(piece)
        piece.sub_(C.decode(enc))
        for part in wire.tensor_parts(name, tuple(progress.shape), enc):
            part.offset += offset
            parts.append(pb.UpdateChunk(part=part).SerializeToString())
    if feedback.codec == pb.CODEC_NONE:
        feedback.residuals.pop(name, None)   # a lossless upload carries nothing over (compress keeps zeros)
    else:
        feedback.residuals[name] = target.view(progress.shape)
    return parts


class SyncingStage:
    """A StageServer's sync (mixed into it; it owns pool, _lock, snapshot, _trainable and _adopting): begin_sync,
    adopt each tensor of the average, end_sync. The stage's state is touched only on its worker thread, and a
    tensor to adopt goes in before the worker's next request (_timed_compute calls _adopt_pending first)."""

    def begin_sync(self, stage: int, names) -> None:
        self.pool.submit(self._begin_sync, stage, names).result()

    def adopt(self, name: str, average: torch.Tensor) -> Future:
        """Adopt one tensor of the stage's new average (handed over: it becomes the snapshot) before the worker's
        next request, not after the requests queued: the future gives the progress it replaced."""
        done = Future()
        with self._lock:
            self._adopting.append((name, average, done))
        self.pool.submit(self._adopt_pending)   # at once if the worker is idle
        return done

    def _adopt_pending(self) -> None:
        while True:
            with self._lock:
                if not self._adopting:
                    return
                name, average, done = self._adopting.popleft()
            try:
                done.set_result(self._adopt(name, average))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting sync
                done.set_exception(err)

    def end_sync(self) -> int:
        return self.pool.submit(self._end_sync).result()

    def _begin_sync(self, stage: int, names) -> None:
        if stage != self.stage_index:
            raise BadStageInput(f"sync for stage {stage}, but this peer serves stage {self.stage_index}", Reason.WRONG_STAGE)
        self._repair_if_broken()   # never upload (or keep) progress made of NaN
        if set(self.snapshot) != set(names):
            raise BadStageInput(f"the stage {stage} average's tensors differ from this peer's", Reason.BAD_AVERAGE)
        self._next_base = {}
        self.base, self.base_version = {}, b""   # spot checks wait for the new average: one bf16 copy at a time
        self.checked_base = ({}, b"")

    def _adopt(self, name: str, average: torch.Tensor) -> torch.Tensor:
        """progress = weights - snapshot, computed into the snapshot's buffer; the average's buffer becomes
        average + progress, the new snapshot and weights. No tensor is allocated (on a CPU peer)."""
        held, param = self.snapshot[name], self._trainable[name]
        with torch.no_grad():
            new = average.detach().to("cpu", torch.float32).reshape(held.shape)
            keep_own = not bool(torch.isfinite(new).all())
            if keep_own:   # keep this replica's own weights, as if they were the average
                self.refusals.add(Reason.NON_FINITE_AVERAGE)
                log.error("stage %d: the served average's %s is not finite; keeping this replica's", self.stage_index, name)
            self._next_base[name] = None if keep_own else new.to(torch.bfloat16)   # spot checks run on it
            own = param.detach().to("cpu", torch.float32)
            progress = held.neg_().add_(own)
            if keep_own:
                new.copy_(own)
            else:
                new.add_(progress)
            param.copy_(new.to(param.device, param.dtype))
            self.snapshot[name] = new
        self._weights_changed()
        return progress

    def _end_sync(self) -> int:
        if set(self._next_base) == set(self.snapshot):
            self._set_base(self._next_base)
        with self._lock:
            tokens, self.tokens_since_sync, self.steps_since_sync = self.tokens_since_sync, 0, 0
        return max(tokens, 1)


class Adopter:
    """Hands each tensor of the average to the stage server as it arrives (it adopts them between requests)
    and encodes each progress as soon as it was adopted; at most MAX_PENDING bytes of average wait for it."""

    MAX_PENDING = 32 << 20

    def __init__(self, server, feedback: C.ErrorFeedback):
        self.server, self.feedback = server, feedback
        self.parts: list[bytes] = []    # the upload's serialized UpdateChunk parts
        self.adopted: set[str] = set()
        self._pending: collections.deque = collections.deque()   # (name, Future of the progress, bytes)

    def add(self, name: str, average: torch.Tensor) -> None:
        self._pending.append((name, self.server.adopt(name, average), average.numel() * average.element_size()))
        while self._pending and (self._pending[0][1].done() or sum(p[2] for p in self._pending) > self.MAX_PENDING):
            self._encode_next()

    def flush(self) -> None:
        """Wait for every tensor handed over (also after a failed download: they are adopted all the same)."""
        while self._pending:
            self._encode_next()

    def _encode_next(self) -> None:
        name, progress, _ = self._pending.popleft()
        self.parts.extend(encode_progress(self.feedback, name, progress.result()))
        self.adopted.add(name)


def carry_unsent(feedback: C.ErrorFeedback, raw_parts: Iterable[bytes]) -> None:
    """An upload that was not applied: what it would have sent goes back into the residuals, so the next
    upload carries it (the peer already adopted that progress, so it is never computed again)."""
    for raw in raw_parts:
        part = pb.UpdateChunk.FromString(raw).part
        enc = C.Encoded(part.codec, part.count, part.block_size, part.data, part.scales, part.topk, part.bits)
        residual = feedback.residuals.get(part.name)
        if residual is None:   # codec none keeps no residual
            residual = feedback.residuals[part.name] = torch.zeros(tuple(part.shape))
        residual.view(-1)[part.offset:part.offset + part.count].add_(C.decode(enc))
