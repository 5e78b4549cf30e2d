"""Signed stage receipts and spot-check verdicts: the evidence a trainer (and the coordinator) blames by.

Each stage server signs, with its libp2p RSA key (the key its peer id is derived from: signed_records.py),
what came into a micro-batch's stage and what went out. A chained reply carries one receipt per stage, so a
loss no stage computed, or a loss other than the one the last stage signed, is refused; a claim that the next
hop failed is itself signed, so it is checked against its claimer. Spot checks compare two replicas' outputs
for the same input within a tolerance derived from the activation codec.
"""
from __future__ import annotations

import functools
import hashlib
import math
import struct

import torch

from fedswarm.p2p import MAX_ELEMENTS
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.signed_records import key_peer_id, public_key_of

DOMAIN = b"fedswarm-stage-receipt/1\0"
# spot checks run on the stage's last committed average, which every replica holds alike (kept in bf16): two
# honest replicas differ only by the activation codec's rounding and arithmetic order on different hardware
# per-element relative error of one encode, by activation codec (int8/int4: blockwise absmax / levels)
CODEC_ERROR = {pb.CODEC_NONE: 1e-6, pb.CODEC_FP16: 2.0 ** -11, pb.CODEC_BF16: 2.0 ** -8,
               pb.CODEC_INT8: 1 / 127, pb.CODEC_INT4: 1 / 7}
# the relative L2 difference allowed on top of the codec's error: arithmetic order (another device, kernel or
# thread count); a lie that matters is far larger. (Replicas' live weights cannot be compared: they train apart
# between syncs, measured 40-60 % apart on gpt2-tiny after 50 local steps each.)
SLACK = 0.02


class BadReceipt(ValueError):
    """Receipts that do not prove what they must; ``blame`` is the peer id the evidence points at."""

    def __init__(self, message: str, blame: str = ""):
        super().__init__(message)
        self.blame = blame


def tensor_digest(t: pb.SwarmTensor) -> bytes:
    """sha256 of an activation as it travels (shape, codec, block size, data, scales)."""
    h = hashlib.sha256(struct.pack(f"<I{len(t.shape)}q", len(t.shape), *t.shape))
    h.update(struct.pack("<iI", int(t.codec), t.block_size))
    for part in (t.data, t.scales):
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.digest()


def ids_digest(ids: bytes, shape) -> bytes:
    """sha256 of stage 0's input: the token ids and their shape."""
    shape = list(shape)
    return hashlib.sha256(struct.pack(f"<I{len(shape)}q", len(shape), *shape) + ids).digest()


def input_digest(req: pb.StageRequest) -> bytes:
    return ids_digest(req.ids, req.ids_shape) if req.ids else tensor_digest(req.hidden)


def _payload(run_id: str, r: pb.StageReceipt) -> bytes:
    fields = [run_id.encode(), r.microbatch_id.encode(), str(r.stage).encode(), r.input_digest, r.output_digest,
              struct.pack("<d", r.loss), r.failed_peer.encode(), r.failed_reason.encode(), r.weights_version]
    return DOMAIN + b"".join(struct.pack("<I", len(f)) + f for f in fields)


def sign(key, run_id: str, r: pb.StageReceipt) -> pb.StageReceipt:
    """Sign ``r`` in place with ``key`` (hivemind's RSAPrivateKey: the node's libp2p key); returns it."""
    r.public_key = _public_bytes(key)
    r.signature = key.sign(_payload(run_id, r))
    return r


@functools.lru_cache(maxsize=64)
def _public_bytes(key) -> bytes:
    return key.get_public_key().to_bytes()


@functools.lru_cache(maxsize=1024)
def _key(public_key: bytes):
    """(parsed key, its peer id), or None: parsing and hashing a key costs more than a verify."""
    parsed = public_key_of(public_key)
    return None if parsed is None else (parsed, key_peer_id(public_key))


