"""Simulated hosts: Linux network namespaces joined by a bridge, each with its own address.

``HostNetwork(n)`` makes n namespaces ``fsw-<pid>-<i>`` (loopback up, ``eth0`` = 10.213.X.(i+1)/24 with a
per-run random X) and one more, ``fsw-<pid>-br``, holding the bridge ``br0`` and the host ends of the veth
pairs: nothing is added to the root namespace, and the addresses exist only inside these namespaces.
``bandwidth="50mbit"`` caps each host's link both ways with a ``tbf`` qdisc. Processes run inside a host
through ``ip netns exec``; every one started here is killed by pid before its namespace is deleted, on
exit, on an exception and on SIGTERM. The test process reaches a host's port through ``forward()``: a
relay on 127.0.0.1 whose outgoing sockets are made by a thread that entered the host's namespace.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import random
import signal
import socket
import subprocess
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from fedswarm.sim.processes import Proc, in_netns

__all__ = ["Host", "HostNetwork", "HostsUnavailable", "probe"]

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, no netns support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise HostsUnavailable("the `ip` command (iproute2) is not installed") from None
    if check and proc.returncode != 0:
        raise HostsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _tc(*args: str) -> None:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise HostsUnavailable(f"`tc {' '.join(args)}` failed: {proc.stderr.strip()}")


def probe() -> str | None:
    """None if this process can make network namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespace hosts need root (ip netns add); run as root or drop --hosts"
    name = f"fsw-{os.getpid()}-probe"
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
    except HostsUnavailable as err:
        return str(err)
    finally:
        _ip("netns", "del", name, check=False)
    return None


def enter_netns(name: str) -> None:
    """Move the calling thread (only) into namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    index: int
    netns: str
    ip: str

    def cmd(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host."""
        return in_netns(self.netns, argv)


def burst_bytes(rate: str) -> int:
    """tbf bucket: 10 ms at `rate` (e.g. 50mbit), at least 16 KiB."""
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "bit": 1 / 8}
    for unit, scale in units.items():
        if rate.endswith(unit) and rate[:-len(unit)].replace(".", "", 1).isdigit():
            return max(int(float(rate[:-len(unit)]) * scale * 0.01), 16 * 1024)
    raise ValueError(f"bandwidth {rate!r}: use a number with kbit, mbit or gbit (e.g. 50mbit)")


