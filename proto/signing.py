"""The exact bytes clients sign and the coordinator verifies (Ed25519), built in one place."""
from __future__ import annotations

import hashlib
import struct

JOIN_DOMAIN = b"fedswarm-join-v1\0"
UPDATE_DOMAIN = b"fedswarm-update-v1\0"
NONCE_BYTES = 16
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def join_message(name: str, timestamp: float, nonce: bytes, p2p_peer_id: str = "") -> bytes:
    """What a client signs to join: domain, name, timestamp (float64 LE), nonce, and (swarm) its libp2p peer id."""
    bound = b"\0" + p2p_peer_id.encode() if p2p_peer_id else b""
    return JOIN_DOMAIN + name.encode() + b"\0" + struct.pack("<d", timestamp) + nonce + bound


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
