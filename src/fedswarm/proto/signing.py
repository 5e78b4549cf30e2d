"""The exact bytes clients sign and the coordinator verifies (Ed25519), built in one place."""
from __future__ import annotations

import hashlib
import struct

JOIN_DOMAIN = b"fedswarm-join-v2\0"
STATUS_DOMAIN = b"fedswarm-status-v1\0"
UPDATE_DOMAIN = b"fedswarm-update-v1\0"
EVAL_DOMAIN = b"fedswarm-eval-v1\0"
SECAGG_DOMAIN = b"fedswarm-secagg-v1\0"
NONCE_BYTES = 16
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
CHALLENGE_BYTES = 24   # issue time (float64 LE) + 16 bytes of the issuing process's HMAC over it


def _field(text: str) -> bytes:
    return text.encode() + b"\0"


def join_message(run_id: str, role: str, name: str, challenge: bytes, nonce: bytes, p2p_peer_id: str = "") -> bytes:
    """What a client signs to join: domain, run id, role, name, the coordinator's challenge, a nonce, and (swarm)
    its libp2p peer id, so the roster's peer ids are as authenticated as the keys."""
    bound = _field(p2p_peer_id) if p2p_peer_id else b""
    return JOIN_DOMAIN + _field(run_id) + _field(role) + _field(name) + challenge + nonce + bound


def status_message(run_id: str, challenge: bytes, nonce: bytes) -> bytes:
    """What a key holder signs to read Status in an authenticated run."""
    return STATUS_DOMAIN + _field(run_id) + challenge + nonce


class UpdateDigest:
    """sha256 over the header's num_examples, train_loss, num_parts, then each part chunk's raw bytes."""

    def __init__(self, num_examples: int, train_loss: float, num_parts: int):
        self._h = hashlib.sha256(struct.pack("<QdQ", num_examples, train_loss, num_parts))

    def add_chunk(self, raw_chunk: bytes) -> None:
        """One serialized UpdateChunk carrying a part, in stream order."""
        self._h.update(raw_chunk)

    def digest(self) -> bytes:
        return self._h.digest()


def update_digest(num_examples: int, train_loss: float, num_parts: int, raw_chunks) -> bytes:
    d = UpdateDigest(num_examples, train_loss, num_parts)
    for raw in raw_chunks:
        d.add_chunk(raw)
    return d.digest()


def update_message(run_id: str, round_: int, client_id: int, task_id: str, digest: bytes) -> bytes:
    """What a client signs for one update: domain, run id, round and client id (uint64 LE), task id, digest."""
    return (UPDATE_DOMAIN + run_id.encode() + b"\0" + struct.pack("<QQ", round_, client_id)
            + task_id.encode() + b"\0" + digest)


def secagg_digest(reply) -> bytes:
    """What a secure-aggregation answer (pb.SecAggReply) signs in place of an update's digest: the answer without
    its session token and signature, in its own domain (never an update's)."""
    body = type(reply)()
    body.CopyFrom(reply)
    body.ClearField("session_token")
    body.ClearField("signature")
    return hashlib.sha256(SECAGG_DOMAIN + body.SerializeToString(deterministic=True)).digest()


def eval_digest(loss: float, tokens: int) -> bytes:
    """What an evaluation result signs in place of an update's digest (its own domain: never an update's)."""
    return hashlib.sha256(EVAL_DOMAIN + struct.pack("<dQ", loss, tokens)).digest()
