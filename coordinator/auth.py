"""Coordinator-side authentication: TLS credentials, authorized_keys, join proofs, signed updates, replays."""
from __future__ import annotations

import base64
import binascii
import heapq
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

JOIN_WINDOW_S = 120.0
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


def load_authorized_keys(path: str | Path) -> dict[bytes, str]:
    keys = parse_authorized_keys(_read(path, "--authorized-keys").decode("utf-8", "replace"),
                                 f"--authorized-keys {path}")
    if not keys:
        raise ValueError(f"--authorized-keys {path} lists no keys: nobody could join "
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

    def __init__(self):
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()

    def add(self, nonce: bytes, expires_at: float, now: float) -> bool:
        """Remember `nonce`; False if it is still remembered (a replay)."""
        with self._lock:
            while self._heap and self._heap[0][0] < now:
                self._expiry.pop(heapq.heappop(self._heap)[1], None)
            if nonce in self._expiry:
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
    """Checks join proofs against authorized keys, and update signatures; None keys = dev mode (anyone)."""

    def __init__(self, authorized: dict[bytes, str] | None, window_s: float = JOIN_WINDOW_S):
        self.authorized, self.window_s = authorized, window_s
        self.nonces = NonceCache()

    @property
    def enabled(self) -> bool:
        return self.authorized is not None

    def check_join(self, name: str, public_key: bytes, signature: bytes, timestamp: float, nonce: bytes,
                   now: float | None = None, p2p_peer_id: str = "") -> str:
        """The key's authorized_keys comment, or AuthError(unknown_key|stale_join|bad_signature|replayed_join)."""
        if self.authorized is None:
            return ""
        label = self.authorized.get(bytes(public_key))
        if label is None:
            raise AuthError("unknown_key", "this public key is not in the coordinator's authorized_keys: "
                            "add its line there (client-I.pub) or start the client with a listed --key")
        now = time.time() if now is None else now
        if not abs(now - timestamp) <= self.window_s:  # also refuses NaN
            raise AuthError("stale_join", f"join timestamp {now - timestamp:+.0f} s off the coordinator's clock "
                            f"(limit {self.window_s:.0f} s): check the client's clock")
        if len(nonce) != signing.NONCE_BYTES or not verify(public_key, signature,
                                                           signing.join_message(name, timestamp, nonce, p2p_peer_id)):
            raise AuthError("bad_signature", "the join signature does not verify for this key")
        if not self.nonces.add(bytes(nonce), max(now, timestamp) + self.window_s, now):
            raise AuthError("replayed_join", "this join request was already used")
        return label

    def check_update(self, public_key: bytes, signature: bytes, run_id: str, round_: int, client_id: int,
                     task_id: str, digest: bytes) -> None:
        """AuthError(bad_signature) unless the update signature verifies (no-op in dev mode)."""
        if self.authorized is None:
            return
        message = signing.update_message(run_id, round_, client_id, task_id, digest)
        if len(signature) != signing.SIGNATURE_BYTES or not verify(public_key, signature, message):
            raise AuthError("bad_signature", "the update signature does not verify: the update was altered "
                            "or signed for another run, round, client or task")
