"""A stage server's chained forwards and spot checks (mixed into StageServer, which owns module, pool, node,
roster, liar and the compute path): every stage signs a receipt of what came in and went out (receipts.py), a
hop that fails is named in a signed claim with the input it was sent, and a spot check runs the forward on the
stage's last committed average, which every replica holds alike."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math

import torch

from fedswarm import receipts as R
from fedswarm.client.swarm.tensors import BadStageInput, from_wire, to_wire
from fedswarm.p2p import PeerCallError
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.proto.refusals import Reason

HANDLER = "fedswarm.stage"
CHAIN_HOP_S = 10.0            # a chained forward allows this long per stage still ahead of it
MAX_NEIGHBOURS = 256          # neighbours whose chained tokens a heartbeat reports


def check_hop_reply(reply: pb.StageReply, shape: tuple, allowed: set) -> None:
    """BadStageInput unless the next hop answered a chained forward with a finite loss and input gradient."""
    if not math.isfinite(reply.loss):
        raise BadStageInput(f"loss {reply.loss}", Reason.BAD_REPLY)
    if not torch.isfinite(from_wire(reply.grad_input, shape, allowed)).all():
        raise BadStageInput("the input gradient is not finite", Reason.BAD_REPLY)


@contextlib.contextmanager
def on_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], device: torch.device):
    """Run `module` on `state` (tensors by parameter name, e.g. the bf16 committed average) instead of its own
    parameters: each submodule's are swapped in as float32 copies only while that submodule runs, so no float32
    copy of the whole state is ever held. Its own parameters are back afterwards, even after an error."""
    owned: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        owned[prefix][leaf] = tensor
    modules, saved, handles = dict(module.named_modules()), {}, []

    def swap_in(m, _args, own):
        saved[m] = {k: m._parameters[k] for k in own}
        for k, t in own.items():
            m._parameters[k] = t.to(device, torch.float32)

    def swap_out(m, _args, _out):
        m._parameters.update(saved.pop(m))

    for prefix, own in owned.items():
        handles += [modules[prefix].register_forward_pre_hook(functools.partial(swap_in, own=own)),
                    modules[prefix].register_forward_hook(swap_out)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, params in saved.items():
            m._parameters.update(params)


class ChainingStage:
    """Chains, receipts, claims and spot checks of a StageServer."""

    @property
    def key(self):
        """The libp2p key this replica signs its receipts with (receipts.py); None without a node."""
        return getattr(self.node, "signing_key", None)

    async def _chain(self, request: pb.StageRequest) -> pb.StageReply:
        """A chained forward: run this stage, send the output to the next hop the trainer chose, then run this
        stage's backward with the gradient the chain returns, and answer with every stage's signed receipt from
        this one on. A next hop that fails (or answers without valid receipts) is named in a signed claim that
        carries the input sent to it, so the trainer can re-run that hop and check; a valid claim from further
        down is relayed as it is, one that does not check out is blamed on the next hop."""
        loop = asyncio.get_running_loop()
        stage, hops = request.stage, list(request.next_hops)
        if self.module is None or len(hops) != self.cfg.stages - 1 - stage:
            self.refusals.add(Reason.BAD_ROUTE)
            raise BadStageInput(f"a chain from stage {stage} needs {self.cfg.stages - 1 - stage} next hops, "
                                f"got {len(hops)}", Reason.BAD_ROUTE)
        if self.liar is not None:
            lie = self.liar.instead_of_chain(stage, hops, self.node.peer_id, self.roster.stage_peers(stage)
                                             - {self.node.peer_id} if self.roster is not None else ())
            if lie is not None:
                return lie
        forward = await loop.run_in_executor(self.pool, self._timed_compute, request)
        self.chained_total += 1
        d_in = R.input_digest(request)
        if self.roster is not None and not await self._on_roster_soon(lambda: hops[0] in self.roster.stage_peers(stage + 1)):
            return self._claim(request, d_in, forward.hidden, hops[0], f"not on this peer's roster of stage {stage + 1}")
        nxt = pb.StageRequest(run_id=request.run_id, stage=stage + 1, microbatch_id=request.microbatch_id,
                              hidden=forward.hidden, labels=request.labels, next_hops=hops[1:], audit=request.audit)
        route = {stage + 1 + i: peer for i, peer in enumerate(hops)}
        try:
            down = await self.node.acall(hops[0], HANDLER, nxt, pb.StageReply, CHAIN_HOP_S * len(hops))
            if down.failed_peer:
                return self._relay_claim(request, d_in, forward.hidden, down, {stage: self.node.peer_id, **route})
            check_hop_reply(down, tuple(forward.hidden.shape), self.allowed)
            R.check_chain(self.run_id, request.microbatch_id, route, R.tensor_digest(forward.hidden), down.receipts,
                          down.loss, audit=request.audit)
        except PeerCallError as err:
            return self._claim(request, d_in, forward.hidden, hops[0], f"{err.kind}: {err.reason}")
        except (BadStageInput, R.BadReceipt) as err:
            return self._claim(request, d_in, forward.hidden, hops[0], f"malformed reply: {err}")
        backward = pb.StageRequest()
        backward.CopyFrom(request)
        del backward.next_hops[:]
        backward.backward = True
        backward.grad_output.CopyFrom(down.grad_input)
        reply = await loop.run_in_executor(self.pool, self._timed_compute, backward)
        reply.loss = down.loss
        reply.receipts.append(self._receipt(request, R.tensor_digest(forward.hidden), d_in=d_in,
                                            output=forward.hidden if request.audit else None))
        reply.receipts.extend(down.receipts)
        self._confirm(hops[0], nxt)
        return self.liar.after_chain(stage, reply) if self.liar is not None else reply

    def _sign(self, request: pb.StageRequest, reply: pb.StageReply) -> None:
        """The last stage signs the loss it computed (a chain's trainer counts nothing without it); an audited
        forward signs its output and attaches it (the trainer spot-checks it)."""
        if reply.receipts or request.backward or not (request.audit or self.module.is_last):
            return
        out = reply.hidden if reply.HasField("hidden") else None
        reply.receipts.append(self._receipt(request, R.tensor_digest(out if out is not None else reply.grad_input),
                                            loss=reply.loss, output=out if request.audit else None))

    def _confirm(self, peer: str, request: pb.StageRequest) -> None:
        """Count the tokens of a chained exchange with neighbour `peer` (heartbeats report them: the coordinator
        bounds a replica's averaging weight by what its neighbours confirm)."""
        with self._lock:
            self.confirmed[peer] += int(request.hidden.shape[0]) * int(request.hidden.shape[1])

    def confirmed_tokens(self) -> dict[str, int]:
        with self._lock:
            return dict(self.confirmed.most_common(MAX_NEIGHBOURS))

    def _receipt(self, request: pb.StageRequest, d_out: bytes, d_in: bytes | None = None, loss: float = 0.0,
                 output: pb.SwarmTensor | None = None, failed: tuple[str, str] = ("", ""),
                 weights_version: bytes = b"") -> pb.StageReceipt:
        """This replica's signed account of `request`: its input, its output (`output`: attached too)."""
        r = pb.StageReceipt(microbatch_id=request.microbatch_id, stage=request.stage, output_digest=d_out,
                            input_digest=d_in if d_in is not None else R.input_digest(request), loss=loss,
                            failed_peer=failed[0], failed_reason=failed[1][:500], weights_version=weights_version)
        if output is not None:
            r.output.CopyFrom(output)
        return R.sign(self.key, self.run_id, r) if self.key is not None else r

    def _claim(self, request: pb.StageRequest, d_in: bytes, sent: pb.SwarmTensor, peer: str, why: str) -> pb.StageReply:
        """A signed claim that the next hop `peer` failed, carrying the input this replica sent it."""
        receipt = self._receipt(request, R.tensor_digest(sent), d_in=d_in, output=sent, failed=(peer, why))
        return pb.StageReply(failed_peer=peer, failed_reason=why[:500], receipts=[receipt])

    def _relay_claim(self, request: pb.StageRequest, d_in: bytes, sent: pb.SwarmTensor, down: pb.StageReply,
                     route: dict[int, str]) -> pb.StageReply:
        """A failure claim from further down: relayed if it is a valid claim of a hop after this one's, else
        blamed on the next hop (which sent it)."""
        claim = down.receipts[0] if len(down.receipts) == 1 else None
        try:
            if claim is None or claim.stage <= request.stage:
                raise R.BadReceipt("a failure reply without one signed claim from further down")
            R.check_claim(self.run_id, request.microbatch_id, route, claim)
        except R.BadReceipt as err:
            return self._claim(request, d_in, sent, route[request.stage + 1], f"malformed reply: {err}")
        return pb.StageReply(failed_peer=claim.failed_peer, failed_reason=claim.failed_reason, receipts=[claim])

    def _set_base(self, state: dict) -> None:
        """Keep `state` (the stage's committed average; None in it: this replica did not adopt it) in bf16."""
        if any(t is None for t in state.values()):
            self.base, self.base_version = {}, b""
            self.checked_base = ({}, b"")
            return
        base = {n: t.detach().to("cpu", torch.bfloat16) for n, t in state.items()}   # a sync's: already bf16
        self.base, self.base_version = base, wire.state_digest(base)   # a tensor at a time, in name order
        self.checked_base = (base, self.base_version)   # read as one by spot checks

    def _verify(self, req: pb.StageRequest) -> pb.StageReply:
        """A spot check: the forward alone on the stage's last committed average (which every replica holds
        alike), with no graph kept and no step; the reply carries its signed receipt with the output (the last
        stage: the loss)."""
        base, base_version = self.checked_base   # one sync's, even if the next one starts meanwhile
        if not base:
            raise BadStageInput("this replica holds no committed average to check against", Reason.NOT_SERVING)
        m = self.module
        x, labels = self._inputs(req)
        with torch.no_grad(), self._autocast(), on_weights(m, base, self.device):
            out = m(x, labels) if m.is_last else m(x)
        version = {"weights_version": base_version}
        if m.is_last:
            loss = self._sent_loss(float(out))
            return pb.StageReply(loss=loss, receipts=[self._receipt(req, b"", loss=loss, **version)])
        hidden = to_wire(self._sent(out), self.codec)
        return pb.StageReply(hidden=hidden, receipts=[self._receipt(req, R.tensor_digest(hidden), output=hidden,
                                                                    **version)])

    def _sent(self, out: torch.Tensor) -> torch.Tensor:
        return self.liar.output(out) if self.liar is not None else out

    def _sent_loss(self, loss: float) -> float:
        return self.liar.loss(loss) if self.liar is not None else loss
