"""fedswarm processes forked from one pre-imported process, for sims that start many at once.

Importing torch and transformers costs each fedswarm process several CPU seconds; a swarm sim
that starts 5 peers and a trainer together on 2 cores spent most of its start-up there. Here the imports
happen once, in multiprocessing's fork server (PRELOAD), and the coordinator, every peer and every trainer is forked
from it: a real, separate process (its own session and process group, its own p2pd) running the same
`fedswarm` entry point, with its output piped to the sim like a subprocess's.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys

# With hivemind, grpc and Flower preloaded too, forked peers hung now and then right after joining (no
# heartbeat, no log line: a lock the fork copied while held, not diagnosed further); with these, no hang.
# The modeling modules transformers imports lazily at a model's first build (0.4 s each, per process) too.
PRELOAD = ["torch", "transformers", "fedswarm.stages", "transformers.models.gpt2.modeling_gpt2",
           "transformers.models.llama.modeling_llama"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def warm_up() -> None:
    """Start the fork server now: it imports PRELOAD once; the first fork waits until it has."""
    multiprocessing.forkserver.ensure_running()


def _child(argv: list[str], env: dict[str, str], out) -> None:
    """In the forked process: a session of its own, output to the sim's pipe, then `fedswarm ARGV`."""
    os.setsid()                       # like start_new_session: the sim signals the whole group (p2pd too)
    for fd in (1, 2):
        os.dup2(out.fileno(), fd)
    out.close()
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.update(env)
    from fedswarm.cli import main

    sys.exit(main(argv))


class ForkedPopen:
    """The part of subprocess.Popen that sim.processes.Proc uses, over a multiprocessing.Process."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        reader, writer = _CONTEXT.Pipe(duplex=False)
        self.process = _CONTEXT.Process(target=_child, args=(argv, env, writer), name=" ".join(argv[:3]))
        self.process.start()
        writer.close()
        self._reader = reader         # keeps the descriptor open for stdout
        self.stdout = os.fdopen(reader.fileno(), "rb", closefd=False)
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
