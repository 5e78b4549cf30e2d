"""--secure-aggregation on a client: answer the SecAgg+ stages (TASK_SECAGG) and mask the round's update
(fedswarm/secagg.py). Shared by the daemon (client/daemon.py) and the simulation's virtual clients."""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import torch

from fedswarm import secagg as S
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire


def _unb64(values) -> list[bytes]:
    return [base64.b64decode(v, validate=True) for v in values]


class SecAggClient:
    """One client's protocol state: a fresh ClientState (keys, shares, seed) per round, older rounds dropped."""

    def __init__(self):
        self.rounds: dict[int, S.ClientState] = {}

    def answer(self, node_id: int, task: pb.Task) -> pb.SecAggReply:
        """The PushSecAgg answer to a TASK_SECAGG task (without the session's ids)."""
        config = json.loads(task.config_json)
        stage = config["secagg-stage"]
        reply = pb.SecAggReply(task_id=task.task_id, round=task.round, stage=stage)
        if stage == "setup":
            state = S.ClientState(node_id, S.Params(int(config["secagg-threshold"]), float(config["secagg-clip"])))
            self.rounds = {r: s for r, s in self.rounds.items() if r > task.round - 2}
            self.rounds[task.round] = state
            reply.pk1, reply.pk2 = state.setup()
            return reply
        state = self._state(task.round)
        if stage == "share-keys":
            ids = [int(i) for i in config["secagg-ids"]]
            keys = dict(zip(ids, zip(_unb64(config["secagg-pk1"]), _unb64(config["secagg-pk2"]), strict=True),
                            strict=True))
            for dst, blob in state.share_keys(keys).items():
                reply.node_ids.append(dst)
                reply.blobs.append(blob)
        elif stage == "receive-shares":
            ids = [int(i) for i in config["secagg-ids"]]
            state.receive_shares(dict(zip(ids, _unb64(config["secagg-blobs"]), strict=True)))
        elif stage == "unmask":
            for owner, (kind, share) in sorted(state.unmask(config["secagg-active"], config["secagg-dead"]).items()):
                reply.node_ids.append(owner)
                reply.blobs.append(share)
                reply.self_mask.append(kind == "b")
            del self.rounds[task.round]
        else:
            raise S.SecAggError(f"unknown secure-aggregation stage {stage!r}: update fedswarm to the coordinator's")
        return reply

    def ready(self, rnd: int) -> bool:
        """Whether this client went through the round's key stages, so it can mask its update."""
        state = self.rounds.get(rnd)
        return state is not None and bool(state.seed and state.masked_with)

    def masked_parts(self, rnd: int, delta: dict[str, torch.Tensor]) -> list[bytes]:
        """The round's update, quantized and masked, as serialized UpdateChunk parts (tensors in name order)."""
        names = sorted(delta)
        arrays = [delta[n].detach().cpu().double().numpy() for n in names]
        state = self._state(rnd)
        vector = state.mask(arrays)
        if os.environ.get(S.OBSERVE_ENV):   # tests: the true update, to show the coordinator held nothing like it
            np.savez(os.path.join(os.environ[S.OBSERVE_ENV], f"true-{state.node_id}-{rnd}.npz"),
                     *[a.astype(np.float32) for a in arrays])
        return [pb.UpdateChunk(part=p).SerializeToString() for n, v in zip(names, vector, strict=True)
                for p in wire.tensor_parts(n, tuple(delta[n].shape), C.masked_encoded(np.asarray(v)))]

    def _state(self, rnd: int) -> S.ClientState:
        state = self.rounds.get(rnd)
        if state is None:
            raise S.SecAggError(f"round {rnd}: a secure-aggregation stage came before its setup (this client "
                                f"restarted mid-round?); it sits this round out")
        return state
