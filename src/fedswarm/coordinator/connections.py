"""Open connections per address, bounded: a watch over this process's TCP sockets on the listening port.

gRPC core accepts connections without asking us, so one address could hold every connection the server may
accept (silent ones are cut only at the handshake timeout, and re-opened at once). Every `every_s` the watch
reads the kernel's TCP tables (/proc/self/net/tcp, tcp6), keeps the sockets on our port that this process
holds, groups them by peer address (IPv6 by its /64, as admission.py does) and, where one address holds more
than its share, shuts the newest down: gRPC sees them end and closes them; each is counted
`too_many_connections`. An address's share is --max-connections-per-address, and never more than a quarter
of the connections gRPC may accept. Linux only: elsewhere the watch logs once and does nothing."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from fedswarm.coordinator.admission import address_key
from fedswarm.proto.refusals import Reason

log = logging.getLogger(__name__)
TCP_TABLES = (Path("/proc/self/net/tcp"), Path("/proc/self/net/tcp6"))
ESTABLISHED = "01"   # the kernel's TCP state of a live connection (one shut down here leaves it at once)


def _ipv4(word: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(bytes.fromhex(word)[::-1])   # one little-endian 32-bit word


def _ipv6(words: str) -> ipaddress.IPv6Address:
    raw = b"".join(bytes.fromhex(words[i:i + 8])[::-1] for i in range(0, 32, 8))
    return ipaddress.IPv6Address(raw)


def connections(ports: set[int], tables=TCP_TABLES) -> Iterator[tuple[str, int]]:
    """(peer address key, socket inode) of every established TCP connection to one of `ports`."""
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        parse = _ipv6 if table.name == "tcp6" else _ipv4
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != ESTABLISHED or cols[9] == "0":
                continue
            local, remote = cols[1].split(":"), cols[2].split(":")
            if int(local[1], 16) in ports:
                yield address_key(parse(remote[0])), int(cols[9])


def over_share(conns, share: int, seen: dict[int, int] | None = None) -> list[tuple[str, int]]:
    """The connections beyond `share` of each address: its newest, by `seen` (inode -> the pass that first
    saw it; inode numbers alone are not in order: the kernel hands them out in per-CPU batches)."""
    seen = seen or {}
    by_address: dict[str, list[int]] = collections.defaultdict(list)
    for addr, inode in conns:
        by_address[addr].append(inode)
    return [(addr, inode) for addr, inodes in by_address.items() if len(inodes) > share
            for inode in sorted(inodes, key=lambda i: (seen.get(i, 0), i))[share:]]


def socket_fds(inodes: set[int], fd_dir: Path = Path("/proc/self/fd")) -> dict[int, int]:
    """inode -> this process's file descriptor, for those of `inodes` it holds."""
    found = {}
    for entry in os.scandir(fd_dir):
        try:
            target = os.readlink(entry.path)
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = int(target[8:-1])
            if inode in inodes:
                found[inode] = int(entry.name)
    return found


def shut_down(fd: int, inode: int) -> bool:
    """End the connection on `fd`, if `fd` still holds socket `inode`: its reads end (gRPC, which owns the
    descriptor, sees the end and closes it) and, lingering 0 s, its close resets the connection rather than
    leaving it in TIME_WAIT (a flood of re-opened connections would fill the kernel's table with those)."""
    try:
        if os.fstat(fd).st_ino != inode:
            return False
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
        return True
    except OSError:
        return False
    finally:
        sock.detach()   # the descriptor stays gRPC's


class ConnectionWatch:
    """Every `every_s` (`busy_every_s` while an address is over its share: a flood re-opens what was shut,
    and must not refill the server between two passes), shut down each address's connections beyond `share`
    on `ports`; `count(reason)` each."""

    def __init__(self, ports: set[int], share: int, count: Callable[[str], None],
                 strike: Callable[[str], None] = lambda addr: None, every_s: float = 0.5, busy_every_s: float = 0.05):
        """`strike(addr)` (called on the loop) for each connection of `addr` shut down beyond its share: enough
        of them ban the address (admission.py). A banned address keeps its share of connections: shut down,
        a flood re-opens them at once, and its calls on them cost more than when they are held."""
        self.ports, self.share, self.count, self.strike = ports, share, count, strike
        self.every_s, self.busy_every_s = every_s, busy_every_s
        self._task: asyncio.Task | None = None
        self._warned = False   # a flood is logged when it starts, not at every pass
        self._pass, self._seen = 0, {}   # inode -> the pass that first saw it (the newest go first)
        self._shut: set[int] = set()     # inodes ended by an earlier pass

    def sweep(self) -> list[str]:
        """One pass (blocking: run it off the loop): shut down the connections beyond each address's share;
        the address of each one shut down."""
        conns = list(connections(self.ports))
        self._pass += 1
        self._seen = {inode: self._seen.get(inode, self._pass) for _, inode in conns}
        self._shut &= set(self._seen)   # ended here, not yet closed by gRPC: neither counted nor ended again
        extra = over_share([c for c in conns if c[1] not in self._shut], self.share, self._seen)
        if not extra:
            return []
        fds = socket_fds({inode for _, inode in extra})
        shut = [addr for addr, inode in extra if inode in fds and shut_down(fds[inode], inode)]
        self._shut.update(inode for _, inode in extra)
        if shut and not self._warned:
            log.warning("shut down %d connections beyond %d per address (from %s); counted as too_many_connections "
                        "from now on", len(shut), self.share, ", ".join(sorted(set(shut))[:4]))
        self._warned = bool(shut)
        return shut

    async def _run(self) -> None:
        while True:
            try:
                shut = await asyncio.to_thread(self.sweep)
            except OSError as err:   # e.g. no file to spare for /proc: the next pass tries again
                log.warning("cannot read this process's connections: %s", err)
                shut = []
            for addr in shut:
                self.count(Reason.TOO_MANY_CONNECTIONS)
                self.strike(addr)
            await asyncio.sleep(self.busy_every_s if shut else self.every_s)

    def start(self) -> None:
        if not TCP_TABLES[0].exists():
            log.info("no /proc TCP table here: connections per address are not bounded")
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="connection-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
