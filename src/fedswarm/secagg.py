"""SecAgg+ secure aggregation (Bell et al. 2020), following Flower's SecAggPlusWorkflow and secaggplus_mod.

The coordinator learns the sum of the survivors' updates and nothing else about any one of them:

1. setup: each sampled client makes two key pairs (Flower's `generate_key_pairs`): pk1 for the pairwise masks,
   pk2 for encrypting key shares; the coordinator collects the public keys.
2. share keys: each client Shamir-splits (Flower's `create_shares`) its self-mask seed b and its mask secret key
   sk1 among its neighbours (a seeded ring of k = 2 ceil(log2 N) + 1 nodes, so the cost grows as N log N), each
   share encrypted (Fernet) under an ECDH key with that neighbour; the coordinator only routes ciphertexts.
3. masked vector: each client quantizes its update (every coordinate clipped to [-clip, clip], stochastically
   rounded to 2^22 levels: Flower's `quantize`) and adds its self mask PRG(b) and, per neighbour j that shared
   keys, +PRG(s_ij) if its id is larger, else -PRG(s_ij), all mod 2^32 (uint32 wrap-around).
4. unmask: each survivor sends, per neighbour, the share of b (the neighbour sent its masked vector) or the
   share of sk1 (it did not); with t shares the coordinator removes the survivors' self masks and the dropped
   clients' pairwise masks, leaving the plain quantized sum.

The masks' PRG is ChaCha20 (`cryptography`) keyed with the full 32-byte secret, not Flower's `pseudo_rand_gen`
(which folds its seed to 32 bits: a 2^32 search would strip a mask). The mean is the plain sum / count: the
coordinator gives every federated update the same weight (local steps x batch), so it equals FedAvg's mean.
"""
from __future__ import annotations

import base64
import math
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import (share_keys_plaintext_concat,
                                                             share_keys_plaintext_separate)
from flwr.supercore.primitives.asymmetric import (bytes_to_private_key, bytes_to_public_key, generate_key_pairs,
                                                  private_key_to_bytes, public_key_to_bytes)

TARGET_RANGE = 1 << 22      # quantization levels per coordinate (Flower's default)
MOD_RANGE = 1 << 32         # the field: uint32 arithmetic wraps around mod 2^32
MAX_CLIENTS = MOD_RANGE // TARGET_RANGE - 1   # sums of this many quantized vectors cannot wrap
MASK_DTYPE = np.uint32
OBSERVE_ENV = "FEDSWARM_SECAGG_OBSERVE"   # tests only: a folder where the coordinator (every vector it holds)
                                          # and the clients (their true updates) write what they had


class SecAggError(RuntimeError):
    """The protocol cannot go on (too few survivors, a malformed or inconsistent message)."""


@dataclass(frozen=True)
class Params:
    """One round's protocol settings, the same for every client and the coordinator."""

    threshold: int          # shares needed to rebuild a secret
    clip: float             # each coordinate is clipped to [-clip, clip] before quantization

    def __post_init__(self):
        if self.threshold < 2 or not 0 < self.clip < math.inf:
            raise SecAggError(f"threshold must be >= 2 and clip a finite number > 0, got {self.threshold}, {self.clip}")


def degree(num_sampled: int) -> int:
    """Neighbours per client, itself included: 2 ceil(log2 N) + 1, at most N (the N log N graph)."""
    return min(num_sampled, 2 * math.ceil(math.log2(max(num_sampled, 2))) + 1)


