"""Connected client daemons: sessions with leases renewed by heartbeats and polls."""
from __future__ import annotations

import logging
import secrets
import threading
import time
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
    address: str = ""                # the host it joined from (grpc context.peer())


class Membership:
    """Thread-safe registry; a background reaper drops members whose lease ran out."""

    def __init__(self, lease_s: float, on_lost: Callable[[int, str], None], reaper_interval_s: float = 1.0):
        self.lease_s = lease_s
        self._on_lost = on_lost
        self._members: dict[int, Member] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, args=(reaper_interval_s,),
                                        name="lease-reaper", daemon=True)
        self._reaper.start()

    def join(self, name: str, device: str, precision: str, resume_id: int = 0, resume_token: str = "",
             public_key: bytes = b"") -> tuple[Member, bool]:
        """Register a client; re-join keeps the id when the old session (and key) is still known. Returns (member, resumed)."""
        with self._lock:
            old = self._members.get(resume_id) if resume_id else None
            if (old is not None and resume_token and secrets.compare_digest(old.token, resume_token)
                    and old.public_key == public_key):
                old.last_seen = time.monotonic()
                return old, True
            client_id = secrets.randbits(62) + 1
            while client_id in self._members:
                client_id = secrets.randbits(62) + 1
            member = Member(client_id, name, secrets.token_hex(16), device, precision, public_key=public_key)
            self._members[client_id] = member
            return member, False

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
