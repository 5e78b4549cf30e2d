"""fedswarm processes forked from one pre-imported process, for sims that start many at once.

Importing torch and transformers costs each fedswarm process several CPU seconds; a swarm sim
that starts 5 peers and a trainer together on 2 cores spent most of its start-up there. Here the imports
happen once, in multiprocessing's fork server (PRELOAD), and the coordinator, every peer and every trainer is forked
from it: a real, separate process (its own session and process group, its own p2pd) running the same
`fedswarm` entry point, with its output piped to the sim like a subprocess's. The child gets the
caller's environment, working directory and open-file limit at the fork (not the server's), enters a
network namespace host when given one (sim/hosts.py), and names itself `fsw-COMMAND` so that thread
budgets (fedswarm.threads) count it as the fedswarm process it is.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import subprocess
import sys

from fedswarm.threads import FORKED_NAME_PREFIX, set_wait_policy

# With hivemind, grpc and Flower preloaded too, forked peers hung now and then right after joining (no
# heartbeat, no log line: a lock the fork copied while held, not diagnosed further); with these, no hang.
# The modeling modules transformers imports lazily at a model's first build (0.4 s each, per process) too.
PRELOAD = ["torch", "transformers", "fedswarm.stages", "transformers.models.gpt2.modeling_gpt2",
           "transformers.models.llama.modeling_llama"]
PR_SET_NAME = 15   # prctl: the calling thread's name, /proc/PID/comm (15 bytes)
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def warm_up() -> None:
    """Start the fork server now: it imports PRELOAD once; the first fork waits until it has."""
    set_wait_policy()   # the server loads torch: idle OpenMP threads sleep in every child, as the CLI sets it
    multiprocessing.forkserver.ensure_running()


def _child(argv: list[str], env: dict[str, str], cwd: str, nofile: tuple[int, int], netns: str | None, out,
           err=None) -> None:
    """In the forked process: a session of its own, the caller's environment, directory and open-file limit,
    its network namespace, output to the caller's pipe, then `fedswarm ARGV`."""
    os.setsid()                       # like start_new_session: the sim signals the whole group (p2pd too)
    if netns is not None:
        from fedswarm.sim.hosts import enter_netns

        enter_netns(netns)            # a forked child has one thread: the whole process moves
    name = (FORKED_NAME_PREFIX + (argv[0] if argv else "")).encode()[:15]
    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
    os.dup2(out.fileno(), 1)
    os.dup2((err or out).fileno(), 2)
    for pipe in {out, err or out}:
        pipe.close()
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    from fedswarm.app.cli import main

    sys.exit(main(argv))


class ForkedPopen:
    """The part of subprocess.Popen that sim.processes.Proc uses, over a multiprocessing.Process."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, netns: str | None = None,
                 stderr_apart: bool = False):
        """`fedswarm ARGV` with the caller's environment plus `env`, inside network namespace `netns` if given;
        its stderr in `stdout`, or with `stderr_apart` in a `stderr` of its own."""
        warm_up()
        pipes = [_CONTEXT.Pipe(duplex=False) for _ in range(2 if stderr_apart else 1)]
        args = (argv, {**os.environ, **(env or {})}, os.getcwd(), resource.getrlimit(resource.RLIMIT_NOFILE),
                netns, *(writer for _, writer in pipes))
        self.process = _CONTEXT.Process(target=_child, args=args, name=" ".join(argv[:3]))
        self.process.start()
        for _, writer in pipes:
            writer.close()
        self._readers = [reader for reader, _ in pipes]   # keep the descriptors open for the streams below
        self.stdout = os.fdopen(self._readers[0].fileno(), "rb", closefd=False)
        self.stderr = os.fdopen(self._readers[1].fileno(), "rb", closefd=False) if stderr_apart else None
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout)
        return self.process.exitcode
