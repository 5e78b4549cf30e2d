"""The task RPCs but uploads (uploads.py): PullTask (a long-poll for the session's next instruction),
FetchModel (the task's weights, as the run's mode serves them: coordinator/modes.py) and PushEval (a
client's held-out loss for an evaluation task)."""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedswarm.coordinator.aggregate import task_round
from fedswarm.coordinator.auth import AuthError, Authenticator, SeenSet
from fedswarm.coordinator.config import CoordinatorTimeouts
from fedswarm.coordinator.downloads import ServedVersions
from fedswarm.coordinator.driver import RunProgress
from fedswarm.coordinator.grid import LongPoll, SessionGrid
from fedswarm.coordinator.membership import Membership
from fedswarm.coordinator.rpc import (MAX_NAME, Counters, invalid, is_evaluate, is_secagg, open_task, replayed, session,
                                      task_closed, task_config, task_version, unauthenticated, unsigned)
from fedswarm.coordinator.serving import ServingLimits
from fedswarm.metrics import counted_down
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import signing, wire
from fedswarm.proto.refusals import Reason
from fedswarm.run_config import RunConfig

log = logging.getLogger(__name__)
MAX_EVAL_LOSS = 1e4   # nats per token; a real model's loss is far below (a uniform 2^20 vocab: 13.9)


class TaskRpcs:
    def __init__(self, cfg: RunConfig, run_id: str, members: Membership, grid: SessionGrid, progress: RunProgress,
                 timeouts: CoordinatorTimeouts, limits: ServingLimits, auth: Authenticator, mode,
                 downloads: ServedVersions, counters: Counters, answered: SeenSet):
        self.cfg, self.run_id, self.members, self.grid, self.progress = cfg, run_id, members, grid, progress
        self.timeouts, self.limits, self.auth, self.mode = timeouts, limits, auth, mode
        self.downloads, self.counters, self.answered = downloads, counters, answered

    async def pull_task(self, req: pb.PullTaskRequest, context) -> pb.Task:
        member = session(self.members, req.client_id, req.session_token)
        if not math.isfinite(req.wait_s) or req.wait_s < 0:
            raise invalid(Reason.BAD_WAIT, "wait_s must be a finite number >= 0")
        if self.progress.done.is_set():
            return pb.Task(kind=pb.TASK_DONE, round=self.progress.committed_round)
        poll = LongPoll()   # a session holds limits.max_polls_per_session: a newer poll answers its oldest
        msg = await self.grid.take_task_async(member.client_id, min(req.wait_s, self.timeouts.max_pull_wait_s),
                                              poll, max_polls=self.limits.max_polls_per_session)
        if poll.superseded:
            self.counters.count(Reason.POLL_SUPERSEDED)
        if not context.cancelled():  # the long-poll renews the lease too, unless the client went away meanwhile
            self.members.check(req.client_id, req.session_token)
        if msg is None:
            kind = pb.TASK_DONE if self.progress.done.is_set() else pb.TASK_NONE
            return pb.Task(kind=kind, round=self.progress.committed_round)
        kind = pb.TASK_EVALUATE if is_evaluate(msg) else pb.TASK_SECAGG if is_secagg(msg) else pb.TASK_TRAIN
        arrays = msg.content["arrays"] if "arrays" in msg.content else ()
        return pb.Task(kind=kind, task_id=msg.metadata.message_id, round=task_round(msg),
                       config_json=json.dumps(dict(task_config(msg))), num_tensors=len(arrays))

    def fetch_model(self, req: pb.FetchModelRequest, context) -> Iterator[pb.ModelChunk]:
        """A task's weights, or (swarm, no task, stage s + 1) stage s's latest average."""
        member = session(self.members, req.client_id, req.session_token)
        max_bytes = min(req.max_part_bytes or wire.MAX_PART_BYTES, wire.MAX_PART_BYTES)
        if max_bytes < 1024:
            raise invalid(Reason.BAD_PART_SIZE, "max_part_bytes must be >= 1024")
        if not req.task_id and req.stage > 0:
            return counted_down(self.mode.stage_download(req.stage - 1, max_bytes))
        msg = open_task(self.grid, req.task_id, member)
        if is_secagg(msg):
            raise invalid(Reason.WRONG_TASK_KIND, "a secure-aggregation stage carries no model: answer it with "
                          "PushSecAgg")
        return counted_down(self.mode.download(req, msg, max_bytes))

    def push_eval(self, req: pb.EvalResult, context) -> pb.PushReply:
        """A client's answer to a TASK_EVALUATE task: its held-out loss and the tokens it scored (bounded by the
        run's --eval-windows x --seq-len, so no evaluator outweighs the others by claiming more), or why it
        cannot evaluate (a failed reply, so the round does not wait for it)."""
        member = session(self.members, req.client_id, req.session_token)
        if (member.client_id, req.task_id) in self.answered:
            raise replayed(req.task_id, "an answer")
        if self.auth.enabled and len(req.signature) != signing.SIGNATURE_BYTES:
            raise unsigned("evaluation result")
        msg = open_task(self.grid, req.task_id, member)
        if not is_evaluate(msg):
            raise invalid(Reason.WRONG_TASK_KIND, "this task asks for training: answer it with PushUpdate")
        self._check_eval(req, msg)
        try:
            self.auth.check_update(member.public_key, req.signature, self.run_id, task_round(msg), member.client_id,
                                   req.task_id, signing.eval_digest(req.loss, req.tokens))
        except AuthError as err:
            raise unauthenticated(err) from None
        if not self._deliver_eval(req, msg, member):
            raise task_closed("the task closed before its answer came")
        self.answered.add((member.client_id, req.task_id))
        return pb.PushReply(accepted=True, message="ok")

    def _deliver_eval(self, req: pb.EvalResult, msg: Message, member) -> bool:
        if req.error:
            log.warning("%s cannot evaluate round %d: %s", member.name, task_round(msg), req.error)
            return self.grid.deliver_error(req.task_id, member.client_id, f"{member.name}: {req.error}")
        return self.grid.deliver_reply(req.task_id, member.client_id, RecordDict({
            "metrics": MetricRecord({"eval_loss": float(req.loss), "num-examples": int(req.tokens)}),
            "client": ConfigRecord({"name": member.name})}))

    def _check_eval(self, req: pb.EvalResult, msg: Message) -> None:
        if req.error:
            if len(req.error) > MAX_NAME * 4 or not req.error.isprintable():
                raise invalid(Reason.BAD_EVAL, f"error must be at most {MAX_NAME * 4} printable characters")
            return
        max_tokens = self.cfg.eval_windows * self.cfg.seq_len
        if not (math.isfinite(req.loss) and 0 <= req.loss <= MAX_EVAL_LOSS) or not 1 <= req.tokens <= max_tokens:
            raise invalid(Reason.BAD_EVAL, f"loss must be in [0, {MAX_EVAL_LOSS:g}] and tokens in 1..{max_tokens} "
                          f"(--eval-windows x --seq-len)")
        served = self.downloads.digest(task_version(msg))
        if req.base_digest and served is not None and bytes(req.base_digest) != served:
            raise invalid(Reason.BAD_BASE, "the loss was measured on weights other than this task's model: "
                          "download the task's model again")
