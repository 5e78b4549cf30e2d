"""Real fedswarm processes on loopback, as context managers that always kill what they start."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

READY = re.compile(r"listening on (\S+:\d+)")
# FEDSWARM_FORK_START=1: a Proc running `fedswarm ...` is forked from the pre-imported fork server
# (sim/forkstart.py) when its caller does not say. The test suite sets it (tests/conftest.py), so its hundreds of
# processes, and those of the sims and benches it runs, import torch and transformers once per fork server
# instead of each; unset, a process is a fresh interpreter unless its sim forks it (the swarm sim does).
FORK_ENV = "FEDSWARM_FORK_START"


def fork_by_default() -> bool:
    return os.environ.get(FORK_ENV) == "1"


def in_netns(netns: str, argv: list[str]) -> list[str]:
    """`argv` run inside network namespace `netns` (a fresh process; a forked one enters it itself)."""
    return ["ip", "netns", "exec", netns, *argv]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (for a process that must be dialled before it says where it listens)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def fedswarm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedswarm", *args]


def run_fedswarm(*args: str, timeout: float = 60.0, env: dict | None = None,
                 fork: bool | None = None) -> subprocess.CompletedProcess:
    """`fedswarm ARGS` run to its end (environment plus `env`): its exit code, stdout and stderr (text, apart).
    `fork` as for Proc."""
    if not (fork_by_default() if fork is None else fork):
        return subprocess.run(fedswarm_cmd(*args), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    from fedswarm.sim.forkstart import ForkedPopen

    popen = ForkedPopen(list(args), env, stderr_apart=True)
    streams: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda key=key, f=f: streams.__setitem__(key, f.read()), daemon=True)
               for key, f in (("out", popen.stdout), ("err", popen.stderr))]
    for reader in readers:
        reader.start()
    try:
        code = popen.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        raise
    for reader in readers:
        reader.join(10)
    text = {k: v.decode(errors="replace") for k, v in streams.items()}
    return subprocess.CompletedProcess(fedswarm_cmd(*args), code, text.get("out", ""), text.get("err", ""))


class Proc:
    """A child process; a reader thread tees its output into a log file and wakes `wait_for_line`."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict | None = None, fork: bool | None = None,
                 netns: str | None = None):
        """`fork`: a `fedswarm ...` argv forked from the pre-imported fork server (sim/forkstart.py); None: forked
        when FEDSWARM_FORK_START=1 and argv is `fedswarm ...`. `netns`: run inside that network namespace host."""
        self.name, self.argv, self.log_path = name, argv, log_path
        if fork is None:
            fork = fork_by_default() and argv[:3] == fedswarm_cmd()
        if fork:
            from fedswarm.sim.forkstart import ForkedPopen

            assert argv[:3] == fedswarm_cmd(), argv
            self.popen = ForkedPopen(argv[3:], env, netns=netns)
        else:
            if netns is not None:
                argv = in_netns(netns, argv)
            child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
            self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        self._text = ""
        self._cv = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._pump, name=f"log-{name}", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        with open(self.log_path, "ab") as log:
            for line in iter(self.popen.stdout.readline, b""):
                log.write(line)
                log.flush()
                with self._cv:
                    self._text = (self._text + line.decode(errors="replace"))[-200_000:]
                    self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        """The last 200 kB of what the process printed."""
        with self._cv:
            return self._text

    def full_output(self, wait_s: float = 10.0) -> str:
        """Everything the process printed (its log file), after its output ended or `wait_s` passed."""
        with self._cv:
            self._cv.wait_for(lambda: self._eof, timeout=wait_s)
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, pattern: re.Pattern, timeout: float) -> re.Match:
        """Block until the output matches (readiness), the process exits, or `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                match = pattern.search(self._text)
                if match:
                    return match
                if self._eof:
                    self.popen.wait()
                    raise RuntimeError(f"{self.name} exited with {self.popen.returncode} before it was ready; "
                                       f"see {self.log_path}:\n{self._text[-2000:]}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")
                self._cv.wait(remaining)

    def signal(self, sig: int) -> None:
        # a forked process is reaped by its fork server at once: its group can be gone before its exit code is here
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 5.0, term: bool = True) -> int | None:
        """SIGTERM (unless `term` is False: sent already), then SIGKILL after `grace` seconds; returns the exit
        code."""
        if self.popen.poll() is None:
            if term:
                self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait()
        self._reader.join(timeout=5)
        return self.popen.returncode


def stop_all(procs, grace: float = 5.0) -> None:
    """Stop `procs` together: SIGTERM to each, then SIGKILL to any still running `grace` seconds later (one
    grace for all, not one each)."""
    live = [p for p in procs if p.popen.poll() is None]
    for proc in live:
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.stop(grace=max(deadline - time.monotonic(), 0.01), term=False)


@contextlib.contextmanager
def coordinator_process(out_dir: Path, args: list[str], ready_timeout: float = 120.0,
                        name: str = "coordinator", fork: bool = False) -> Iterator[tuple[Proc, str]]:
    """Start `fedswarm coordinator --listen 127.0.0.1:0 ...`; yields (proc, "127.0.0.1:PORT")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc(name, fedswarm_cmd("coordinator", "--listen", "127.0.0.1:0", *args), out_dir / f"{name}.log",
                fork=fork)
    try:
        address = proc.wait_for_line(READY, ready_timeout).group(1)
        yield proc, address
    finally:
        proc.stop()


@contextlib.contextmanager
def client_processes(out_dir: Path, address: str, count: int, extra: list[str] | None = None,
                     threads: int = 1) -> Iterator[list[Proc]]:
    """Start `count` client daemons against `address`; kills them on exit."""
    procs: list[Proc] = []
    try:
        for i in range(count):
            argv = fedswarm_cmd("client", "--coordinator", address, "--partition", f"{i}/{count}",
                                "--name", f"client-{i}", "--threads", str(threads), *(extra or []))
            procs.append(Proc(f"client-{i}", argv, out_dir / f"client-{i}.log"))
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def fetch_status(address: str, timeout: float = 10.0, tls_ca: str | Path | None = None,
                 key: str | Path | None = None, history: bool = False) -> dict:
    """The coordinator's status object; `tls_ca` (the CA's PEM) for a TLS coordinator, `key` (a private
    key file) for an authenticated one. Its `rounds` are the last --status-rounds; `history`: every
    committed round (fetched page by page), as a report needs."""
    from fedswarm.client.identity import Identity, open_channel, status_request
    from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
    from fedswarm.app.status_view import fetch_history

    identity = Identity.load(key) if key else None
    with open_channel(address, tls_ca) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        request = lambda: status_request(stub, identity, timeout)  # noqa: E731 - a fresh proof per call
        status = json.loads(stub.Status(request(), timeout=timeout).json)
        if history:
            status["rounds"] = fetch_history(stub, request, timeout, through=status["round"])
        return status


def wait_until(what: str, check, deadline_s: float, watch=(), poll_s: float = 0.2, clean_exit_ok: bool = True):
    """Poll `check()` until it returns something truthy, and return it. Raise at once if a watched
    process exits (with any code, or only a failing one if clean_exit_ok), TimeoutError after deadline_s."""
    tick, deadline = threading.Event(), time.monotonic() + deadline_s
    while True:
        for proc in watch:
            code = proc.popen.poll()
            if code is not None and not (clean_exit_ok and code == 0):
                raise RuntimeError(f"{proc.name} exited with {code} while waiting for {what}:\n{proc.output()[-3000:]}")
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {deadline_s:.0f} s")
        tick.wait(poll_s)
