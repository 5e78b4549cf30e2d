"""DHT records only their peer can write: each announce goes under a subkey that names the announcing peer's
own libp2p key (hivemind's protected records, `[owner:<RSA public key>]`), and every DHT node of the run
validates it, so a write to that subkey without the key's signature is refused wherever it lands and dropped
wherever it is read. The peer id a record speaks for is derived from that key, never taken from the record."""
from __future__ import annotations

import hashlib

import multihash
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey


def validator(identity: bytes) -> RSASignatureValidator:
    """The validator a node runs: it signs this node's own records with its libp2p key (`identity`, from
    p2p.new_identity) and checks everyone else's."""
    return RSASignatureValidator(private_key(identity))


def owner_peer_id(subkey: object) -> str | None:
    """The base58 libp2p peer id of the key a protected subkey names; None for any other subkey."""
    if not isinstance(subkey, bytes):
        return None
    keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)
    if len(keys) != 1 or subkey != RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", keys[0]):
        return None
    return key_peer_id(keys[0])


def key_peer_id(public_key: bytes) -> str | None:
    """The base58 libp2p peer id of an RSA public key in OpenSSH form; None if it is not one."""
    public = public_key_of(public_key)
    if public is None:
        return None
    der = public._public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def public_key_of(public_key: bytes) -> RSAPublicKey | None:
    """An RSA public key in OpenSSH form, parsed; None if it is not one."""
    try:
        return RSAPublicKey.from_bytes(public_key)
    except (ValueError, UnsupportedAlgorithm):   # not an RSA key in OpenSSH form
        return None


def private_key(identity: bytes) -> RSAPrivateKey:
    """This node's libp2p RSA key from its identity (p2p.new_identity), for signing."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": crypto_pb2.PrivateKey.FromString(identity).data})   # DER, as p2pd reads it
    return key


def by_owner(entries: dict[object, object]) -> tuple[dict[str, object], list[object]]:
    """(peer id -> value of the protected entries, the subkeys that named no owner: anyone could write them)."""
    owned, unsigned = {}, []
    for subkey, value in entries.items():
        peer = owner_peer_id(subkey)
        if peer is None:
            unsigned.append(subkey)
        else:
            owned[peer] = value
    return owned, unsigned
