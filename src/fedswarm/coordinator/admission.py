"""Who may hold what on the coordinator, before and after it knows the caller.

Every call is a stream to the server (unary ones too), so its handler starts with the call and reads the
first message (a request, an upload's header) under a deadline. Until it arrives the call holds a slot of
its connection's, its address's and the server's waiting share. An honest call's first message comes with
its headers and needs the slot for no time: a call that starts while a share is full gets only a short
grace, then is refused (`busy_connection`, `busy_address`, `busy`). So strangers hold at most the shares,
and an honest call still gets through. Past its first message a call that carries a valid session counts
against that session's caps (calls in flight, one upload stream per task). Everything here runs on the
event loop: no locks."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Hashable, Iterator

import grpc

from fedswarm.proto.refusals import REASON_KEY, Reason, Refused

log = logging.getLogger(__name__)
IPV6_PREFIX = 64   # one IPv6 address is one /64: a host gets a whole one
MAX_STRIKE_ENTRIES = 4096   # addresses whose strikes are counted at once (older windows are forgotten first)


def peer_host(peer: str) -> str:
    """The caller's host from grpc's context.peer() ("ipv4:10.0.0.3:5123", "ipv6:[::1]:5123", with the brackets
    URL-encoded as grpc writes them: "ipv6:%5B::1%5D:5123"): the IP without port or brackets, anything else
    whole."""
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


def peer_address(peer: str) -> str:
    """The address a call counts against (context.peer(), as peer_host reads it): IPv4 as is, IPv6 as its /64
    (an IPv4-mapped one as the IPv4), anything else whole."""
    if not peer.startswith("ipv6:"):
        return peer_host(peer)
    try:
        return address_key(ipaddress.IPv6Address(peer_host(peer).partition("%")[0]))
    except ValueError:
        return peer


def address_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The share an address counts against: IPv4 as is, IPv6 as its /64 (an IPv4-mapped one as the IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


class Tally:
    """Counts per key that forget a key at zero (so strangers' addresses do not pile up)."""

    def __init__(self):
        self._n: collections.Counter[Hashable] = collections.Counter()
        self.total = 0   # holders (each holds one or more keys)

    def __getitem__(self, key: Hashable) -> int:
        return self._n.get(key, 0)

    @contextlib.contextmanager
    def held(self, *keys: Hashable) -> Iterator[None]:
        for key in keys:
            self._n[key] += 1
        self.total += 1
        try:
            yield
        finally:
            self.total -= 1
            for key in keys:
                self._n[key] -= 1
                if not self._n[key]:
                    del self._n[key]


class Admission:
    """The waiting shares, the per-session caps and the health watches of one server (`limits`: ServingLimits);
    `count(reason)` records a refusal."""

    def __init__(self, limits, count: Callable[[str], None]):
        self.limits, self.count = limits, count
        self._waiting = Tally()                     # keys: ("conn", peer), ("addr", address)
        self._in_flight = Tally()                   # keys: session ids
        self._watches = Tally()                     # keys: addresses
        self._uploads: dict[tuple[int, str], object] = {}   # (session, task) -> that upload's StreamBridge
        self._strikes: dict[str, list[float]] = {}  # address -> [its window's start, calls refused in it]
        self.banned: dict[str, float] = {}          # address -> when its ban ends (time.monotonic)

    def _full_share(self, conn: str, addr: str) -> str:
        """'' while the call may wait its full deadline, else the reason it would be refused for."""
        lim = self.limits
        if self._waiting["conn", conn] >= lim.max_waiting_per_connection:
            return Reason.BUSY_CONNECTION
        if self._waiting["addr", addr] >= lim.max_waiting_per_address:
            return Reason.BUSY_ADDRESS
        return Reason.BUSY if self._waiting.total >= lim.max_waiting else ""

    async def first_message(self, requests: AsyncIterator, context, late_reason: str) -> bytes | None:
        """The call's first message (None if the client sent none) within limits.first_message_s, or within
        limits.first_message_grace_s when a waiting share is full; Refused when it does not come."""
        conn = context.peer()
        addr = peer_address(conn)
        if self.is_banned(addr):
            # held (reading nothing, holding no share) before the refusal: refused at once, a flood's calls
            # would be re-opened at once, and cost this server more than they did before the ban
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(self.limits.first_message_s)
            raise Refused(grpc.StatusCode.UNAVAILABLE, Reason.BANNED,
                          f"this address opened too many calls that never sent their first message; it is "
                          f"refused for {self.limits.ban_s:g} s")
        full = self._full_share(conn, addr)
        wait = self.limits.first_message_grace_s if full else self.limits.first_message_s
        with self._waiting.held(("conn", conn), ("addr", addr)) if not full else contextlib.nullcontext():
            try:
                message = await asyncio.wait_for(anext(requests, None), wait)
                if message is None:   # no message: a call its client cancelled is cancelled here (not counted)
                    await asyncio.sleep(0)
                return message
            except asyncio.TimeoutError:
                self.strike(addr)
                if full:
                    where = {Reason.BUSY_CONNECTION: "on this connection", Reason.BUSY_ADDRESS: "from this address",
                             Reason.BUSY: "on this server"}[full]
                    raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, full,
                                  f"too many calls {where} are waiting to send their first message: "
                                  f"send the request with the call, or retry shortly") from None
                raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, late_reason,
                              f"no first message within {wait:g} s") from None

    def is_banned(self, addr: str) -> bool:
        until = self.banned.get(addr)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self.banned[addr]
        return False

    def strike(self, addr: str) -> None:
        """One more call from `addr` that did not send its first message in time (or one more connection of it
        beyond its share, connections.py); limits.ban_after of them within limits.ban_window_s ban the address
        for limits.ban_s: each of its calls is then held limits.first_message_s, reading nothing and holding no
        share, and refused `banned`, so its flood costs this server little."""
        lim, now = self.limits, time.monotonic()
        window = self._strikes.get(addr)
        if window is None or now - window[0] > lim.ban_window_s:
            if len(self._strikes) >= MAX_STRIKE_ENTRIES:
                self._strikes = {a: w for a, w in self._strikes.items() if now - w[0] <= lim.ban_window_s}
            window = self._strikes[addr] = [now, 0]
        window[1] += 1
        if window[1] >= lim.ban_after:
            del self._strikes[addr]
            self.banned[addr] = now + lim.ban_s
            log.warning("banned %s for %g s: %d calls that never sent their first message, or connections beyond "
                        "its share, within %g s", addr, lim.ban_s, window[1], lim.ban_window_s)

    @contextlib.contextmanager
    def session_call(self, session_id: int) -> Iterator[None]:
        """Hold one of the session's limits.max_calls_per_session slots for a call's duration."""
        cap = self.limits.max_calls_per_session
        if self._in_flight[session_id] >= cap:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_BUSY,
                          f"this session already has {cap} calls in flight, the most one may hold: "
                          f"wait for them to finish")
        with self._in_flight.held(session_id):
            yield

    @contextlib.contextmanager
    def only_upload(self, session_id: int, task_id: str, bridge) -> Iterator[None]:
        """One upload stream per open task: a newer one ends the older (`upload_replaced`, counted there)."""
        key = (session_id, task_id)
        older = self._uploads.get(key)
        if older is not None:
            older.refuse(Refused(grpc.StatusCode.ABORTED, Reason.UPLOAD_REPLACED,
                                 "a newer upload for the same task replaced this one"))
        self._uploads[key] = bridge
        try:
            yield
        finally:
            if self._uploads.get(key) is bridge:
                del self._uploads[key]

    @contextlib.contextmanager
    def watch(self, context) -> Iterator[None]:
        """Hold a health Watch slot (limits.max_health_watches in all, max_health_watches_per_address each)."""
        addr = peer_address(context.peer())
        lim = self.limits
        if self._watches.total >= lim.max_health_watches or self._watches[addr] >= lim.max_health_watches_per_address:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_MANY_WATCHES,
                          "too many health Watch streams are open: use Check, or retry later")
        with self._watches.held(addr):
            yield

    async def refuse(self, context, err) -> None:
        """Count `err` (anything with code, reason and detail) and end the call with it."""
        self.count(err.reason)
        await context.abort(err.code, err.detail, trailing_metadata=((REASON_KEY, err.reason.value),))
