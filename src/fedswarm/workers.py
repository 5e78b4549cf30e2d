"""Worker threads that never die without a word: each is named and joined, and what it raised reaches the caller.

`run_workers` runs a loop on N threads until a run is done (the swarm trainer's micro-batches): the first
exception stops them all. `run_each` runs N jobs once, at the same time (the coordinator's cohorts of one
round): a job's exception is that job's outcome, logged with its name, and its siblings run on."""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class WorkerFailed(RuntimeError):
    """A worker thread raised: its siblings stop instead of running on with fewer workers."""


def run_workers(count: int, work_once: Callable[[], None], done: threading.Event, join_s: float,
                name: str = "microbatch", what: str = "micro-batch worker") -> None:
    """Call ``work_once()`` on ``count`` threads until ``done`` is set. The first exception any worker raises
    stops them all (``done`` is set) and is re-raised here as WorkerFailed, so a bug cannot silently kill
    a thread and leave the caller running at reduced width (or not at all)."""
    failures: list[BaseException] = []
    lock = threading.Lock()

    def loop(i: int) -> None:
        try:
            while not done.is_set():
                work_once()
        except BaseException as err:  # noqa: BLE001 - recorded and re-raised by run_workers
            log.exception("%s %d failed; stopping the others", what, i)
            with lock:
                failures.append(err)
            done.set()

    threads = [threading.Thread(target=loop, args=(i,), name=f"{name}-{i}", daemon=True)
               for i in range(max(1, count))]
    for t in threads:
        t.start()
    done.wait()
    for t in threads:
        t.join(join_s)
    with lock:
        first = failures[0] if failures else None
    if first is not None:
        raise WorkerFailed(f"a {what} failed: {type(first).__name__}: {first}") from first


@dataclasses.dataclass
class Outcome:
    """What one job of `run_each` came to: its value, or the exception it raised."""

    value: Any = None
    error: Exception | None = None


def run_each(jobs: list[Callable[[], Any]], names: list[str], name: str = "job", join_s: float = 5.0) -> list[Outcome]:
    """Run each job once, all at the same time on `run_workers` threads (one each), and return their outcomes
    in order once every job has ended. A job that raises is logged with its name and becomes its Outcome's
    error; the others run on."""
    outcomes = [Outcome() for _ in jobs]
    if not jobs:
        return outcomes
    lock, done = threading.Lock(), threading.Event()
    order, left = iter(range(len(jobs))), [len(jobs)]

    def work_once() -> None:   # each worker takes one job, then waits for the others
        with lock:
            i = next(order)
        try:
            outcomes[i].value = jobs[i]()
        except Exception as err:  # noqa: BLE001 - the job's outcome: logged here, handled by the caller
            log.exception("%s failed", names[i])
            outcomes[i].error = err
        with lock:
            left[0] -= 1
            if not left[0]:
                done.set()
        done.wait()

    run_workers(len(jobs), work_once, done, join_s, name=name, what=f"{name} runner")
    return outcomes