def signer(run_id: str, r: pb.StageReceipt) -> str:
    """The peer id whose key signed ``r`` (and whose attached output, if any, is the one it signed)."""
    key = _key(bytes(r.public_key)) if r.public_key else None
    if key is None or not key[0].verify(_payload(run_id, r), r.signature):
        raise BadReceipt(f"stage {r.stage}'s receipt is not validly signed")
    if r.HasField("output") and tensor_digest(r.output) != r.output_digest:
        raise BadReceipt(f"stage {r.stage}'s receipt carries an output other than the one it signed", key[1])
    return key[1]


def check_chain(run_id: str, mb: str, route: dict[int, str], first_input: bytes, receipts, loss: float,
                audit: bool = False) -> None:
    """BadReceipt unless ``receipts`` hold, for every stage of ``route`` (stage -> peer id) in order, one receipt
    signed by that stage's peer for micro-batch ``mb``, each stage's input being the previous one's output
    (the first's: ``first_input``), the last one signing ``loss`` (finite); ``audit``: each carries its output.
    ``blame`` is the first peer of the route (it handed the chain over) unless a signature points elsewhere."""
    stages = sorted(route)
    head = route[stages[0]]
    if len(receipts) != len(stages):
        raise BadReceipt(f"{len(receipts)} receipts for a chain of {len(stages)} stages", head)
    expected = first_input
    for stage, r in zip(stages, receipts):
        if r.failed_peer or r.microbatch_id != mb or r.stage != stage:
            raise BadReceipt(f"the receipt for stage {stage} is for another micro-batch or stage", head)
        try:
            who = signer(run_id, r)
        except BadReceipt as err:
            raise BadReceipt(str(err), err.blame or head) from None
        if who != route[stage]:
            raise BadReceipt(f"stage {stage}'s receipt is signed by {who}, not by {route[stage]}", head)
        if r.input_digest != expected:
            raise BadReceipt(f"stage {stage}'s input is not what stage {stage - 1} sent on", head)
        if audit and stage != stages[-1] and not r.HasField("output"):
            raise BadReceipt(f"stage {stage}'s audited receipt carries no output", head)
        expected = r.output_digest
    last = receipts[-1]
    if not math.isfinite(last.loss):   # signed by the last stage: its own doing
        raise BadReceipt(f"the last stage signed a loss of {last.loss}", route[stages[-1]])
    if last.loss != loss:
        raise BadReceipt(f"a loss of {loss}, but the last stage signed {last.loss}", head)


def check_claim(run_id: str, mb: str, route: dict[int, str], claim: pb.StageReceipt) -> int:
    """The stage of the hop a signed failure claim names; BadReceipt unless the claim is for ``mb``, signed by
    the route's peer of the claimer's stage, names the route's next hop and carries the input it sent it."""
    stage = claim.stage + 1
    if claim.microbatch_id != mb or claim.stage not in route or route.get(stage) != claim.failed_peer:
        raise BadReceipt(f"a claim against {claim.failed_peer[:60]!r} that is not about this chain's next hop")
    if not claim.HasField("output"):
        raise BadReceipt("a failure claim without the input the claimer sent")
    who = signer(run_id, claim)
    if who != route[claim.stage]:
        raise BadReceipt(f"a claim of stage {claim.stage} signed by {who}, not by {route[claim.stage]}")
    return stage


# -- spot checks ---------------------------------------------------------------------------------------------
def tolerance(codec: int) -> float:
    """The relative L2 difference two honest replicas' encoded outputs for one input may show."""
    return 2 * CODEC_ERROR.get(int(codec), 1 / 7) + SLACK


def value(r: pb.StageReceipt) -> torch.Tensor:
    """What a receipt says its stage produced: the output activation (decoded), or the last stage's loss."""
    if not r.HasField("output"):
        return torch.tensor([r.loss], dtype=torch.float64)
    return activation(r.output, f"stage {r.stage}'s output")


