"""Connected client daemons: sessions with leases renewed by heartbeats and polls."""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Callable

log = logging.getLogger(__name__)


@dataclass
class Member:
    client_id: int
    name: str
    token: str
    device: str
    precision: str
    joined_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    rounds_done: int = 0
    role: str = "client"
    public_key: bytes = b""          # Ed25519 raw key proven at join (authenticated runs)
    replaced: int = 0                # the id of the older session of the same key this join replaced
    address: str = ""                # the host it joined from (grpc context.peer())


class SessionsFull(Exception):
    """The coordinator holds its maximum number of sessions."""


MAX_REPLACED_REMEMBERED = 10_000


class Membership:
    """Thread-safe registry; a background reaper drops members whose lease ran out.

    One live session per public key: a new (not resumed) join with a key replaces the older session,
    which is dropped like a lost lease (its open tasks fail). At most `max_sessions` (0: no limit)."""

    def __init__(self, lease_s: float, on_lost: Callable[[int, str], None], reaper_interval_s: float = 1.0,
                 max_sessions: int = 0):
        self.lease_s, self.max_sessions = lease_s, max_sessions
        self._on_lost = on_lost
        self._members: dict[int, Member] = {}
        self._replaced: OrderedDict[int, None] = OrderedDict()   # ids dropped for a newer session (bounded)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, args=(reaper_interval_s,),
                                        name="lease-reaper", daemon=True)
        self._reaper.start()

    def join(self, name: str, device: str, precision: str, resume_id: int = 0, resume_token: str = "",
             public_key: bytes = b"", role: str = "client", address: str = "") -> tuple[Member, bool]:
        """Register a client; re-join keeps the id when the old session (and key) is still known. Returns (member, resumed)."""
        with self._lock:
            old = self._members.get(resume_id) if resume_id else None
            if (old is not None and resume_token and secrets.compare_digest(old.token, resume_token)
                    and old.public_key == public_key):
                old.last_seen, old.role, old.address = time.monotonic(), role, address
                return old, True
            same_key = [m for m in self._members.values() if public_key and m.public_key == public_key]
            if self.max_sessions and len(self._members) - len(same_key) >= self.max_sessions:
                raise SessionsFull(f"the coordinator holds its maximum of {self.max_sessions} sessions: retry later")
            for m in same_key:
                del self._members[m.client_id]
                self._replaced[m.client_id] = None
                while len(self._replaced) > MAX_REPLACED_REMEMBERED:
                    self._replaced.popitem(last=False)
            client_id = secrets.randbits(62) + 1
            while client_id in self._members:
                client_id = secrets.randbits(62) + 1
            member = Member(client_id, name, secrets.token_hex(16), device, precision, public_key=public_key,
                            replaced=same_key[0].client_id if same_key else 0, role=role, address=address)
            self._members[client_id] = member
        for m in same_key:
            log.warning("session %s (%d) replaced by a new join with the same key", m.name, m.client_id)
            self._on_lost(m.client_id, "replaced by a newer session of the same key")
        return member, False

    def count_round(self, member: Member) -> None:
        """One more round answered by this session (read by status from other threads)."""
        with self._lock:
            member.rounds_done += 1

    def was_replaced(self, client_id: int) -> bool:
        with self._lock:
            return client_id in self._replaced

    def check(self, client_id: int, token: str) -> Member | None:
        """The member if the session is valid (and renew its lease), else None."""
        with self._lock:
            member = self._members.get(client_id)
            if member is None or not secrets.compare_digest(member.token, token):
                return None
            member.last_seen = time.monotonic()
            return member

    def live_ids(self) -> list[int]:
        with self._lock:
            return list(self._members)

    def snapshot(self) -> list[Member]:
        with self._lock:
            return list(self._members.values())

    def close(self) -> None:
        self._stop.set()

    def _reap_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                lost = [m for m in self._members.values() if now - m.last_seen > self.lease_s]
                for m in lost:
                    del self._members[m.client_id]
            for m in lost:
                log.warning("client %s (%d) lost its lease after %.0f s of silence", m.name, m.client_id, self.lease_s)
                self._on_lost(m.client_id, f"lease expired ({self.lease_s:.0f} s without heartbeat)")
