"""A peer serving one pipeline stage over hivemind P2P (forward, backward, its own AdamW)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from fedswarm.client.swarm.lies import Liar
from fedswarm.client.swarm.roster import Roster
from fedswarm.client.swarm.chain import HANDLER, ChainingStage  # noqa: F401 - HANDLER: the stage's P2P name
from fedswarm.client.swarm.stage_sync import SyncingStage
from fedswarm.client.swarm.tensors import BadStageInput, from_wire, ids_from_bytes, to_wire
from fedswarm.p2p import MAX_P2P_MESSAGE, Refusals
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.run_config import RunConfig
from fedswarm.stage_lora import build_lora_stage
from fedswarm.stages import build_stage, load_stage_state, stage_state
from fedswarm.proto.refusals import Reason

log = logging.getLogger(__name__)
GRAPH_CACHE = 32              # forward graphs kept for a backward on this replica
ROSTER_WAIT_S = 1.0           # an unknown caller may be a trainer that just joined: wait this long for the roster
MAX_ROSTER_WAITERS = 8        # ... but only this many at once; more unknown callers are refused at once
GRAD_CLIP_NORM = 1.0          # a replica's gradient is clipped to this L2 norm before its optimizer step


def _fault_plan() -> tuple[str, float] | None:
    """FEDSWARM_FAULT=die_on_forward:N or die_on_backward:N: SIGKILL this peer (its whole process
    group, p2pd included) while it handles its N-th such request; slow:SECONDS: spend SECONDS more on every
    forward and backward (a slow device). For fault-injection tests and sims."""
    spec = os.environ.get("FEDSWARM_FAULT", "")
    if not spec:
        return None
    kind, _, count = spec.partition(":")
    if kind == "slow":
        try:
            seconds = float(count)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= 60:
            raise ValueError(f"FEDSWARM_FAULT={spec!r}: slow takes 0 to 60 seconds per request, e.g. slow:0.05")
        return kind, seconds
    if kind not in ("die_on_forward", "die_on_backward") or not count.isdigit() or int(count) < 1:
        raise ValueError(f"FEDSWARM_FAULT={spec!r}: use die_on_forward:N, die_on_backward:N or slow:SECONDS")
    return kind, int(count)


class StageServer(SyncingStage, ChainingStage):
    """All model work runs on one worker thread, so requests never race on the weights."""

    def __init__(self, run_id: str, cfg: RunConfig, device: torch.device, precision: str, roster: Roster | None = None,
                 node=None):
        self.run_id, self.cfg, self.device, self.precision = run_id, cfg, device, precision
        self.roster = roster      # None: serve any caller (tests of the stage math only)
        self.node = node          # the SwarmNode chained forwards go out on (None: no chaining)
        self.refusals = Refusals()
        self._roster_waiters = 0
        self.codec = C.codec_by_name(cfg.activation_codec)
        self.allowed = {self.codec, C.CODEC_NAMES["none"], C.CODEC_NAMES["fp16"], C.CODEC_NAMES["bf16"]}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self.stage_index = -1
        self.module = None
        self.optimizer = None
        self.snapshot: dict[str, torch.Tensor] = {}   # weights right after the last sync
        self.base: dict[str, torch.Tensor] = {}       # the last committed average, bf16: what spot checks run on
        self.base_version = b""                        # ... and its digest
        self.checked_base: tuple[dict, bytes] = ({}, b"")   # both, swapped as one
        self._next_base: dict[str, torch.Tensor | None] = {}   # a sync's average, collected as it is adopted
        self._trainable: dict[str, torch.nn.Parameter] = {}   # the parameters a sync adopts, by name
        self._adopting: collections.deque = collections.deque()   # (name, average tensor, Future) to adopt
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.load = 0
        self.steps_since_sync = 0
        self.optimizer_steps = 0
        self.backward_total, self.recomputed_total = 0, 0   # diagnostics: how often a graph had to be re-run
        self.chained_total = 0       # diagnostics: forwards this peer sent on down a chain itself
        self.weights_version = 0     # bumped by every in-place change of the weights (step, sync)
        self.tokens_since_sync = 0
        self._rate_tokens, self._rate_t0, self.throughput = 0, time.monotonic(), 0.0
        self._busy_s, self.utilization = 0.0, 0.0
        self._lock = threading.Lock()
        self.confirmed: collections.Counter = collections.Counter()   # neighbour peer id -> chained tokens
        self._fault = _fault_plan()
        self._fault_seen = 0
        self.liar = Liar.from_env()   # FEDSWARM_LIE: a test knob (lies.py)

    # -- control (called from the daemon's threads) ---------------------------------------
    def serve(self, stage: int, weights: dict[str, torch.Tensor]) -> None:
        self.pool.submit(self._serve, stage, weights).result()

    def _serve(self, stage: int, weights: dict[str, torch.Tensor]) -> None:
        """Build only this stage's modules from `weights`; the old stage (module, optimizer, cached graphs,
        snapshot) is freed first, so a re-assigned peer never holds two stages at once."""
        self.stage_index = -1   # heartbeats report serving nothing while the new stage loads: not routed to
        self.module = self.optimizer = None
        self.graphs.clear()
        self.snapshot, self._trainable = {}, {}
        gc.collect()            # cached graphs hold reference cycles through autograd nodes
        if self.cfg.peft == "lora":   # the frozen base from the model on this host, adapters given
            module = build_lora_stage(self.cfg, stage, weights, device=self.device)
        else:
            module = build_stage(self.cfg.model, stage, self.cfg.stages, state=weights, device=self.device)
        self.module = module.train()
        self.optimizer = self._new_optimizer()
        self.snapshot = stage_state(self.module)
        self._set_base(self.snapshot)   # a stage loads its latest committed average
        self._trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        with self._lock:
            self.stage_index, self.steps_since_sync, self.tokens_since_sync = stage, 0, 0
        log.info("serving stage %d of %d (%d tensors)", stage, self.cfg.stages, len(weights))

    def stats(self) -> tuple[float, int, float, float]:
        """(tokens/s and busy fraction over the last window, optimizer steps since sync, requests in flight)."""
        with self._lock:
            now = time.monotonic()
            if now - self._rate_t0 >= 2.0:
                self.throughput = self._rate_tokens / (now - self._rate_t0)
                self.utilization = min(self._busy_s / (now - self._rate_t0), 1.0)
                self._rate_tokens, self._busy_s, self._rate_t0 = 0, 0.0, now
            return self.throughput, self.steps_since_sync, self.utilization, float(self.load)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- the P2P handler -------------------------------------------------------------------
    async def handle(self, request: pb.StageRequest, context) -> pb.StageReply:
        caller = context.remote_id.to_base58() if context.remote_id is not None else ""
        await self._admit(caller, request)
        with self._lock:
            self.load += 1
        try:
            if request.next_hops and not request.backward and not request.verify:
                reply = await self._chain(request)
            else:
                reply = await asyncio.get_running_loop().run_in_executor(self.pool, self._timed_compute, request)
                self._sign(request, reply)
            if not reply.failed_peer and not request.backward and not request.verify and request.stage > 0 \
                    and self.roster is not None and not self.roster.is_trainer(caller):
                self._confirm(caller, request)   # a chained forward from the stage before, served
            return reply
        finally:
            with self._lock:
                self.load -= 1

    def _may_call(self, caller: str, request: pb.StageRequest) -> bool:
        """The run's trainers, and (for a chained forward) the roster peers of the stage before this one."""
        if self.roster.is_trainer(caller):
            return True
        return not request.backward and request.stage > 0 and caller in self.roster.stage_peers(request.stage - 1)

    async def _on_roster_soon(self, holds) -> bool:
        """`holds()` now, or after a roster update within ROSTER_WAIT_S: a member that joined (or began serving)
        a moment ago is on the next roster this peer's heartbeat brings. At most MAX_ROSTER_WAITERS wait."""
        if holds():
            return True
        if self._roster_waiters >= MAX_ROSTER_WAITERS:
            return False
        self._roster_waiters += 1
        try:
            return await asyncio.to_thread(self.roster.wait_for, holds, ROSTER_WAIT_S)
        finally:
            self._roster_waiters -= 1

    async def gate(self, context) -> int:
        """Before a request is read: refuse (counted `not_member`) a caller who is no member of the run at all;
        a member may send at most `request_limit()` bytes."""
        caller = context.remote_id.to_base58() if context.remote_id is not None else ""
        if self.roster is None or await self._on_roster_soon(lambda: self.roster.is_member(caller)):
            return self.request_limit()
        self.refusals.add(Reason.NOT_MEMBER)
        log.warning("refused a call from %s before reading it: not a member of this run", caller)
        raise BadStageInput(f"refused: peer {caller} is not a member of this run", Reason.NOT_MEMBER)

    def request_limit(self) -> int:
        """The most bytes a stage request of this run can hold: an fp32 activation and its gradient of the run's
        micro-batch (batch_size x seq_len x hidden), its ids and labels, and 1 MiB of envelope; before a stage
        is loaded, the P2P plane's own bound."""
        module = self.module
        if module is None:
            return MAX_P2P_MESSAGE
        tokens = self.cfg.batch_size * self.cfg.seq_len
        return 2 * 4 * tokens * int(module.config.hidden_size) + 2 * 4 * tokens + (1 << 20)

    async def _admit(self, caller: str, request: pb.StageRequest) -> None:
        """Serve only the run's members (the coordinator's roster); refuse anyone else before any work."""
        if self.roster is None or await self._on_roster_soon(lambda: self._may_call(caller, request)):
            return
        self.refusals.add(Reason.NOT_MEMBER)
        log.warning("refused a call from %s: not a trainer of this run", caller)
        raise BadStageInput(f"refused: peer {caller} is not a trainer of this run", Reason.NOT_MEMBER)

    def _timed_compute(self, request: pb.StageRequest) -> pb.StageReply:
        self._adopt_pending()   # a sync's tensors go first: its coordinator round is waiting on them
        started = time.monotonic()
        try:
            return self._compute(request)
        except BadStageInput as err:
            self.refusals.add(err.reason)
            raise
        finally:
            with self._lock:
                self._busy_s += time.monotonic() - started

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _inputs(self, req: pb.StageRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.module
        if req.run_id != self.run_id:
            raise BadStageInput(f"run {req.run_id[:32]!r} is not this peer's run", Reason.WRONG_RUN)
        if req.stage != self.stage_index:
            raise BadStageInput(f"this peer serves stage {self.stage_index}, not {req.stage} (re-assigned)", Reason.WRONG_STAGE)
        # the run's micro-batch is batch x seq_len: anything larger is refused before any compute
        max_batch, max_len = self.cfg.batch_size, self.cfg.seq_len
        shape = tuple(req.ids_shape) if m.is_first else tuple(req.hidden.shape)
        if len(shape) != (2 if m.is_first else 3) or not 1 <= shape[0] <= max_batch or not 1 <= shape[1] <= max_len \
                or (not m.is_first and shape[2] != m.config.hidden_size):
            raise BadStageInput(f"input shape {shape[:8]} invalid: this run takes at most [{max_batch}, {max_len}"
                                f"{'' if m.is_first else f', {m.config.hidden_size}'}]", Reason.BAD_SHAPE)
        if m.is_first:
            x = ids_from_bytes(req.ids, req.ids_shape, m.config.vocab_size, max_len)
        else:
            x = from_wire(req.hidden, shape, self.allowed)
            if not torch.isfinite(x).all():
                raise BadStageInput("input activations are not finite", Reason.NON_FINITE)
            x = x.requires_grad_()
        labels = ids_from_bytes(req.labels, shape[:2], m.config.vocab_size, max_len, labels=True) if m.is_last else None
        return x.to(self.device), (labels.to(self.device) if labels is not None else None)

    def _maybe_die(self, req: pb.StageRequest) -> None:
        kind = "die_on_backward" if req.backward else "die_on_forward"
        if self._fault and self._fault[0] == "slow":
            time.sleep(self._fault[1])   # inside _timed_compute: counted as busy, like a slower device
        if self._fault and self._fault[0] == kind:
            self._fault_seen += 1
            if self._fault_seen >= self._fault[1]:
                log.error("fault injection: dying during %s of micro-batch %s", kind[7:], req.microbatch_id)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os.killpg(os.getpgrp(), signal.SIGKILL)

    def _compute(self, req: pb.StageRequest) -> pb.StageReply:
        if self.module is None:
            raise BadStageInput("this peer is not serving a stage yet", Reason.NOT_SERVING)
        if req.verify:
            return self._verify(req)
        self._maybe_die(req)
        m = self.module
        if m.is_last:  # forward and backward at once: logits never leave this peer
            x, labels = self._inputs(req)
            with self._autocast():
                loss = m(x, labels)
            if not torch.isfinite(loss):
                self._repair_if_broken()
                raise BadStageInput("the loss is not finite", Reason.NON_FINITE)
            loss.backward()
            reply = pb.StageReply(loss=self._sent_loss(loss.item()))
            if not m.is_first:
                reply.grad_input.CopyFrom(to_wire(x.grad, self.codec))
            self._after_backward(x)
            return reply
        if not req.backward:
            x, _ = self._inputs(req)
            with self._autocast():
                out = m(x)
            if not torch.isfinite(out).all():
                self._repair_if_broken()
                raise BadStageInput("the stage's output is not finite", Reason.NON_FINITE)
            self.graphs[req.microbatch_id] = (x, out, self.weights_version)
            while len(self.graphs) > GRAPH_CACHE:
                self.graphs.popitem(last=False)
            self._count(x)
            return pb.StageReply(hidden=to_wire(self._sent(out), self.codec))
        cached = self.graphs.pop(req.microbatch_id, None)
        # A graph is only valid if the weights it saved did not change (step or sync) since its forward.
        recomputed = cached is None or cached[2] != self.weights_version
        if recomputed:  # the forward ran on another replica, was evicted, or is stale: re-run it here
            x, _ = self._inputs(req)
            with self._autocast():
                out = m(x)
        else:
            x, out, _ = cached
        grad = from_wire(req.grad_output, tuple(out.shape), self.allowed)
        if not torch.isfinite(grad).all():
            raise BadStageInput("the output gradient is not finite", Reason.NON_FINITE)
        grad = grad.to(self.device, out.dtype)
        out.backward(grad)
        self.backward_total += 1
        self.recomputed_total += int(recomputed)
        reply = pb.StageReply(recomputed=recomputed)
        if not m.is_first:
            reply.grad_input.CopyFrom(to_wire(x.grad, self.codec))
        self._after_backward(x)
        return reply

    def _count(self, x: torch.Tensor) -> None:
        with self._lock:
            self._rate_tokens += x.shape[0] * x.shape[1]

    def _after_backward(self, x: torch.Tensor) -> None:
        """One optimizer step per backward pass (each micro-batch is one step of this replica), on the gradient
        clipped to GRAD_CLIP_NORM. A gradient that is not finite (or whose norm overflows fp32) is refused and
        counted, never stepped; so is one that makes the input gradient sent back non-finite."""
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), GRAD_CLIP_NORM)
        if not torch.isfinite(norm) or (x.grad is not None and not torch.isfinite(x.grad).all()):
            self.optimizer.zero_grad(set_to_none=True)
            self._repair_if_broken()   # non-finite weights give non-finite gradients too
            raise BadStageInput("the gradient is not finite: refused, not stepped", Reason.NON_FINITE_GRAD)
        if self.module.is_last:
            self._count(x)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with self._lock:   # stats() reads them from the heartbeat thread
            self.steps_since_sync += 1
            self.tokens_since_sync += x.shape[0] * x.shape[1]
        self.optimizer_steps += 1
        self._weights_changed()

    def _weights_changed(self) -> None:
        """The weights changed in place (a step, a sync, a repair): every cached forward graph saved the old
        ones, so no backward can use it (it would re-run its forward anyway). Drop them now: each holds a
        micro-batch's activations, and 32 stale ones held more than the stage's whole state."""
        self.weights_version += 1
        self.graphs.clear()

    # -- weight health ----------------------------------------------------------------------
    def _new_optimizer(self) -> torch.optim.Optimizer:
        # fused: one kernel per tensor, without the single-tensor path's temporaries (two of the largest
        # tensor's size per step: 216 MiB for a 135M Llama's embedding)
        return torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad],
                                 lr=self.cfg.lr, weight_decay=0.01, fused=self.device.type in ("cpu", "cuda"))

    def _weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.module.parameters() if p.requires_grad)

    def _repair_if_broken(self) -> bool:
        """If the replica's weights hold a NaN or Inf, go back to its last good state (the snapshot taken at the
        last sync or stage load: no extra copy is kept) with a fresh optimizer; counted as `weights_restored`,
        which heartbeats carry to the coordinator. Progress since that sync is lost (its weight drops to 0)."""
        if self._weights_finite():
            return False
        load_stage_state(self.module, self.snapshot)
        self.optimizer = self._new_optimizer()
        self._weights_changed()
        self.tokens_since_sync = 0
        self.refusals.add(Reason.WEIGHTS_RESTORED)
        log.error("stage %d: this replica's weights turned non-finite; restored the state of its last sync",
                  self.stage_index)
        return True