def threshold_for(num_sampled: int) -> int:
    """A strict majority of a client's neighbourhood: tolerates (k - 1) // 2 dropouts among its neighbours."""
    return max(2, degree(num_sampled) // 2 + 1)


def neighbour_graph(node_ids: Iterable[int], seed: int) -> dict[int, frozenset[int]]:
    """Each node's neighbours (itself included) on a ring over a seeded shuffle, k = degree(N) per node."""
    ids = sorted(set(node_ids))
    if len(ids) < 3:
        raise SecAggError(f"secure aggregation needs at least 3 clients a round, got {len(ids)}")
    random.Random(seed).shuffle(ids)
    half = degree(len(ids)) // 2
    return {nid: frozenset(ids[(i + o) % len(ids)] for o in range(-half, half + 1)) for i, nid in enumerate(ids)}


def check_round_size(num_sampled: int) -> None:
    if not 3 <= num_sampled <= MAX_CLIENTS:
        raise SecAggError(f"secure aggregation needs 3..{MAX_CLIENTS} clients a round, got {num_sampled}")


def prg(secret: bytes, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform uint32 masks of `shapes` from a 32-byte secret: ChaCha20's keystream, one nonce per tensor."""
    if len(secret) != 32:
        raise SecAggError("a mask secret must be 32 bytes")
    out = []
    for index, shape in enumerate(shapes):
        nonce = index.to_bytes(16, "little")
        stream = Cipher(algorithms.ChaCha20(secret, nonce), mode=None).encryptor()
        out.append(np.frombuffer(stream.update(bytes(4 * math.prod(shape))), dtype="<u4").astype(MASK_DTYPE)
                   .reshape(shape))
    return out


def pairwise_secret(sk1: bytes, pk1: bytes) -> bytes:
    """The 32-byte secret two clients share (ECDH + HKDF: Flower's generate_shared_key)."""
    return base64.urlsafe_b64decode(generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(pk1)))


def _apply(acc: list[np.ndarray], masks: list[np.ndarray], sign: int) -> None:
    for a, m in zip(acc, masks, strict=True):
        if sign > 0:
            np.add(a, m, out=a)
        else:
            np.subtract(a, m, out=a)


def pair_sign(own: int, other: int) -> int:
    """+1: `own` adds the pair's mask, -1: it subtracts it (the larger id adds), so the pair cancels."""
    return 1 if own > other else -1


@dataclass
class ClientState:
    """One client's side of one round: keys, the shares it holds for its neighbours, and its seed b."""

    node_id: int
    params: Params
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    seed: bytes = b""
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    b_shares: dict[int, bytes] = field(default_factory=dict)     # neighbour -> its share of b we hold
    sk_shares: dict[int, bytes] = field(default_factory=dict)    # neighbour -> its share of sk1 we hold
    masked_with: list[int] = field(default_factory=list)         # neighbours whose pair masks we added

    def setup(self) -> tuple[bytes, bytes]:
        """Stage 0: fresh key pairs; the public keys go to the coordinator."""
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self.sk1, self.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
        self.sk2, self.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
        return self.pk1, self.pk2

    def share_keys(self, neighbour_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 1: Shamir shares of b and sk1, one per neighbour (self included); dst -> ciphertext."""
        keys = dict(neighbour_keys)
        if keys.get(self.node_id) != (self.pk1, self.pk2):
            raise SecAggError("the coordinator's key list does not hold this client's own public keys")
        if not len(keys) // 2 < self.params.threshold <= len(keys):
            raise SecAggError(f"threshold {self.params.threshold} for {len(keys)} neighbours with keys: it must be a "
                              f"majority of them (fewer would let a coordinator rebuild both secrets of a client)")
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise SecAggError("two neighbours announced the same public key")
        self.public_keys, self.seed = keys, os.urandom(32)
        b_shares = create_shares(self.seed, self.params.threshold, len(keys))
        sk_shares = create_shares(self.sk1, self.params.threshold, len(keys))
        out = {}
        for (nid, (_, pk2)), b, sk in zip(sorted(keys.items()), b_shares, sk_shares, strict=True):
            if nid == self.node_id:
                self.b_shares[nid], self.sk_shares[nid] = b, sk
                continue
            key = generate_shared_key(bytes_to_private_key(self.sk2), bytes_to_public_key(pk2))
            out[nid] = encrypt(key, share_keys_plaintext_concat(self.node_id, nid, b, sk))
        return out

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Stage 2 (before masking): decrypt the shares neighbours sent us; those neighbours are masked with."""
        for src, ciphertext in sorted(ciphertexts.items()):
            if src not in self.public_keys or src == self.node_id:
                raise SecAggError(f"a key share came from {src}, not a neighbour of {self.node_id}")
            key = generate_shared_key(bytes_to_private_key(self.sk2), bytes_to_public_key(self.public_keys[src][1]))
            try:
                actual, dst, b, sk = share_keys_plaintext_separate(decrypt(key, ciphertext))
            except Exception as err:   # Fernet's InvalidToken: tampered or for another key
                raise SecAggError(f"the key share from {src} does not decrypt: {type(err).__name__}") from None
            if (actual, dst) != (src, self.node_id):
                raise SecAggError(f"a key share claims to be {actual}->{dst}, but came {src}->{self.node_id}")
            self.b_shares[src], self.sk_shares[src] = b, sk
        self.masked_with = sorted(ciphertexts)
        if len(self.masked_with) + 1 < self.params.threshold:
            raise SecAggError(f"{len(self.masked_with) + 1} neighbours shared keys, below the threshold "
                              f"{self.params.threshold}")

    def mask(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Stage 2: the quantized update plus the self mask and the pairwise masks, mod 2^32."""
        if not self.seed:
            raise SecAggError("mask() before share_keys(): this client has no self-mask seed")
        out = [q.astype(np.int64).astype(MASK_DTYPE) for q in quantize(
            [np.asarray(a, dtype=np.float64) for a in arrays], self.params.clip, TARGET_RANGE)]
        shapes = [a.shape for a in out]
        _apply(out, prg(self.seed, shapes), 1)
        for nid in self.masked_with:
            _apply(out, prg(pairwise_secret(self.sk1, self.public_keys[nid][0]), shapes),
                   pair_sign(self.node_id, nid))
        return out

    def unmask(self, active: Iterable[int], dead: Iterable[int]) -> dict[int, tuple[str, bytes]]:
        """Stage 3: per neighbour, its share of b (it is active) or of sk1 (dead): owner -> (kind, share).
        Never both for one owner: that would reveal its update."""
        active, dead = set(active), set(dead)
        if active & dead:
            raise SecAggError("the coordinator called a neighbour both active and dropped: refusing to unmask")
        if len(active) < self.params.threshold:
            raise SecAggError(f"{len(active)} active neighbours, below the threshold {self.params.threshold}")
        unknown = (active - set(self.b_shares)) | (dead - set(self.sk_shares))
        if unknown:
            raise SecAggError(f"asked for shares of {sorted(unknown)}, which this client does not hold")
        return {**{n: ("b", self.b_shares[n]) for n in active}, **{n: ("sk", self.sk_shares[n]) for n in dead}}


class MaskedSum:
    """The coordinator's running sum of masked vectors, mod 2^32: all it ever keeps of them."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = [tuple(s) for s in shapes]
        self.total = [np.zeros(s, dtype=MASK_DTYPE) for s in self.shapes]
        self.senders: set[int] = set()

    def add(self, node_id: int, vector: list[np.ndarray]) -> None:
        if node_id in self.senders:
            raise SecAggError(f"client {node_id} already sent its masked vector")
        if [tuple(v.shape) for v in vector] != self.shapes or any(v.dtype != MASK_DTYPE for v in vector):
            raise SecAggError("a masked vector must hold uint32 tensors of the model's shapes")
        _apply(self.total, vector, 1)
        self.senders.add(node_id)


@dataclass
class RoundKeys:
    """What the coordinator learned in stages 0-1: the graph, the public keys, who shared keys."""

    neighbours: dict[int, frozenset[int]]
    public_keys: dict[int, tuple[bytes, bytes]]
    shared: set[int]           # clients whose encrypted shares were routed (U1)


def unmask_sum(masked: MaskedSum, keys: RoundKeys, params: Params,
               shares: Mapping[int, Mapping[int, tuple[str, bytes]]]) -> list[np.ndarray]:
    """The survivors' mean update (float64) from the masked sum and the unmask replies
    (`shares`: responder -> owner -> (kind, share)). SecAggError if a secret has fewer than t shares."""
    survivors, dropped = set(masked.senders), keys.shared - set(masked.senders)
    if len(survivors) < 2:
        raise SecAggError(f"only {len(survivors)} masked vector(s) arrived: a sum of fewer than 2 would be one "
                          f"client's update; the round is void")
    b_shares, sk_shares = _collect(shares, survivors, dropped)
    total = [t.copy() for t in masked.total]
    for owner in sorted(survivors):
        _apply(total, prg(_combine(b_shares.get(owner, []), owner, params), masked.shapes), -1)
    for owner in sorted(dropped):
        sk1 = _combine(sk_shares.get(owner, []), owner, params)
        for nid in sorted((keys.neighbours[owner] & survivors) - {owner}):
            # nid added pair_sign(nid, owner) x the pair's mask: take it back out
            _apply(total, prg(pairwise_secret(sk1, keys.public_keys[nid][0]), masked.shapes),
                   -pair_sign(nid, owner))
    return dequantized_mean(total, len(survivors), params.clip)


def _collect(shares, survivors: set[int], dropped: set[int]) -> tuple[dict, dict]:
    b_shares: dict[int, list[bytes]] = {}
    sk_shares: dict[int, list[bytes]] = {}
    for owners in shares.values():
        for owner, (kind, share) in owners.items():
            if kind == "b" and owner in survivors:
                b_shares.setdefault(owner, []).append(share)
            elif kind == "sk" and owner in dropped:
                sk_shares.setdefault(owner, []).append(share)
            else:
                raise SecAggError(f"a {kind!r} share of client {owner} does not fit its state this round")
    return b_shares, sk_shares


def _combine(share_list: list[bytes], owner: int, params: Params) -> bytes:
    if len(share_list) < params.threshold:
        raise SecAggError(f"client {owner}'s secret has {len(share_list)} shares, below the threshold "
                          f"{params.threshold}: too many of its neighbours dropped; the round is void")
    try:
        return combine_shares(share_list)
    except ValueError as err:
        raise SecAggError(f"client {owner}'s shares do not combine: {err}") from None


def dequantized_mean(total: list[np.ndarray], count: int, clip: float) -> list[np.ndarray]:
    """The mean of `count` quantized vectors from their sum (Flower's dequantize, less count - 1 offsets)."""
    out = dequantize([t.astype(np.int64) for t in total], clip, TARGET_RANGE)
    return [(a - (count - 1) * clip) / count for a in out]
