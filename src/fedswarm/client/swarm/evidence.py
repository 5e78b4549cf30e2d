"""What a trainer blames, and on what evidence (receipts.py): a chained reply counts only with every stage's
valid signed receipt; a claim that a hop failed is checked by re-running that hop directly; spot checks re-run
an audited micro-batch's stage calls on other replicas, and a third replica arbitrates a mismatch (with only
two, the coordinator re-runs the input on its own copy of the stage). A trainer never bans a peer only because
another peer says so."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from fedswarm import receipts as R
from fedswarm.client.swarm.tensors import WIRE_CODECS, BadStageInput, from_wire
from fedswarm.p2p import PeerCallError
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto.refusals import Reason

log = logging.getLogger(__name__)


@dataclass
class Blame:
    """Whom the evidence points at, why, and the refusal it is counted as (None: the trainer's own call failed)."""
    peer: str
    why: str
    reason: Reason | None = None


@dataclass
class SpotStats:
    checked: int = 0        # stage calls re-run on a second replica
    unchecked: int = 0      # ... that had no second replica to re-run on
    disputes: int = 0       # mismatches no third replica could settle (the coordinator settles them)
    caught: int = 0         # liars caught


class Evidence:
    """The trainer's judge; `call(peer, stage, request)` is its call to one replica (deadline, roster checks)."""

    def __init__(self, run_id: str, num_stages: int, hidden_shape_of, call, router, completed=lambda: 0):
        self.run_id, self.num_stages, self.call, self.router = run_id, num_stages, call, router
        self.completed = completed   # the trainer's completed micro-batches (logged with a conviction)
        self.hidden_shape_of = hidden_shape_of
        self.spot = SpotStats()
        self.liars: set[str] = set()
        self._reports: list[pb.LyingReport] = []
        self._disputed: set[frozenset] = set()   # pairs of replicas whose dispute went to the coordinator
        self._lock = threading.Lock()

    def take_reports(self) -> list[pb.LyingReport]:
        with self._lock:
            reports, self._reports = self._reports, []
        return reports

    # -- chained replies ---------------------------------------------------------------------------------
    def chain(self, mb: str, peers: list[str], req: pb.StageRequest, reply: pb.StageReply) -> Blame | None:
        """None if ``reply`` proves a completed micro-batch over ``peers``; else whom to blame."""
        if reply.failed_peer:
            return self.claim(mb, peers, req, reply)
        try:
            R.check_chain(self.run_id, mb, dict(enumerate(peers)), R.input_digest(req), reply.receipts, reply.loss,
                          audit=req.audit)
        except R.BadReceipt as err:
            return Blame(err.blame or peers[0], f"a reply without valid receipts: {err}", Reason.BAD_RECEIPT)
        return None

    def claim(self, mb: str, peers: list[str], req: pb.StageRequest, reply: pb.StageReply) -> Blame:
        """A claim that a hop failed: the claimer must have signed it, and the hop it names must fail when the
        trainer re-runs it on the input the claimer sent; otherwise the claimer is to blame."""
        claim = reply.receipts[0] if len(reply.receipts) == 1 else None
        try:
            if claim is None:
                raise R.BadReceipt("a failure reply without one signed claim")
            stage = R.check_claim(self.run_id, mb, dict(enumerate(peers)), claim)
        except R.BadReceipt as err:
            return Blame(peers[0], f"passed on a claim against {reply.failed_peer[:60]!r} that does not check out: "
                                   f"{err}", Reason.FALSE_BLAME)
        claimer, named, shape = peers[stage - 1], peers[stage], self.hidden_shape_of(req)
        try:
            if not torch.isfinite(from_wire(claim.output, shape, WIRE_CODECS)).all():
                raise BadStageInput("not finite")
        except BadStageInput as err:
            return Blame(claimer, f"sent stage {stage} a malformed activation ({err})", Reason.BAD_REPLY)
        rerun = self._request(mb, stage, req, claim.output)
        try:
            self._verified(named, stage, rerun)
        except (PeerCallError, R.BadReceipt) as err:
            return Blame(named, f"{claim.failed_reason[:200]} (a direct re-run failed too: {err})")
        return Blame(claimer, f"claimed stage {stage}'s {named} failed ({claim.failed_reason[:200]}), but it "
                              "answers a direct re-run", Reason.FALSE_BLAME)

    def _request(self, mb: str, stage: int, first: pb.StageRequest, hidden: pb.SwarmTensor | None) -> pb.StageRequest:
        """A spot check (verify) of ``stage`` for micro-batch ``mb``: stage 0 on the tokens, later stages on
        ``hidden``; the last stage with the labels."""
        req = pb.StageRequest(run_id=self.run_id, stage=stage, microbatch_id=mb, verify=True)
        if stage == 0:
            req.ids, req.ids_shape[:] = first.ids, list(first.ids_shape)
        else:
            req.hidden.CopyFrom(hidden)
        if stage == self.num_stages - 1:
            req.labels = first.labels
        return req

    def _verified(self, peer: str, stage: int, req: pb.StageRequest) -> pb.StageReceipt:
        """``peer``'s signed receipt for a verify call; PeerCallError / BadReceipt if it fails or is not one."""
        reply = self.call(peer, stage, req)
        if len(reply.receipts) != 1:
            raise R.BadReceipt("a spot check answered without a receipt")
        r = reply.receipts[0]
        if R.signer(self.run_id, r) != peer or r.microbatch_id != req.microbatch_id or r.stage != stage \
                or r.input_digest != R.input_digest(req) or r.failed_peer:
            raise R.BadReceipt("a spot check's receipt is not this replica's for this input")
        if stage < self.num_stages - 1 and not r.HasField("output"):
            raise R.BadReceipt("a spot check's receipt carries no output")
        if not torch.isfinite(R.value(r)).all():
            raise R.BadReceipt("a spot check's output is not finite")
        return r

    # -- spot checks ----------------------------------------------------------------------------------
    def spot_check(self, mb: str, peers: list[str], first: pb.StageRequest, receipts) -> Blame | None:
        """Re-run every stage call of an audited micro-batch (its inputs as the chain's receipts carry them) on
        the replica that served it and on another, both on the stage's last committed average; a third settles
        a mismatch. Blames a replica of ``peers`` caught lying (the micro-batch is replayed); a lying witness is
        reported and banned too."""
        for stage in range(self.num_stages):
            req = self._request(mb, stage, first, receipts[stage - 1].output if stage else None)
            if self._arbitrate(stage, peers[stage], req) == peers[stage]:
                return Blame(peers[stage], f"caught lying by a spot check of stage {stage}", Reason.LYING_PEER)
        return None

    def _witness(self, stage: int, req: pb.StageRequest, exclude: set[str], version: bytes
                 ) -> tuple[str, pb.StageReceipt] | None:
        """Another replica's verified answer to ``req`` on the same committed average (trying each eligible one
        once), or None."""
        while True:
            record = self.router.choose(stage, exclude=exclude)
            if record is None:
                return None
            exclude = exclude | {record.peer_id}
            try:
                receipt = self._verified(record.peer_id, stage, req)
            except R.BadReceipt as err:
                self.router.ban(record.peer_id, f"spot check of stage {stage}: {err}")
                continue
            except PeerCallError:
                continue
            if receipt.weights_version == version:
                return record.peer_id, receipt

    def _arbitrate(self, stage: int, peer: str, req: pb.StageRequest) -> str | None:
        """The liar among ``peer`` and two witnesses, if the evidence shows one."""
        try:
            own = (peer, self._verified(peer, stage, req))
        except (PeerCallError, R.BadReceipt):   # e.g. no committed average yet
            self.spot.unchecked += 1
            return None
        first = self._witness(stage, req, {peer}, own[1].weights_version)
        if first is None:
            self.spot.unchecked += 1
            return None
        self.spot.checked += 1
        if R.agree(own[1], first[1]):
            return None
        second = self._witness(stage, req, {peer, first[0]}, own[1].weights_version)
        if second is None:
            self._dispute(stage, req, own, first)
            return None
        for accused, witnesses in ((own, (first, second)), (first, (own, second)), (second, (own, first))):
            report = pb.LyingReport(stage=stage, receipts=[accused[1], witnesses[0][1], witnesses[1][1]])
            try:
                R.judge(self.run_id, report)
            except R.BadReceipt:
                continue
            self._convict(accused[0], stage, report)
            return accused[0]
        self.spot.disputes += 1
        return None

    def _dispute(self, stage: int, req: pb.StageRequest, own: tuple, first: tuple) -> None:
        """Two replicas disagree and no third can settle it: the coordinator re-runs the input on its own copy
        of the stage (once per pair: a report carries up to three activations)."""
        self.spot.disputes += 1
        pair = frozenset((own[0], first[0]))
        with self._lock:
            if pair in self._disputed:
                return
            self._disputed.add(pair)
            self._reports.append(pb.LyingReport(stage=stage, receipts=[own[1], first[1]], request=req))
        log.warning("spot check of stage %d: %s and %s disagree, and no third replica can settle it: sent to the "
                    "coordinator to settle", stage, own[0], first[0])

    def _convict(self, peer: str, stage: int, report: pb.LyingReport) -> None:
        with self._lock:
            if peer in self.liars:
                return
            self.liars.add(peer)
            self._reports.append(report)
        self.spot.caught += 1
        self.router.ban(peer, f"caught lying by a spot check of stage {stage}", forever=True)
        log.error("spot check: %s (stage %d) lies: two other replicas agree against its output; reported "
                  "(caught after %d micro-batches, %d stage calls re-run)", peer, stage, self.completed(),
                  self.spot.checked)
