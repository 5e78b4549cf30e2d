"""PushSecAgg: a client's answer to a secure-aggregation stage (coordinator/secagg_round.py), checked against
the stage's instruction before the round sees it: its stage and round, every id one the instruction named, at
most one answer per task, keys that parse and blobs of bounded size."""
from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from fedswarm import secagg as S
from fedswarm.coordinator.aggregate import task_round
from fedswarm.coordinator.auth import Authenticator, AuthError, SeenSet
from fedswarm.coordinator.grid import SessionGrid
from fedswarm.coordinator.membership import Membership
from fedswarm.coordinator.rpc import (invalid, is_secagg, open_task, replayed, session, task_closed, task_config,
                                      unauthenticated, unsigned)
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import signing
from fedswarm.proto.refusals import Reason

MAX_KEY_BYTES = 1024          # a SEC1 PEM public key of Flower's curve is about 180 bytes
MAX_BLOB_BYTES = 4096         # a Fernet ciphertext of two shares is about 300 bytes; a share about 60
MAX_IDS = S.degree(S.MAX_CLIENTS)


def bad(detail: str):
    return invalid(Reason.BAD_SECAGG, detail)


class SecAggRpcs:
    def __init__(self, run_id: str, members: Membership, grid: SessionGrid, auth: Authenticator, answered: SeenSet):
        self.run_id, self.members, self.grid, self.auth, self.answered = run_id, members, grid, auth, answered

    def push_secagg(self, req: pb.SecAggReply, context) -> pb.PushReply:
        member = session(self.members, req.client_id, req.session_token)
        if (member.client_id, req.task_id) in self.answered:
            raise replayed(req.task_id, "a secure-aggregation answer")
        if self.auth.enabled and len(req.signature) != signing.SIGNATURE_BYTES:
            raise unsigned("secure-aggregation answer")
        msg = open_task(self.grid, req.task_id, member)
        if not is_secagg(msg):
            raise invalid(Reason.WRONG_TASK_KIND, "this task is not a secure-aggregation stage")
        record = checked(req, msg)
        try:
            self.auth.check_update(member.public_key, req.signature, self.run_id, task_round(msg), member.client_id,
                                   req.task_id, signing.secagg_digest(req))
        except AuthError as err:
            raise unauthenticated(err) from None
        if not self.grid.deliver_reply(req.task_id, member.client_id, RecordDict({"secagg": record})):
            raise task_closed("the stage closed before its answer came")
        self.answered.add((member.client_id, req.task_id))
        return pb.PushReply(accepted=True, message="ok")


def checked(req: pb.SecAggReply, msg: Message) -> ConfigRecord:
    """The answer as the round reads it; refused (BAD_SECAGG) unless it fits the stage it answers."""
    config = task_config(msg)
    stage = config["secagg-stage"]
    if req.stage != stage or req.round != task_round(msg):
        raise bad(f"the answer is for stage {req.stage[:32]!r} of round {req.round}; the task is {stage} of round "
                  f"{task_round(msg)}")
    ids, blobs, flags = [int(i) for i in req.node_ids], [bytes(b) for b in req.blobs], list(req.self_mask)
    if len(ids) > MAX_IDS or len(blobs) != len(ids) or len(set(ids)) != len(ids) or any(
            not 0 < len(b) <= MAX_BLOB_BYTES for b in blobs):
        raise bad(f"node_ids and blobs must pair up, at most {MAX_IDS}, distinct, each blob 1..{MAX_BLOB_BYTES} bytes")
    if stage == "setup":
        if ids or not all(0 < len(k) <= MAX_KEY_BYTES for k in (req.pk1, req.pk2)) or req.pk1 == req.pk2:
            raise bad("setup answers with two distinct public keys and nothing else")
        for key in (req.pk1, req.pk2):
            try:
                bytes_to_public_key(bytes(key))
            except (ValueError, TypeError):
                raise bad("a public key does not parse (SEC1 PEM of an EC key expected)") from None
        return ConfigRecord({"pk1": bytes(req.pk1), "pk2": bytes(req.pk2)})
    if stage == "share-keys":
        if not set(ids) <= set(config["secagg-ids"]) - {msg.metadata.dst_node_id}:
            raise bad("a key share is addressed to a node that is not this client's neighbour")
        return ConfigRecord({"node-ids": ids, "blobs": blobs})
    if stage == "unmask":
        active, dead = set(config["secagg-active"]), set(config["secagg-dead"])
        if len(flags) != len(ids) or any((i in active) != f or i not in active | dead for i, f in zip(ids, flags)):
            raise bad("each unmask share must be of a neighbour the task named, b for the active, sk1 for the dropped")
        return ConfigRecord({"node-ids": ids, "blobs": blobs, "self-mask": flags})
    if ids:   # receive-shares: an acknowledgement
        raise bad("receive-shares answers with nothing")
    return ConfigRecord({"ok": True})
