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
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedswarm.proto import signing

JOIN_WINDOW_S = 120.0       # a challenge is valid this long after it was issued
MAX_NONCES = 200_000        # remembered proofs (each is signed by an authorized key, so this caps a flood)
KEY_TYPE = "ed25519"


class AuthError(Exception):
    """A refused join or update; `reason` is the rejection counter it lands in."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


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
    """Nonces remembered until their expiry time; thread-safe."""

    def __init__(self, max_entries: int = MAX_NONCES):
        self._max = max_entries
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()

    def add(self, nonce: bytes, expires_at: float, now: float) -> bool:
        """Remember `nonce`; False if it is still remembered (a replay)."""
        with self._lock:
            while self._heap and self._heap[0][0] < now:
                self._expiry.pop(heapq.heappop(self._heap)[1], None)
            if nonce in self._expiry or len(self._expiry) >= self._max:
                return False
            self._expiry[nonce] = expires_at
            heapq.heappush(self._heap, (expires_at, nonce))
            return True

    def __len__(self) -> int:
        return len(self._expiry)


class SeenSet:
    """A bounded set (oldest entries forgotten first); thread-safe."""

    def __init__(self, max_entries: int = 200_000):
        self._items: OrderedDict = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def __contains__(self, item) -> bool:
        with self._lock:
            return item in self._items

    def add(self, item) -> None:
        with self._lock:
            self._items[item] = None
            while len(self._items) > self._max:
                self._items.popitem(last=False)


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
                 admin: dict[bytes, str] | None = None, run_id: str = ""):
        self.authorized, self.window_s, self.run_id = authorized, window_s, run_id
        self.admin = admin or {}
        self.nonces = NonceCache()
        self._secret = os.urandom(32)

    @property
    def enabled(self) -> bool:
        return self.authorized is not None

    def challenge(self, now: float | None = None) -> bytes:
        issued = struct.pack("<d", time.time() if now is None else now)
        return issued + hmac.new(self._secret, issued, hashlib.sha256).digest()[:16]

    def _check_challenge(self, challenge: bytes, now: float) -> None:
        if len(challenge) != signing.CHALLENGE_BYTES or not hmac.compare_digest(
                challenge[8:], hmac.new(self._secret, challenge[:8], hashlib.sha256).digest()[:16]):
            raise AuthError("stale_challenge", "the proof signs a challenge this coordinator did not issue "
                            "(a replay, or a proof made before a restart): fetch a fresh challenge and sign again")
        issued = struct.unpack("<d", challenge[:8])[0]
        if not 0 <= now - issued <= self.window_s:
            raise AuthError("stale_join", f"the challenge is {now - issued:.0f} s old (limit {self.window_s:.0f} s): "
                            "fetch a fresh one")

    def _check_proof(self, keys: dict[bytes, str], public_key: bytes, signature: bytes, challenge: bytes,
                     nonce: bytes, message: bytes, now: float | None) -> str:
        label = keys.get(bytes(public_key))
        if label is None:
            raise AuthError("unknown_key", "this public key is not in the coordinator's authorized_keys: "
                            "add its line there (client-I.pub) or start the client with a listed --key")
        now = time.time() if now is None else now
        self._check_challenge(bytes(challenge), now)
        if len(nonce) != signing.NONCE_BYTES or not verify(public_key, signature, message):
            raise AuthError("bad_signature", "the proof's signature does not verify for this key, run and role")
        if not self.nonces.add(bytes(nonce), now + self.window_s, now):
            raise AuthError("replayed_join", "this proof was already used")
        return label

    def check_join(self, name: str, role: str, public_key: bytes, signature: bytes, challenge: bytes, nonce: bytes,
                   now: float | None = None, p2p_peer_id: str = "") -> str:
        """The key's authorized_keys comment, or AuthError(unknown_key|stale_challenge|stale_join|
        bad_signature|replayed_join)."""
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
            raise AuthError("no_key", "this run is authenticated: `fedswarm status --key FILE` with an authorized "
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
            raise AuthError("bad_signature", "the update signature does not verify: the update was altered "
                            "or signed for another run, round, client or task")
