"""What the coordinator's RPC handlers share (session_rpcs.py, task_rpcs.py, uploads.py): typed refusals,
request parsing, the session check, the rejection counters, and what a task's instruction says."""
from __future__ import annotations

import collections
import threading

import grpc
import torch
from flwr.app import ArrayRecord, Message, MessageType
from google.protobuf.message import DecodeError

from fedswarm.coordinator.aggregate import ArraysView, task_round
from fedswarm.coordinator.auth import AuthError
from fedswarm.coordinator.membership import Member, Membership
from fedswarm.proto import refusals
from fedswarm.proto.refusals import Reason, Refused

MAX_NAME = 128


def invalid(reason: Reason, detail: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, reason, detail)


def unauthenticated(err: AuthError) -> Refused:
    """A refused proof; too many unexpired proofs is RESOURCE_EXHAUSTED (retry shortly), not a bad identity."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if err.reason in refusals.RETRY_SOON else grpc.StatusCode.UNAUTHENTICATED
    return Refused(code, err.reason, err.detail)


def task_closed(detail: str) -> Refused:
    return Refused(grpc.StatusCode.FAILED_PRECONDITION, Reason.TASK_CLOSED, detail)


def replayed(task_id: str, what: str) -> Refused:
    return Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.REPLAYED_UPDATE,
                   f"{what} for task {task_id[:64]!r} was already delivered (replay)")


def unsigned(what: str) -> Refused:
    return Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.BAD_SIGNATURE,
                   f"the {what} is not signed: start the client with --key")


def parse(msg_type, raw: bytes):
    msg = msg_type()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise invalid(Reason.MALFORMED, f"cannot parse {msg_type.DESCRIPTOR.name}: {err}") from None
    return msg


def session(members: Membership, client_id: int, token: str) -> Member:
    """The caller's live session (its lease renewed); refused as replaced or unknown otherwise."""
    member = members.check(client_id, token)
    if member is None:
        if members.was_replaced(client_id):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.SESSION_REPLACED,
                          "a newer session joined with this client's key: only one daemon per key may run")
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, Reason.BAD_SESSION, "unknown client or session token: join again")
    return member


class Counters:
    """The service's own counters (status `rejections` and `clipped_updates`). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rejections: collections.Counter[str] = collections.Counter()
        self._clipped = 0

    def count(self, reason: Reason) -> None:
        with self._lock:
            self._rejections[Reason(reason).value] += 1

    def clipped(self) -> None:
        with self._lock:
            self._clipped += 1

    def snapshot(self, refused_aggregates: collections.Counter) -> dict:
        """The counters for status, with the aggregates the driver refused before commit added in."""
        with self._lock:
            rejections, clipped = collections.Counter(self._rejections), self._clipped
        rejections.update(refused_aggregates)
        return {"rejections": dict(rejections), "clipped_updates": clipped}


class TaskBases:
    """Per open task: the weights it was configured with (decoded once) and the bytes of model sent for it.
    Entries of tasks no longer open on the grid are dropped as new ones come. Thread-safe."""

    def __init__(self, grid):
        self.grid = grid
        self._bases: dict[str, dict[str, torch.Tensor]] = {}
        self._down: dict[str, int] = {}   # task id -> bytes of ModelChunk messages sent for it
        self._lock = threading.Lock()

    def base(self, task_id: str, msg: Message) -> dict[str, torch.Tensor]:
        """The weights the task was configured with (a view that decodes a tensor per read)."""
        with self._lock:
            state = self._bases.get(task_id)
            if state is None:
                for stale in [t for t in self._bases if not self.grid.is_open(t)]:
                    del self._bases[stale]
                arrays: ArrayRecord = msg.content["arrays"]
                state = self._bases[task_id] = ArraysView(arrays)
            return state

    def sent(self, task_id: str, nbytes: int) -> None:
        with self._lock:
            self._down[task_id] = self._down.get(task_id, 0) + nbytes

    def take_sent(self, *task_ids: str) -> int:
        """The bytes sent for a task (under any of its ids), taken out of the count."""
        with self._lock:
            for stale in [t for t in self._down if t not in task_ids and not self.grid.is_open(t)]:
                del self._down[stale]
            return sum(self._down.pop(t, 0) for t in set(task_ids))

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._bases.pop(task_id, None)


# -- what an instruction says -------------------------------------------------------------

def task_config(msg: Message):
    return msg.content["config"] if "config" in msg.content else {}


def is_evaluate(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.EVALUATE


def is_secagg(msg: Message) -> bool:
    """A secure-aggregation stage's instruction (coordinator/secagg_round.py), answered with PushSecAgg."""
    return "secagg-stage" in task_config(msg)


def task_version(msg: Message) -> int:
    """The global version a task's client downloads: a round trains from the previous round's model; the
    evaluation of round N scores round N's."""
    return task_round(msg) - (0 if is_evaluate(msg) else 1)


def task_stage(msg: Message) -> int:
    """The pipeline stage a swarm instruction averages (-1: the whole model)."""
    return int(task_config(msg).get("stage", -1))


def open_task(grid, task_id: str, member: Member) -> Message:
    """The instruction `task_id` if it is open for this member; refused as closed otherwise."""
    if len(task_id) > 64:
        raise invalid(Reason.BAD_TASK_ID, "task_id too long")
    msg = grid.open_instruction(task_id, member.client_id)
    if msg is None:
        raise task_closed(f"task {task_id[:64]!r} is not open for this client (finished, timed out or never sent)")
    return msg