class HostNetwork:
    """n hosts on one bridge; a context manager that removes everything it made."""

    def __init__(self, count: int, bandwidth: str | None = None, tag: str | None = None):
        if count < 1:
            raise ValueError("a host network needs at least one host")
        self.burst = burst_bytes(bandwidth) if bandwidth else 0
        self.count, self.bandwidth = count, bandwidth
        self.tag = tag or f"fsw-{os.getpid()}"
        self.subnet = random.randint(1, 254)
        self.bridge_ns = f"{self.tag}-br"
        self.hosts = [Host(i, f"{self.tag}-{i}", f"10.213.{self.subnet}.{i + 1}") for i in range(count)]
        self.procs: list[Proc] = []
        self._made: list[str] = []
        self._relays: list[_Relay] = []
        self._old_sigterm = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> "HostNetwork":
        reason = probe()
        if reason:
            raise HostsUnavailable(reason)
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        br = self.bridge_ns
        self._add_netns(br)
        _ip("-n", br, "link", "set", "lo", "up")
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for h in self.hosts:
            self._add_netns(h.netns)
            _ip("-n", h.netns, "link", "set", "lo", "up")
            _ip("-n", br, "link", "add", f"h{h.index}", "type", "veth", "peer", "name", "eth0", "netns", h.netns)
            _ip("-n", br, "link", "set", f"h{h.index}", "master", "br0", "up")
            _ip("-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            _ip("-n", h.netns, "link", "set", "eth0", "up")
            if self.bandwidth:  # both directions: the host's egress and the bridge port's egress (its ingress)
                for ns, dev in ((h.netns, "eth0"), (br, f"h{h.index}")):
                    _tc("-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.bandwidth,
                        "burst", str(self.burst), "latency", "100ms")

    def _add_netns(self, name: str) -> None:
        if (NETNS_DIR / name).exists():
            raise HostsUnavailable(f"network namespace {name} already exists (a previous run of pid "
                                   f"{self.tag.split('-')[-1]} left it?): remove it with `ip netns del {name}`")
        _ip("netns", "add", name)
        self._made.append(name)

    def close(self) -> None:
        """Stop relays, kill every process inside our namespaces (by pid), then delete the namespaces."""
        for relay in self._relays:
            relay.close()
        self._relays.clear()
        for proc in reversed(self.procs):
            proc.signal(signal.SIGKILL)
            proc.stop(grace=1.0)
        for name in reversed(self._made):
            self._kill_inside(name)
            _ip("netns", "del", name, check=False)
        self._made.clear()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _kill_inside(self, name: str) -> None:
        """SIGKILL what still runs in namespace `name` (children of our processes, e.g. p2pd), by pid."""
        deadline = time.monotonic() + 5.0
        while True:
            out = _ip("netns", "pids", name, check=False).stdout.split()
            pids = [int(p) for p in out if p.isdigit()]
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)  # the kernel reaps asynchronously; re-list until the namespace is empty

    # -- use ----------------------------------------------------------------------------------------------
    def start(self, host: int, name: str, argv: list[str], log_path: Path, env: dict | None = None) -> Proc:
        """Start `argv` inside host `host`; it is killed when the network closes."""
        proc = Proc(name, argv, log_path, env=env, netns=self.hosts[host].netns)
        self.procs.append(proc)
        return proc

    def set_link(self, host: int, up: bool) -> None:
        """Cut (or restore) host `host`'s link: its eth0 goes down, as if the cable were pulled."""
        _ip("-n", self.hosts[host].netns, "link", "set", "eth0", "up" if up else "down")

    def link_bytes(self, host: int) -> tuple[int, int]:
        """(bytes received, bytes sent) on host `host`'s eth0 since it was made."""
        base = Path("/sys/class/net/eth0/statistics")
        out = subprocess.run(self.hosts[host].cmd(["cat", str(base / "rx_bytes"), str(base / "tx_bytes")]),
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        return int(out[0]), int(out[1])

    def forward(self, host: int, port: int) -> str:
        """"127.0.0.1:P" in this (root) namespace, relayed to host `host`'s ip:port."""
        relay = _Relay(self.hosts[host], port)
        self._relays.append(relay)
        return relay.address


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every `finally`: the namespaces are removed


class _Relay:
    """127.0.0.1:0 -> host.ip:port; upstream sockets are made by a thread living in the host's namespace."""

    def __init__(self, host: Host, port: int):
        self.host, self.port = host, port
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"netns-{host.index}",
                                                           initializer=enter_netns, initargs=(host.netns,))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.address = ""
        self._thread = threading.Thread(target=self._run, name=f"relay-{host.index}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or not self.address:
            raise RuntimeError(f"the relay to {host.ip}:{port} did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host.ip, self.port), timeout=10)
        sock.setblocking(False)
        return sock

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = await self._loop.run_in_executor(self._pool, self._connect)
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        writer.close()
        up_writer.close()

    def close(self) -> None:
        async def stop():
            self._server.close()   # no new connection (and so no new task) from here on
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()
        asyncio.run_coroutine_threadsafe(stop(), self._loop)
        self._thread.join(5)
        self._pool.shutdown(wait=False)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the half-close on; a reset on either side closes the other."""
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()


def start_coordinator(net: HostNetwork, out_dir: Path, args: list[str], ready_timeout: float = 120.0
                      ) -> tuple[Proc, str, str]:
    """`fedswarm coordinator` on host 0, serving gRPC and (swarm) hivemind on that host's IP. Returns the
    process, the address other hosts dial and a relayed 127.0.0.1 address for this (root-namespace) process."""
    from fedswarm.sim.processes import READY, fedswarm_cmd

    ip = net.hosts[0].ip
    proc = net.start(0, "coordinator", fedswarm_cmd("coordinator", "--listen", f"{ip}:0", "--p2p-host", ip, *args),
                     out_dir / "coordinator.log")
    address = proc.wait_for_line(READY, ready_timeout).group(1)
    return proc, address, net.forward(0, int(address.rsplit(":", 1)[1]))
