"""Coordinator-side authentication: TLS credentials, authorized_keys, join proofs, signed updates, replays."""
from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedswarm.proto import signing
from fedswarm.proto.refusals import Reason

JOIN_WINDOW_S = 120.0       # a challenge is valid this long after it was issued
MAX_NONCES = 200_000        # proofs remembered at once (each is signed by an authorized key, so this caps a flood)
MAX_NONCES_PER_KEY = 2_000  # ... of them by any one key (16 proofs/s sustained): 100 keys are needed to fill it
KEY_TYPE = "ed25519"


_clock = time.monotonic   # challenges are checked only by the process that issued them: immune to clock steps


class AuthError(Exception):
    """A refused join or update; `reason` is the rejection counter it lands in."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = Reason(reason), detail


# -- configuration files -----------------------------------------------------------------
def _read(path: str | Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None


def parse_authorized_keys(text: str, source: str = "authorized_keys") -> dict[bytes, str]:
    """`ed25519 <base64 raw public key> [comment]` per line; `#` comments and blank lines allowed.

    Returns raw public key -> comment; raises ValueError naming the line number of a bad line."""
    keys: dict[bytes, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if len(fields) < 2 or fields[0] != KEY_TYPE:
            raise ValueError(f"{source} line {lineno}: expected `{KEY_TYPE} <base64 public key> [comment]`")
        try:
            raw = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{source} line {lineno}: the key is not valid base64") from None
        if len(raw) != signing.PUBLIC_KEY_BYTES:
            raise ValueError(f"{source} line {lineno}: an Ed25519 public key is {signing.PUBLIC_KEY_BYTES} "
                             f"bytes, this one {len(raw)}")
        keys.setdefault(raw, fields[2] if len(fields) > 2 else f"line {lineno}")
    return keys


def load_authorized_keys(path: str | Path, flag: str = "--authorized-keys") -> dict[bytes, str]:
    keys = parse_authorized_keys(_read(path, flag).decode("utf-8", "replace"), f"{flag} {path}")
    if not keys:
        raise ValueError(f"{flag} {path} lists no keys: nobody could use it "
                         "(add `ed25519 <base64> name` lines, e.g. from `fedswarm keygen DIR`)")
    return keys


def server_credentials(cert_path: str | Path, key_path: str | Path) -> grpc.ServerCredentials:
    """TLS credentials from a PEM certificate chain and its PEM private key (checked to match)."""
    cert_pem, key_pem = _read(cert_path, "--tls-cert"), _read(key_path, "--tls-key")
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as err:
        raise ValueError(f"--tls-cert {cert_path}: not a PEM certificate ({err})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--tls-key {key_path}: not a PEM private key without passphrase ({err})") from None
    raw = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # noqa: E731
    if raw(cert.public_key()) != raw(key.public_key()):
        raise ValueError(f"--tls-key {key_path} does not belong to the certificate in --tls-cert {cert_path}")
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


# -- replay protection -------------------------------------------------------------------
class NonceCache:
    """Proof nonces, each remembered until its challenge expires (a proof on an expired challenge is refused
    as stale, so its nonce need not be kept past that); at most `max_entries` at once, `per_key` of them for
    any one key, so a key that proves often (an admin polling Status) cannot crowd the others out. A full
    cache refuses a fresh proof with its own reason (retry shortly), never as a replay. Thread-safe."""

    def __init__(self, max_entries: int = MAX_NONCES, per_key: int = MAX_NONCES_PER_KEY):
        self.max_entries, self.per_key = max_entries, per_key
        self._live: set[bytes] = set()              # key + nonce of every proof whose challenge has not expired
        self._heap: list[tuple[float, bytes, bytes]] = []  # (expiry, key + nonce, key)
        self._per: dict[bytes, int] = {}            # key -> its live entries
        self._lock = threading.Lock()

    def add(self, key: bytes, nonce: bytes, expires_at: float, now: float) -> str:
        """Remember `nonce` of `key` until `expires_at`: '' if fresh, else the refusal's reason
        (replayed_join, too_many_proofs: this key's share is in use, nonce_cache_full)."""
        key = bytes(key)
        entry = key + bytes(nonce)
        with self._lock:
            self._expire(now)
            if entry in self._live:
                return Reason.REPLAYED_JOIN
            if self._per.get(key, 0) >= self.per_key:
                return Reason.TOO_MANY_PROOFS
            if len(self._live) >= self.max_entries:
                return Reason.NONCE_CACHE_FULL
            self._live.add(entry)
            self._per[key] = self._per.get(key, 0) + 1
            heapq.heappush(self._heap, (expires_at, entry, key))
            return ""

    def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            _, entry, key = heapq.heappop(self._heap)
            self._live.discard(entry)
            left = self._per.pop(key, 1) - 1
            if left:
                self._per[key] = left

    def __len__(self) -> int:
        return len(self._live)


class SeenSet:
    """Items (delivered updates, their signatures) kept while their round can still be answered: an item added
    while round C was the last committed belongs to round C + 1 (or C, if it committed meanwhile), and is
    forgotten once C + 2 is committed, when no task of its round is open or can be adopted (a replay is then
    refused as task_closed). So the set holds about two rounds' deliveries and never evicts a live item (no
    replay hole). `committed()` reads the last committed round. Thread-safe."""

    def __init__(self, committed: Callable[[], int]):
        self._committed = committed
        self._items: OrderedDict = OrderedDict()   # item -> the committed round when it was added (ascending)
        self._lock = threading.Lock()

    def __contains__(self, item) -> bool:
        committed = self._committed()
        with self._lock:
            self._forget(committed)
            return item in self._items

    def add(self, item) -> None:
        committed = self._committed()
        with self._lock:
            self._forget(committed)
            self._items[item] = committed
            self._items.move_to_end(item)

    def _forget(self, committed: int) -> None:
        while self._items:
            item, added_at = next(iter(self._items.items()))
            if added_at + 2 > committed:
                return
            del self._items[item]

    def __len__(self) -> int:
        committed = self._committed()
        with self._lock:
            self._forget(committed)
            return len(self._items)


# -- verification ------------------------------------------------------------------------
def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


class Authenticator:
    """Checks join and status proofs against authorized keys, and update signatures; None keys = dev mode.

    Proofs sign a challenge this process issued (an HMAC under a key made at start-up, so a proof
    recorded before a restart is refused) and the run id and role, and each is accepted once."""

    def __init__(self, authorized: dict[bytes, str] | None, window_s: float = JOIN_WINDOW_S,
                 admin: dict[bytes, str] | None = None, run_id: str = "", nonces: NonceCache | None = None):
        self.authorized, self.window_s, self.run_id = authorized, window_s, run_id
        self.admin = admin or {}
        self.nonces = NonceCache() if nonces is None else nonces
        self._secret = os.urandom(32)

    @property
    def enabled(self) -> bool:
        return self.authorized is not None

    def challenge(self, now: float | None = None) -> bytes:
        issued = struct.pack("<d", _clock() if now is None else now)
        return issued + hmac.new(self._secret, issued, hashlib.sha256).digest()[:16]

    def _check_challenge(self, challenge: bytes, now: float) -> float:
        """The challenge's expiry time, or AuthError(stale_challenge|stale_join)."""
        if len(challenge) != signing.CHALLENGE_BYTES or not hmac.compare_digest(
                challenge[8:], hmac.new(self._secret, challenge[:8], hashlib.sha256).digest()[:16]):
            raise AuthError(Reason.STALE_CHALLENGE, "the proof signs a challenge this coordinator did not issue "
                            "(a replay, or a proof made before a restart): fetch a fresh challenge and sign again")
        issued = struct.unpack("<d", challenge[:8])[0]
        expires = issued + self.window_s
        if not issued <= now <= expires:   # the nonce cache forgets a proof after `expires`: the same test
            raise AuthError(Reason.STALE_JOIN, f"the challenge is {now - issued:.0f} s old (limit {self.window_s:.0f} s): "
                            "fetch a fresh one")
        return expires

    def _check_proof(self, keys: dict[bytes, str], public_key: bytes, signature: bytes, challenge: bytes,
                     nonce: bytes, message: bytes, now: float | None) -> str:
        label = keys.get(bytes(public_key))
        if label is None:
            raise AuthError(Reason.UNKNOWN_KEY, "this public key is not in the coordinator's authorized_keys: "
                            "add its line there (client-I.pub) or start the client with a listed --key")
        now = _clock() if now is None else now
        expires = self._check_challenge(bytes(challenge), now)
        if len(nonce) != signing.NONCE_BYTES or not verify(public_key, signature, message):
            raise AuthError(Reason.BAD_SIGNATURE, "the proof's signature does not verify for this key, run and role")
        refused = self.nonces.add(bytes(public_key), bytes(nonce), expires, now)
        if refused:
            raise AuthError(refused, self._nonce_refusal(refused))
        return label

    def _nonce_refusal(self, reason: Reason) -> str:
        return {Reason.REPLAYED_JOIN: "this proof was already used",
                Reason.TOO_MANY_PROOFS: f"this key made {self.nonces.per_key} proofs in the last {self.window_s:.0f} s: "
                                   "retry shortly (the oldest expire first)",
                Reason.NONCE_CACHE_FULL: f"the coordinator holds {self.nonces.max_entries} unexpired proofs of many "
                                         "keys: retry shortly"}[reason]

    def check_join(self, name: str, role: str, public_key: bytes, signature: bytes, challenge: bytes, nonce: bytes,
                   now: float | None = None, p2p_peer_id: str = "") -> str:
        """The key's authorized_keys comment, or AuthError(unknown_key|stale_challenge|stale_join|
        bad_signature|replayed_join|too_many_proofs|nonce_cache_full; the last two: retry shortly)."""
        if self.authorized is None:
            return ""
        message = signing.join_message(self.run_id, role, name, bytes(challenge), bytes(nonce), p2p_peer_id)
        return self._check_proof(self.authorized, public_key, signature, challenge, nonce, message, now)

    def check_status(self, public_key: bytes, signature: bytes, challenge: bytes, nonce: bytes,
                     now: float | None = None) -> str:
        """Status in an authenticated run: a proof by an authorized or admin key (no-op in dev mode)."""
        if self.authorized is None:
            return ""
        if not public_key:
            raise AuthError(Reason.NO_KEY, "this run is authenticated: `fedswarm status --key FILE` with an authorized "
                            "or admin key")
        message = signing.status_message(self.run_id, bytes(challenge), bytes(nonce))
        return self._check_proof({**self.authorized, **self.admin}, public_key, signature, challenge, nonce,
                                 message, now)

    def check_update(self, public_key: bytes, signature: bytes, run_id: str, round_: int, client_id: int,
                     task_id: str, digest: bytes) -> None:
        """AuthError(bad_signature) unless the update signature verifies (no-op in dev mode)."""
        if self.authorized is None:
            return
        message = signing.update_message(run_id, round_, client_id, task_id, digest)
        if len(signature) != signing.SIGNATURE_BYTES or not verify(public_key, signature, message):
            raise AuthError(Reason.BAD_SIGNATURE, "the update signature does not verify: the update was altered "
                            "or signed for another run, round, client or task")
