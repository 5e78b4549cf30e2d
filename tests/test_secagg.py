"""SecAgg+ (fedswarm/secagg.py): the masked sum is the plain sum, dropouts after masking are recovered, dropouts
before are left out, too few survivors fail clearly, and nothing the coordinator holds correlates with an update."""
from __future__ import annotations

import numpy as np
import pytest

from fedswarm import secagg as S

SHAPES = [(128, 128), (4000,)]
CLIP = 0.5


def _updates(n: int, seed: int = 0) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {100 + i: [rng.normal(0, 0.05, s) for s in SHAPES] for i in range(n)}


def _round(updates, *, gone_before_keys=(), gone_before_mask=(), gone_after_mask=(), observer=None):
    """One round of the protocol with the given clients dropping at each stage; the survivors' mean."""
    ids = sorted(updates)
    params = S.Params(S.threshold_for(len(ids)), CLIP)
    graph = S.neighbour_graph(ids, seed=7)
    clients = {n: S.ClientState(n, params) for n in ids}
    public = {n: clients[n].setup() for n in ids}                                       # stage 0
    ciphertexts = {}
    for n in ids:                                                                        # stage 1
        if n in gone_before_keys:
            continue
        ciphertexts[n] = clients[n].share_keys({j: public[j] for j in graph[n]})
    keys = S.RoundKeys(graph, public, set(ciphertexts))
    masked = S.MaskedSum(SHAPES)
    for n in ciphertexts:                                                                # stage 2
        if n in gone_before_mask:
            continue
        clients[n].receive_shares({src: c[n] for src, c in ciphertexts.items() if n in c})
        vector = clients[n].mask(updates[n])
        if observer is not None:
            observer.append((n, vector))
        masked.add(n, vector)
    active, replies = masked.senders, {}
    for n in sorted(active - set(gone_after_mask)):                                      # stage 3
        replies[n] = clients[n].unmask(graph[n] & active, (graph[n] & keys.shared) - active)
    if observer is not None:
        observer.append((None, masked.total))
    return S.unmask_sum(masked, keys, params, replies), active


def _plain_mean(updates, ids):
    return [np.mean([np.clip(updates[n][i], -CLIP, CLIP) for n in ids], axis=0) for i in range(len(SHAPES))]


def _close(got, want):
    step = 2 * CLIP / S.TARGET_RANGE   # one quantization level
    for g, w in zip(got, want):
        assert np.max(np.abs(g - w)) <= 2 * step


def test_masked_sum_is_the_plain_sum():
    updates = _updates(6)
    mean, active = _round(updates)
    assert active == set(updates)
    _close(mean, _plain_mean(updates, updates))


def test_a_client_that_dies_after_masking_is_recovered():
    updates = _updates(6)
    mean, active = _round(updates, gone_after_mask=[101])
    assert 101 in active
    _close(mean, _plain_mean(updates, updates))


def test_a_client_that_dies_before_masking_is_left_out():
    updates = _updates(8)                  # k = 7, t = 4: five of eight answer the unmask
    mean, active = _round(updates, gone_before_mask=[102], gone_before_keys=[104], gone_after_mask=[100])
    assert active == set(updates) - {102, 104}
    _close(mean, _plain_mean(updates, sorted(active)))


def test_below_threshold_fails_clearly():
    updates = _updates(5)                  # k = 5, t = 3: two masked survivors answering is too few
    with pytest.raises(S.SecAggError, match="below the threshold"):
        _round(updates, gone_before_mask=[100], gone_after_mask=[101, 102])


def test_the_graph_is_sparse_for_many_clients():
    graph = S.neighbour_graph(range(1000), seed=1)
    assert all(len(v) == S.degree(1000) == 21 for v in graph.values())
    assert all(n in graph[m] for n in graph for m in graph[n])   # symmetric: the ring


def test_a_client_never_reveals_both_shares_of_one_neighbour():
    params = S.Params(2, CLIP)
    c = S.ClientState(1, params)
    c.b_shares = {1: b"x", 2: b"y"}
    c.sk_shares = {1: b"x", 2: b"y"}
    with pytest.raises(S.SecAggError, match="both active and dropped"):
        c.unmask([1, 2], [2])


