"""--secure-aggregation on the coordinator: the SecAgg+ stages around a federated round (fedswarm/secagg.py).

`SecAggCohort.run` is the federated cohort's round with Flower's SecAggPlusWorkflow stages around it: the
strategy configures the round (whom to sample); setup, share-keys and receive-shares go to the sampled clients
as TASK_SECAGG instructions; the strategy's own train instructions follow, answered with masked vectors
(PushUpdate, codec masked) that `SecAggSink` adds into the round's `SecAggFold` mod 2^32; the unmask stage
brings the shares that remove the masks; the strategy aggregates the survivors' mean as it would a fold's.
The coordinator never holds an individual unmasked vector. FEDSWARM_SECAGG_OBSERVE=DIR (tests only) writes
every vector it holds there (each masked vector as it arrives, and the masked sum).
"""
from __future__ import annotations

import base64
import dataclasses
import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.exception import AggregationError

from fedswarm import secagg as S
from fedswarm.coordinator.aggregate import (DecodedUpdate, FoldedArrays, MeanFold, TensorArray, UpdateSink,
                                            read_only_view)
from fedswarm.coordinator.cohort import CohortResult, FederatedCohort

log = logging.getLogger(__name__)
STAGE_KEY = "secagg-stage"


def b64(blobs) -> list[str]:
    return [base64.b64encode(bytes(b)).decode() for b in blobs]


class SecAggFold(MeanFold):
    """A round's masked sum (mod 2^32) in place of MeanFold's float sum; its mean is set by the unmask stage."""

    def __init__(self, base: ArrayRecord):
        super().__init__(base)
        self.names = sorted(base.keys())   # the masks' order: tensors by name, as clients mask them
        self.masked = S.MaskedSum([tuple(base[n].shape) for n in self.names])
        self.unmasked: list[np.ndarray] | None = None
        self.observe = os.environ.get(S.OBSERVE_ENV, "")

    def add_masked(self, message_id: str, node_id: int, delta: Mapping[str, np.ndarray], weight: float) -> None:
        vector = [delta[n] for n in self.names]
        with self._lock:
            if self._consumed or self.unmasked is not None:
                raise AggregationError("this round's masked sum was already unmasked; the update came too late")
            self.masked.add(node_id, vector)
            self._weights[message_id] = weight
        if self.observe:
            np.savez(os.path.join(self.observe, f"masked-{node_id}-{message_id[:12]}.npz"), *vector)

    def mean(self, weights: Mapping[str, float]) -> ArrayRecord:
        """base + the survivors' mean delta (the plain mean: every federated update weighs the same)."""
        with self._lock:
            if self._consumed or self.unmasked is None:
                raise AggregationError("the round's masked sum was not unmasked (or its mean was already taken)")
            if set(weights) != set(self._weights):
                raise AggregationError("the replies and the masked vectors summed differ")
            self._consumed = True
            delta, self.unmasked = self.unmasked, None
        out = ArrayRecord()
        deltas = dict(zip(self.names, delta, strict=True))
        for name, base in self.base.items():   # the model's own order
            d, view = deltas.pop(name), read_only_view(base).float()
            out[name] = TensorArray((view + torch.from_numpy(d).to(torch.float32).view(view.shape)).contiguous())
        return out


class SecAggSink(UpdateSink):
    """Masked uploads: added into the round's SecAggFold; the reply carries a placeholder and the metrics."""

    def fold_for(self, base: ArrayRecord) -> MeanFold:
        return SecAggFold(base)

    def content(self, instruction: Message, fold: MeanFold | None, update: DecodedUpdate) -> RecordDict:
        if not isinstance(fold, SecAggFold):
            raise AggregationError("a masked vector came for an instruction without a masked sum")
        fold.add_masked(instruction.metadata.message_id, instruction.metadata.dst_node_id,
                        update.delta, update.weight)
        return RecordDict({"arrays": FoldedArrays(fold), "metrics": update.metrics, "client": update.client})


@dataclasses.dataclass
class Stages:
    """One round's protocol state on the coordinator."""

    params: S.Params
    keys: S.RoundKeys
    sampled: set[int]
    routed: dict[int, dict[int, str]] = dataclasses.field(default_factory=dict)   # dst -> src -> ciphertext


