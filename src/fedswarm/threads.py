"""CPU thread defaults that share a host gracefully.

Several fedswarm processes on one machine (a coordinator and clients started by hand, several clients on one
GPU host) each taking every core with busy-waiting OpenMP pools starve each other: measured 15x slower
rounds on 2 cores. Two defaults prevent that:

- a passive OpenMP wait policy (idle pool threads sleep instead of spinning), set in the CLI entry before
  torch is imported unless the user chose one;
- without `--threads`, a thread count of the usable CPUs divided by the fedswarm compute processes
  (clients and coordinators) running on this host, re-checked before each round, so the first process
  gives cores back when others start beside it.

This module must not import torch at module level: the CLI calls `set_wait_policy` before torch loads.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("fedswarm.threads")
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
COMPUTE_COMMANDS = {b"client", b"coordinator"}
FORKED_NAME_PREFIX = "fsw-"   # a process forked from sim/forkstart.py's server names itself fsw-COMMAND (its comm)


def set_wait_policy(environ=os.environ) -> None:
    """Idle OpenMP threads sleep instead of spinning, unless the user set OMP_WAIT_POLICY. Call before torch loads."""
    environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _is_compute_process(argv: list[bytes]) -> bool:
    """`fedswarm client ...` / `python -m fedswarm coordinator ...` (a script or the module)."""
    if not argv or not (argv[0].endswith(b"fedswarm") or os.path.basename(argv[0]).startswith(b"python")):
        return False
    for i, arg in enumerate(argv[:-1]):
        if arg == b"-m" and argv[i + 1] == b"fedswarm":
            return len(argv) > i + 2 and argv[i + 2] in COMPUTE_COMMANDS
        if os.path.basename(arg) == b"fedswarm" and i <= 1:   # the script itself, or python running it
            return argv[i + 1] in COMPUTE_COMMANDS
    return False


def _is_python(argv: list[bytes]) -> bool:
    return bool(argv) and os.path.basename(argv[0]).startswith(b"python")


def _is_forked_compute(entry: Path) -> bool:
    """A client or coordinator forked from the fork server (its cmdline is the server's; its name says)."""
    name = (entry / "comm").read_bytes().strip()
    return name.startswith(FORKED_NAME_PREFIX.encode()) and name[len(FORKED_NAME_PREFIX):] in COMPUTE_COMMANDS


def fedswarm_processes(proc: Path = Path("/proc")) -> int:
    """Running fedswarm clients and coordinators on this host (this process included); 1 where /proc is absent."""
    if not proc.is_dir():
        return 1
    count = 0
    try:
        entries = list(proc.iterdir())
    except OSError:   # no file to spare (EMFILE): count only this process
        return 1
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            count += _is_compute_process(argv) or (_is_python(argv) and _is_forked_compute(entry))
        except OSError:  # the process ended while we looked, or is not ours to read
            continue
    return max(count, 1)


class ThreadBudget:
    """The torch thread count of this process: fixed by `--threads N`, else re-shared before each round."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requested = 0       # 0: automatic
        self.current = 0
        self._interop_set = False

    def choose(self) -> tuple[int, str]:
        if self.requested > 0:
            return self.requested, "--threads"
        cpus, procs = usable_cpus(), fedswarm_processes()
        return max(1, cpus // procs), f"auto: {cpus} CPU(s) / {procs} fedswarm process(es) on this host"

    def configure(self, requested: int) -> int:
        """Once at start: the thread count (logged with why), one inter-op thread."""
        import torch

        with self._lock:
            self.requested = requested
            if not self._interop_set:   # torch allows this once, before any inter-op work
                torch.set_num_interop_threads(1)   # fedswarm runs no inter-op parallel work: one pool less
                self._interop_set = True
        return self.refresh(always_log=True)

    def refresh(self, always_log: bool = False) -> int:
        """Re-share the host's CPUs (automatic mode); logs when the count changes."""
        import torch

        with self._lock:
            threads, why = self.choose()
            if threads != self.current:
                torch.set_num_threads(threads)
            if always_log or threads != self.current:
                log.info("torch threads: %d (%s; %s=%s)", threads, why, WAIT_POLICY_ENV,
                         os.environ.get(WAIT_POLICY_ENV, "unset"))
            self.current = threads
            return threads


BUDGET = ThreadBudget()