def activation(t: pb.SwarmTensor, what: str = "the activation") -> torch.Tensor:
    """A SwarmTensor decoded (float64, its shape); BadReceipt unless it is a bounded activation of this swarm."""
    count = math.prod(t.shape)
    if not 0 < count <= MAX_ELEMENTS or t.codec not in CODEC_ERROR:
        raise BadReceipt(f"{what} is not an activation of this swarm")
    try:
        return C.decode(C.Encoded(t.codec, count, t.block_size, t.data, t.scales)).view(tuple(t.shape)).double()
    except C.CodecError as err:
        raise BadReceipt(f"{what}: {err}") from None


def close(x: torch.Tensor, y: torch.Tensor, codec: int) -> bool:
    """Whether two outputs for one input match within ``codec``'s tolerance (relative L2)."""
    if x.shape != y.shape or not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return False
    scale = torch.maximum(x.norm(), y.norm()).clamp_min(1e-12)
    return float((x - y).norm() / scale) <= tolerance(codec)


def _codec(r: pb.StageReceipt) -> int:
    return r.output.codec if r.HasField("output") else pb.CODEC_NONE


def agree(a: pb.StageReceipt, b: pb.StageReceipt) -> bool:
    """Whether two receipts' outputs for one input match within the codec's tolerance."""
    return close(value(a), value(b), max(_codec(a), _codec(b), key=lambda c: CODEC_ERROR.get(c, 1)))


def _one_check(receipts, stage: int) -> None:
    """BadReceipt unless ``receipts`` are spot checks of ``stage``, of one micro-batch, input and weights version."""
    first = receipts[0]
    if any(r.failed_peer or r.stage != stage or r.microbatch_id != first.microbatch_id
           or r.input_digest != first.input_digest or r.weights_version != first.weights_version
           or not r.weights_version for r in receipts):
        raise BadReceipt("the receipts are not spot checks of one stage, micro-batch, input and weights version")


def judge(run_id: str, report: pb.LyingReport) -> str:
    """The peer id a spot check's report convicts: its first receipt's signer, whose output two other replicas
    of the stage (the other receipts' signers, agreeing with each other) contradict for the same micro-batch and
    input. BadReceipt unless the evidence holds."""
    receipts = list(report.receipts)
    if len(receipts) < 3:
        raise BadReceipt("a lying report needs the accused's receipt and two witnesses'")
    accused, witnesses = receipts[0], receipts[1:3]
    _one_check(receipts[:3], report.stage)
    signers = [signer(run_id, r) for r in receipts[:3]]
    if len(set(signers)) != 3:
        raise BadReceipt("the accused and its witnesses must be three different peers")
    if not agree(*witnesses) or agree(accused, witnesses[0]) or agree(accused, witnesses[1]):
        raise BadReceipt("the witnesses do not agree with each other against the accused")
    return signers[0]


def check_dispute(run_id: str, report: pb.LyingReport) -> list[str]:
    """The two signers of a spot check that two replicas dispute (no third one to ask), in receipt order.
    BadReceipt unless the report holds their two receipts for the input it carries, and they disagree."""
    receipts = list(report.receipts)
    if len(receipts) != 2 or not report.HasField("request") or report.request.stage != report.stage:
        raise BadReceipt("a dispute needs two replicas' receipts and the stage input they were given")
    _one_check(receipts, report.stage)
    if receipts[0].input_digest != input_digest(report.request):
        raise BadReceipt("the disputed receipts are not for the input the report carries")
    signers = [signer(run_id, r) for r in receipts]
    if signers[0] == signers[1]:
        raise BadReceipt("a dispute is between two different peers")
    if agree(*receipts):
        raise BadReceipt("the two replicas agree: there is nothing to settle")
    return signers


def settle(receipts, reference: torch.Tensor) -> int:
    """Which of two disputed receipts ``reference`` (an arbiter's own output for the input) contradicts while
    agreeing with the other; BadReceipt if it does not settle it."""
    matches = [close(value(r), reference, _codec(r)) for r in receipts]
    if matches == [True, False]:
        return 1
    if matches == [False, True]:
        return 0
    raise BadReceipt(f"the arbiter's own output agrees with {sum(matches)} of the two: not settled")