class SecAggCohort(FederatedCohort):
    """The federated cohort with the SecAgg+ stages around its train instructions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stages: Stages | None = None

    def before_train(self, rnd: int, messages: list[Message]) -> list[Message]:
        """Setup, share-keys and receive-shares with the sampled clients; the train instructions of those left."""
        sampled = {m.metadata.dst_node_id for m in messages}
        S.check_round_size(len(sampled))
        params = S.Params(S.threshold_for(len(sampled)), self.cfg.masking_range())
        graph = S.neighbour_graph(sampled, seed=self.seed * 1_000_003 + rnd)
        keys = self._setup(rnd, params, graph)
        stages = self.stages = Stages(params, keys, sampled)
        self._share_keys(rnd, stages)
        ready = self._receive_shares(rnd, stages)
        return [m for m in messages if m.metadata.dst_node_id in ready]

    def after_train(self, rnd: int, replies: list[Message], result: CohortResult) -> list[Message]:
        """The unmask stage: the survivors' shares remove the masks; the fold then holds their mean."""
        stages, self.stages = self.stages, None
        ok = [m for m in replies if not m.has_error()]
        folds = {id(f): f for f in (m.content["arrays"].fold for m in ok)}
        if len(folds) != 1:
            raise AggregationError(f"the round's masked vectors belong to {len(folds)} sums")
        fold: SecAggFold = next(iter(folds.values()))
        survivors = set(fold.masked.senders)
        dead = stages.keys.shared - survivors
        answers = self._ask(rnd, "unmask", {n: {
            "secagg-active": sorted(stages.keys.neighbours[n] & survivors),
            "secagg-dead": sorted(stages.keys.neighbours[n] & dead)} for n in survivors})
        shares = {n: {int(o): ("b" if b else "sk", bytes(s)) for o, s, b in zip(
            c["node-ids"], c["blobs"], c["self-mask"], strict=True)} for n, c in answers.items()}
        if fold.observe:
            np.savez(os.path.join(fold.observe, f"sum-round{rnd}.npz"), *fold.masked.total)
        fold.unmasked = S.unmask_sum(fold.masked, stages.keys, stages.params, shares)
        result.secagg = {"sampled": len(stages.sampled), "shared_keys": len(stages.keys.shared),
                         "masked": len(survivors), "dropped_before_masking": len(stages.sampled) - len(survivors),
                         "dropped_after_masking": len(survivors) - len(answers), "recovered": len(dead),
                         "threshold": stages.params.threshold}
        log.info("round %d: secure aggregation unmasked the sum of %d masked vectors (%d of them answered the "
                 "unmask; %d clients that shared keys dropped before masking)", rnd, len(survivors), len(answers),
                 len(dead))
        return ok

    # -- the stages --------------------------------------------------------------------------
    def _ask(self, rnd: int, stage: str, configs: dict[int, dict]) -> dict[int, ConfigRecord]:
        """Send one stage's instruction to each node in `configs`; node -> its answer's record (errors dropped)."""
        messages = [Message(content=RecordDict({"config": ConfigRecord({STAGE_KEY: stage, **cfg})}),
                            dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(rnd))
                    for nid, cfg in configs.items()]
        replies = self.view.send_and_receive(messages, timeout=self.timeout_s)
        return {m.metadata.src_node_id: m.content["secagg"] for m in replies if not m.has_error()}

    def _setup(self, rnd: int, params: S.Params, graph) -> S.RoundKeys:
        answers = self._ask(rnd, "setup", {n: {"secagg-threshold": params.threshold,
                                                      "secagg-clip": params.clip} for n in graph})
        public = {n: (bytes(c["pk1"]), bytes(c["pk2"])) for n, c in answers.items()}
        return S.RoundKeys(graph, public, set())

    def _share_keys(self, rnd: int, stages: Stages) -> None:
        keys = stages.keys
        configs = {}
        for n in keys.public_keys:
            near = sorted(keys.neighbours[n] & set(keys.public_keys))
            configs[n] = {"secagg-ids": near, "secagg-pk1": b64(keys.public_keys[j][0] for j in near),
                          "secagg-pk2": b64(keys.public_keys[j][1] for j in near)}
        answers = self._ask(rnd, "share-keys", configs)
        for src, c in answers.items():
            for dst, blob in zip(c["node-ids"], c["blobs"], strict=True):
                if int(dst) in keys.neighbours[src] and int(dst) in answers:
                    stages.routed.setdefault(int(dst), {})[src] = b64([blob])[0]
        keys.shared.update(answers)

    def _receive_shares(self, rnd: int, stages: Stages) -> set[int]:
        configs = {n: {"secagg-ids": sorted(stages.routed.get(n, {})),
                       "secagg-blobs": [stages.routed[n][s] for s in sorted(stages.routed.get(n, {}))]}
                   for n in stages.keys.shared}
        ready = set(self._ask(rnd, "receive-shares", configs))
        stages.routed.clear()
        return ready


