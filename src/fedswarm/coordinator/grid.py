"""A `flwr.serverapp.Grid` over our own gRPC sessions.

Strategies call push/pull/send_and_receive exactly as they would against a
SuperLink; instead, each instruction message is queued for the client daemon
it names, handed out by PullTask, and answered by PushUpdate. A node that
loses its lease gets an error reply for each of its open messages, so the
strategy sees a failure (as data) rather than waiting forever.

A verified upload is delivered through the grid's UpdateSink (aggregate.py):
it is folded into its instruction set's running sum (or spilled to disk)
outside the lock, while the instruction is held as "delivering" so neither a
round deadline nor a lost lease can void an update that is already counted.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable

from flwr.app import Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedswarm.coordinator.aggregate import DecodedUpdate, HoldEveryUpdate, MeanFold, UpdateSink

ERROR_NODE_LOST = 1001
ERROR_REJECTED = 1002


class LongPoll:
    """One asyncio long-poll of a node; `end()` (from any thread) answers it at once with nothing."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake = asyncio.Event()
        self.superseded = False

    def wake_up(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.wake.set)

    def end(self) -> None:
        self.superseded = True
        self.wake_up()


class SessionGrid(Grid):
    """Message queues per connected node; thread-safe."""

    def __init__(self, run_id: int, live_nodes: Callable[[], list[int]], updates: UpdateSink | None = None):
        self.updates = updates or HoldEveryUpdate()
        self._run = Run.create_empty(run_id)
        self._live_nodes = live_nodes
        self._cv = threading.Condition()
        self._instructions: dict[str, Message] = {}     # message id -> instruction, until answered
        self._owner: dict[str, int] = {}                 # message id -> node id
        self._queues: dict[int, deque[str]] = {}         # node id -> message ids not yet handed out
        self._replies: dict[str, Message] = {}           # message id -> reply, until pulled
        self._waiters: dict[int, list[LongPoll]] = {}   # node id -> its async long-polls, oldest first
        self._folds: dict[str, MeanFold] = {}            # message id -> running sum of its instruction set
        self._delivering: set[str] = set()               # message ids whose update is being folded in
        self._closed = False

    # -- Grid API used by strategies ------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._live_nodes())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        live = set(self._live_nodes())
        folds: dict[int, MeanFold] = {}  # instructions sharing one content (one base model) share one fold
        with self._cv:
            for msg in messages:
                message_id = uuid.uuid4().hex
                if "arrays" in msg.content and msg.metadata.message_type == MessageType.TRAIN:
                    if id(msg.content) not in folds:
                        folds[id(msg.content)] = self.updates.fold_for(msg.content["arrays"])
                    self._folds[message_id] = folds[id(msg.content)]
                # Flower's own SuperLink assigns ids the same way (metadata has no setter).
                msg.metadata.__dict__["_message_id"] = message_id
                self._instructions[message_id] = msg
                self._owner[message_id] = msg.metadata.dst_node_id
                if msg.metadata.dst_node_id in live:
                    self._queues.setdefault(msg.metadata.dst_node_id, deque()).append(message_id)
                    self._wake(msg.metadata.dst_node_id)
                else:
                    self._reply_error(message_id, ERROR_NODE_LOST, "node not connected")
                ids.append(message_id)
            self._cv.notify_all()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._cv:
            return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.receive(list(self.push_messages(messages)), timeout=timeout)

    def receive(self, ids: list[str], *, timeout: float | None = None,
                stop: threading.Event | None = None) -> list[Message]:
        """The replies to pushed instructions `ids`, once all came, `timeout` passed or `stop` was set;
        the unanswered instructions are void then (a late answer is refused as task_closed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not all(i in self._replies for i in ids) and not (stop is not None and stop.is_set()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cv.wait(timeout=1.0 if remaining is None else min(remaining, 1.0))
            while any(i in self._delivering for i in ids):  # an update being folded in lands first
                self._cv.wait(timeout=1.0)
            for i in ids:  # unanswered instructions are void after the deadline
                if i not in self._replies:
                    self._drop(i)
            return [self._replies.pop(i) for i in ids if i in self._replies]

    # -- session side, used by the gRPC service ---------------------------------------
    def take_task(self, node_id: int, wait_s: float) -> Message | None:
        """Long-poll: the next instruction for `node_id`, or None after `wait_s`."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while not self._closed:
                queue = self._queues.get(node_id)
                if queue:
                    return self._instructions[queue.popleft()]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cv.wait(timeout=remaining)
            return None

    async def take_task_async(self, node_id: int, wait_s: float, poll: LongPoll | None = None,
                              max_polls: int = 0) -> Message | None:
        """`take_task` for an asyncio long-poll: waiting parks no thread (the driver wakes it thread-safely).
        With `max_polls`, a node holds at most that many: a newer poll answers its oldest at once with None
        (`poll.superseded`), so a poll left behind by a client that went away cannot take the next task."""
        loop = asyncio.get_running_loop()
        poll = poll or LongPoll()
        poll.loop, deadline = loop, loop.time() + wait_s
        with self._cv:
            polls = self._waiters.setdefault(node_id, [])
            while max_polls and len(polls) >= max_polls:
                polls.pop(0).end()
            polls.append(poll)
        try:
            while True:
                with self._cv:
                    if self._closed or poll.superseded:
                        return None
                    queue = self._queues.get(node_id)
                    if queue:
                        return self._instructions[queue.popleft()]
                    poll.wake.clear()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(poll.wake.wait(), remaining)
                except asyncio.TimeoutError:
                    return None
        finally:
            with self._cv:
                polls = self._waiters.get(node_id, [])
                if poll in polls:
                    polls.remove(poll)
                if not polls:
                    self._waiters.pop(node_id, None)

    def close(self) -> None:
        """The run is over: wake every long-poll."""
        with self._cv:
            self._closed = True
            for node_id in list(self._waiters):
                self._wake(node_id)
            self._cv.notify_all()

    def open_instruction(self, message_id: str, node_id: int) -> Message | None:
        """The instruction if it is open and belongs to `node_id` (else None)."""
        with self._cv:
            msg = self._instructions.get(message_id)
            if msg is None or self._owner.get(message_id) != node_id:
                return None
            return msg

    def deliver_reply(self, message_id: str, node_id: int, content: RecordDict) -> bool:
        """Record a node's answer; False if the instruction is not open for that node."""
        with self._cv:
            msg = self.open_instruction(message_id, node_id)
            if msg is None or message_id in self._delivering:
                return False
            self._publish(message_id, msg, content)
            return True

    def deliver_error(self, message_id: str, node_id: int, reason: str) -> bool:
        """A node says it cannot do the task: the strategy sees an error reply; False if not open for it."""
        with self._cv:
            if self.open_instruction(message_id, node_id) is None or message_id in self._delivering:
                return False
            self._reply_error(message_id, ERROR_REJECTED, reason)
            self._cv.notify_all()
            return True

    def deliver_update(self, message_id: str, node_id: int, update: DecodedUpdate) -> bool:
        """Fold (or spill) a verified update through the sink, then record it as the node's answer;
        False if the instruction is not open for that node (nothing is folded then)."""
        with self._cv:
            msg = self.open_instruction(message_id, node_id)
            if msg is None or message_id in self._delivering:
                return False
            self._delivering.add(message_id)
            fold = self._folds.get(message_id)
        try:
            content = self.updates.content(msg, fold, update)   # the heavy part, outside the lock
        except BaseException:
            with self._cv:
                self._delivering.discard(message_id)
                self._cv.notify_all()
            raise
        with self._cv:
            self._delivering.discard(message_id)
            self._publish(message_id, msg, content)
        return True

    def fail_node(self, node_id: int, reason: str) -> int:
        """Answer every open instruction of a lost node with an error reply."""
        with self._cv:
            open_ids = [i for i, n in self._owner.items() if n == node_id and i not in self._delivering]
            for message_id in open_ids:
                self._reply_error(message_id, ERROR_NODE_LOST, reason)
            self._queues.pop(node_id, None)
            self._cv.notify_all()
            return len(open_ids)

    def requeue_for(self, node_id: int) -> None:
        """A node re-joined with the same id: hand its open instructions out again."""
        with self._cv:
            queue = self._queues.setdefault(node_id, deque())
            for message_id, owner in self._owner.items():
                if owner == node_id and message_id not in queue:
                    queue.append(message_id)
            self._wake(node_id)
            self._cv.notify_all()

    def open_for_node(self, node_id: int) -> list[Message]:
        """Every open instruction of a node (queued or handed out)."""
        with self._cv:
            return [self._instructions[i] for i, n in self._owner.items() if n == node_id]

    def is_open(self, message_id: str) -> bool:
        with self._cv:
            return message_id in self._instructions

    def open_count(self) -> int:
        with self._cv:
            return len(self._instructions)

    # -- internals (caller holds the lock) ---------------------------------------------
    def _wake(self, node_id: int) -> None:
        for poll in self._waiters.get(node_id, ()):
            poll.wake_up()
    def _publish(self, message_id: str, msg: Message, content: RecordDict) -> None:
        self._replies[message_id] = Message(content, reply_to=msg)
        self._forget(message_id)
        self._cv.notify_all()

    def _reply_error(self, message_id: str, code: int, reason: str) -> None:
        msg = self._instructions.get(message_id)
        if msg is not None:
            self._replies[message_id] = Message(Error(code=code, reason=reason), reply_to=msg)
            self._forget(message_id)

    def _forget(self, message_id: str) -> None:
        self._instructions.pop(message_id, None)
        self._folds.pop(message_id, None)
        node_id = self._owner.pop(message_id, None)
        queue = self._queues.get(node_id)
        if queue and message_id in queue:
            queue.remove(message_id)

    def _drop(self, message_id: str) -> None:
        self._forget(message_id)


class NodesView(Grid):
    """The grid as a strategy sees it when it may sample only some nodes (`node_ids()`): the run's training
    clients, or its evaluators. Messages go through the one grid underneath."""

    def __init__(self, grid: Grid, node_ids: Callable[[], list[int]]):
        self._grid, self._node_ids = grid, node_ids

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