def test_no_vector_the_coordinator_holds_correlates_with_an_update():
    updates = _updates(5, seed=3)
    held: list = []
    mean, _ = _round(updates, gone_after_mask=[103], observer=held)
    assert len(held) == 6   # five masked vectors and the masked sum
    for _, vector in held:
        flat = np.concatenate([v.ravel() for v in vector]).astype(np.float64)
        for n, update in updates.items():
            true = np.concatenate([u.ravel() for u in update])
            # independent vectors: |corr| ~ 1 / sqrt(n) = 0.007; 0.05 is 7 standard deviations
            assert abs(np.corrcoef(flat, true)[0, 1]) < 0.05, f"a held vector correlates with client {n}'s update"
    plain_sum = np.concatenate([m.ravel() for m in mean])
    assert min(np.corrcoef(plain_sum, np.concatenate([u.ravel() for u in up]))[0, 1]
               for up in updates.values()) > 0.3   # while the unmasked mean does


def test_the_masked_codec_is_exact_and_checked():
    import dataclasses

    import torch

    from fedswarm.proto import codec as C
    from fedswarm.proto import fedswarm_pb2 as pb

    values = np.array([0, 1, 2**32 - 1, 12345], dtype=np.uint32)
    enc = C.masked_encoded(values)
    assert np.array_equal(C.masked_values([enc]), values)
    with pytest.raises(C.CodecError, match="expected 16"):
        C.validate(dataclasses.replace(enc, data=enc.data[:-1]))
    with pytest.raises(C.CodecError, match="block_size must be 0"):
        C.validate(dataclasses.replace(enc, block_size=64))
    with pytest.raises(C.CodecError):
        C.encode(torch.zeros(4), pb.CODEC_MASKED)   # masks are made by fedswarm.secagg, never from floats


def test_answers_are_checked_against_their_stage(task_identity):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedswarm.coordinator.secagg_rpcs import checked
    from fedswarm.proto import fedswarm_pb2 as pb
    from fedswarm.proto.refusals import Reason, Refused

    def task(stage, **config):
        return Message(content=RecordDict({"config": ConfigRecord({"secagg-stage": stage, **config})}),
                       dst_node_id=7, message_type=MessageType.TRAIN, group_id="3")
    shares = task("share-keys", **{"secagg-ids": [5, 7, 9]})
    ok = dict(stage="share-keys", round=3, node_ids=[5, 9], blobs=[b"x", b"y"])
    assert list(checked(pb.SecAggReply(**ok), shares)["node-ids"]) == [5, 9]
    unmask = task("unmask", **{"secagg-active": [5, 7], "secagg-dead": [9]})
    assert checked(pb.SecAggReply(stage="unmask", round=3, node_ids=[5, 9], blobs=[b"s", b"t"],
                                  self_mask=[True, False]), unmask)
    wrong = [(shares, {"stage": "unmask"}), (shares, {"round": 4}), (shares, {"node_ids": [5, 11]}),
             (shares, {"node_ids": [7, 9]}), (shares, {"node_ids": [5, 5]}), (shares, {"blobs": [b"x" * 5000, b"y"]}),
             (shares, {"blobs": [b"x"]}), (task("setup"), {"stage": "setup", "node_ids": [], "blobs": [],
                                                           "pk1": b"not a key", "pk2": b"nor this"}),
             (unmask, {"stage": "unmask", "node_ids": [5, 9], "blobs": [b"s", b"t"], "self_mask": [True, True]})]
    for msg, change in wrong:
        with pytest.raises(Refused) as refused:
            checked(pb.SecAggReply(**{**ok, **change}), msg)
        assert refused.value.reason == Reason.BAD_SECAGG, change


def test_an_answer_is_signed_over_everything_but_its_session_token():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fedswarm.client.identity import Identity
    from fedswarm.coordinator.auth import AuthError, Authenticator
    from fedswarm.proto import fedswarm_pb2 as pb
    from fedswarm.proto import signing

    ident = Identity(ed25519.Ed25519PrivateKey.generate())
    reply = pb.SecAggReply(client_id=7, session_token="s1", task_id="t1", round=3, stage="share-keys",
                           node_ids=[5, 9], blobs=[b"x", b"y"])
    reply.signature = ident.key.sign(signing.update_message("r1", 3, 7, "t1", signing.secagg_digest(reply)))
    auth = Authenticator({ident.public_key: "c0"})
    auth.check_update(ident.public_key, reply.signature, "r1", 3, 7, "t1", signing.secagg_digest(reply))
    reply.session_token = "s2"   # a re-join's token: the signature still holds
    auth.check_update(ident.public_key, reply.signature, "r1", 3, 7, "t1", signing.secagg_digest(reply))
    reply.blobs[1] = b"z"        # a routed share swapped: it does not
    with pytest.raises(AuthError):
        auth.check_update(ident.public_key, reply.signature, "r1", 3, 7, "t1", signing.secagg_digest(reply))
