"""Tensors on the swarm wire: activations/gradients as SwarmTensor, token ids as int32 bytes.
Everything that arrives is checked (size, shape, dtype, finiteness, vocabulary) before use."""
from __future__ import annotations

import math

import numpy as np
import torch

from fedswarm.p2p import MAX_ELEMENTS
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto.refusals import Reason

MAX_TOKENS = 1 << 16          # B * T of one micro-batch
WIRE_CODECS = frozenset(C.CODEC_NAMES[n] for n in ("none", "fp16", "bf16", "int8"))   # activation codecs


class BadStageInput(ValueError):
    """A malformed or refused stage request; the caller gets the message, ``reason`` is counted."""

    def __init__(self, message: str, reason: Reason = Reason.BAD_INPUT):
        super().__init__(message)
        self.reason = Reason(reason)


def to_wire(t: torch.Tensor, codec: int) -> pb.SwarmTensor:
    enc = C.encode(t.detach().reshape(-1).float().cpu(), codec)
    return pb.SwarmTensor(shape=list(t.shape), codec=enc.codec, block_size=enc.block_size, data=enc.data, scales=enc.scales)


def from_wire(msg: pb.SwarmTensor, shape: tuple[int, ...], allowed_codecs: set[int]) -> torch.Tensor:
    """Decode an activation of the expected `shape`; BadStageInput otherwise."""
    if tuple(msg.shape) != tuple(shape):
        raise BadStageInput(f"activation shape {tuple(msg.shape)[:8]} != expected {tuple(shape)}", Reason.BAD_SHAPE)
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise BadStageInput(f"activation of {count} elements is over the limit {MAX_ELEMENTS}", Reason.OVERSIZED)
    if msg.codec not in allowed_codecs:
        raise BadStageInput(f"activation codec {msg.codec} not allowed (allowed: {sorted(allowed_codecs)})", "bad_codec")
    try:
        flat = C.decode(C.Encoded(msg.codec, count, msg.block_size, msg.data, msg.scales))
    except C.CodecError as err:
        raise BadStageInput(f"activation: {err}", Reason.BAD_ENCODING) from None
    return flat.view(shape)


def ids_to_bytes(ids: torch.Tensor) -> bytes:
    return ids.to(torch.int32).cpu().numpy().astype("<i4").tobytes()


IGNORE_INDEX = -100   # a label without loss (chat data: the prompt's tokens), as torch's cross_entropy skips it


def ids_from_bytes(data: bytes, shape, vocab: int, max_len: int, labels: bool = False) -> torch.Tensor:
    """int64 [B, T] from int32 LE bytes, checking shape, size and the vocabulary (`labels`: IGNORE_INDEX too)."""
    shape = tuple(shape)
    if len(shape) != 2 or min(shape) < 1 or shape[0] * shape[1] > MAX_TOKENS or shape[1] > max_len:
        raise BadStageInput(f"token shape {shape[:8]} invalid (need [B, T], B*T <= {MAX_TOKENS}, T <= {max_len})",
                            Reason.BAD_SHAPE)
    if len(data) != 4 * shape[0] * shape[1]:
        raise BadStageInput(f"{len(data)} bytes of ids for shape {shape} (need {4 * shape[0] * shape[1]})", Reason.BAD_SHAPE)
    ids = torch.from_numpy(np.frombuffer(data, dtype="<i4").astype(np.int64)).view(shape)
    valid = (ids >= 0) & (ids < vocab)
    if labels:
        valid |= ids == IGNORE_INDEX
    if not bool(valid.all()):
        raise BadStageInput(f"token ids outside the vocabulary 0..{vocab - 1}", Reason.BAD_TOKENS)
    return ids
