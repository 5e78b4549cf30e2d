"""A client's Ed25519 identity (join proof, signed updates) and its channel to the coordinator (TLS or not)."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedswarm.proto import signing


class IdentityError(ValueError):
    """A key or certificate file that cannot be used: the message says which and why."""


def _read(path: str | Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise IdentityError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None


def load_private_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 private key in PEM (PKCS8), as `fedswarm keygen` writes it."""
    data = _read(path, "--key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise IdentityError(f"--key {path}: not a PEM private key without passphrase ({err}); "
                            "make one with `fedswarm keygen DIR`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"--key {path}: not an Ed25519 key ({type(key).__name__}); "
                            "make one with `fedswarm keygen DIR`")
    return key


def public_bytes(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Identity:
    """Signs join proofs and updates with one Ed25519 key."""

    def __init__(self, key: ed25519.Ed25519PrivateKey):
        self.key = key
        self.public_key = public_bytes(key)

    @classmethod
    def load(cls, path: str | Path) -> "Identity":
        return cls(load_private_key(path))

    def join_proof(self, name: str, role: str, run_id: str, challenge: bytes, nonce: bytes | None = None,
                   p2p_peer_id: str = "") -> dict:
        """JoinRequest fields (public_key, signature, challenge, nonce) for a Challenge reply's run id and challenge;
        the signature covers the swarm peer id too."""
        nonce = os.urandom(signing.NONCE_BYTES) if nonce is None else nonce
        sig = self.key.sign(signing.join_message(run_id, role, name, challenge, nonce, p2p_peer_id))
        return {"public_key": self.public_key, "signature": sig, "challenge": challenge, "nonce": nonce}

    def status_proof(self, run_id: str, challenge: bytes) -> dict:
        """StatusRequest fields for a Challenge reply's run id and challenge."""
        nonce = os.urandom(signing.NONCE_BYTES)
        sig = self.key.sign(signing.status_message(run_id, challenge, nonce))
        return {"public_key": self.public_key, "signature": sig, "challenge": challenge, "nonce": nonce}

    def sign_update(self, run_id: str, round_: int, client_id: int, task_id: str, num_examples: int,
                    train_loss: float, num_parts: int, raw_part_chunks: Iterable[bytes]) -> bytes:
        """Signature for UpdateHeader.signature over the serialized part chunks that will be sent."""
        digest = signing.update_digest(num_examples, train_loss, num_parts, raw_part_chunks)
        return self.key.sign(signing.update_message(run_id, round_, client_id, task_id, digest))


def channel_credentials(ca_path: str | Path, flag: str = "--tls-ca") -> grpc.ChannelCredentials:
    """Trust only the CA in `ca_path` (PEM); the server's certificate must name the host dialled."""
    data = _read(ca_path, flag)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise IdentityError(f"{flag} {ca_path}: not a PEM certificate ({err}); "
                            "pass the ca.pem that `fedswarm keygen` wrote") from None
    return grpc.ssl_channel_credentials(root_certificates=data)


def open_channel(address: str, tls_ca: str | Path | None = None, options: list | None = None) -> grpc.Channel:
    """HOST:PORT as the target either way (IP hosts are matched against the certificate's IP SANs)."""
    if tls_ca:
        return grpc.secure_channel(address, channel_credentials(tls_ca), options=options)
    return grpc.insecure_channel(address, options=options)


def signed_join_fields(stub, identity: Identity | None, name: str, role: str = "client", timeout: float = 30.0,
                       p2p_peer_id: str = "") -> dict:
    """JoinRequest proof fields (empty without an identity): asks the coordinator for a challenge and signs it."""
    if identity is None:
        return {}
    from fedswarm.proto import fedswarm_pb2 as pb

    reply = stub.Challenge(pb.ChallengeRequest(), timeout=timeout)
    return identity.join_proof(name, role, reply.run_id, reply.challenge, p2p_peer_id=p2p_peer_id)


def status_request(stub, identity: Identity | None, timeout: float = 30.0):
    """A StatusRequest, signed when an identity is given (authenticated runs require it)."""
    from fedswarm.proto import fedswarm_pb2 as pb

    if identity is None:
        return pb.StatusRequest()
    reply = stub.Challenge(pb.ChallengeRequest(), timeout=timeout)
    return pb.StatusRequest(**identity.status_proof(reply.run_id, reply.challenge))
