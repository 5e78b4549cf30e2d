"""What the run's mode decides in the RPCs, chosen once at start (`mode_policy`): which roles may join, what
join and heartbeat answer, where a download's weights and digest come from, and how an upload is weighted.
Federated: clients (and evaluators) train the whole model; downloads are encoded deltas between versions.
Swarm: peers serve stages and trainers drive micro-batches; downloads are a stage's weights, whole."""
from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import torch
from flwr.app import Message

from fedswarm.coordinator.downloads import ServedVersions, full_copy, model_chunks
from fedswarm.coordinator.membership import Member
from fedswarm.coordinator.status import StatusLimits
from fedswarm.coordinator.rpc import TaskBases, invalid, task_config, task_stage, task_version
from fedswarm.coordinator.swarm_registry import PEER_ID
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.proto.refusals import Reason, Refused
from fedswarm.run_config import RunConfig

NO_STAGE = -1


def no_stage(stage: int) -> Refused:
    return invalid(Reason.BAD_STAGE, f"no stage {stage} in this run")


class FederatedMode:
    """--mode federated: every client trains the whole model."""

    roles = ("client", "evaluator")

    def __init__(self, cfg: RunConfig, downloads: ServedVersions, bases: TaskBases):
        self.cfg, self.downloads, self.bases = cfg, downloads, bases

    def check_join(self, req: pb.JoinRequest) -> None:
        """Refuse what this mode cannot take from a join (before a session is made)."""

    def joined(self, member: Member, req: pb.JoinRequest) -> dict:
        """The JoinReply's mode fields for a new (or re-joined) session."""
        return {"stage": NO_STAGE}

    def heartbeat(self, member: Member, req: pb.HeartbeatRequest) -> dict:
        """Take in what a heartbeat reports; the HeartbeatReply's mode fields."""
        return {"stage": NO_STAGE}

    def stage_download(self, stage: int, max_bytes: int) -> Iterator[pb.ModelChunk]:
        raise no_stage(stage)

    def download(self, req: pb.FetchModelRequest, msg: Message, max_bytes: int) -> Iterator[pb.ModelChunk]:
        """The task's version as-served: encoded steps from the version the client holds, else a full copy
        (the bytes sent are counted for the task's round record)."""
        version = task_version(msg)
        served = self.downloads.served(version, self.bases.base(req.task_id, msg))
        steps = self.downloads.chain(version, req.held_version, bytes(req.held_digest)) if req.has_version else None
        for chunk in model_chunks(served, steps, max_bytes):
            self.bases.sent(req.task_id, chunk.ByteSize())
            yield chunk

    def served_digest(self, msg: Message) -> bytes:
        """Digest of the weights a client of this task trains from (the as-served state of its version)."""
        return self.downloads.served(task_version(msg), self.bases.base(msg.metadata.message_id, msg)).digest

    def weight(self, msg: Message, h: pb.UpdateHeader) -> int:
        """An update's FedAvg weight: the examples the task asked for (local steps x batch x accumulation),
        never the client's own figure."""
        steps = int(task_config(msg).get("local-steps", self.cfg.local_steps))
        return steps * self.cfg.batch_size * self.cfg.grad_accum

    def status(self, limits: StatusLimits) -> dict:
        """The mode's part of the Status object."""
        return {}


class SwarmMode:
    """--mode swarm: peers serve pipeline stages (the registry assigns them), trainers route micro-batches."""

    roles = ("peer", "trainer")

    def __init__(self, swarm, bases: TaskBases):
        self.swarm, self.registry, self.bases = swarm, swarm.registry, bases

    def check_join(self, req: pb.JoinRequest) -> None:
        if req.p2p_peer_id and not PEER_ID.fullmatch(req.p2p_peer_id):
            raise invalid(Reason.BAD_PEER_ID, "p2p_peer_id must be a base58 libp2p peer id")

    def joined(self, member: Member, req: pb.JoinRequest) -> dict:
        """A peer gets its stage (kept on a re-join), a trainer is put on the roster; both get the DHT's
        bootstrap peers and the roster."""
        stage = NO_STAGE
        if member.role == "peer":
            stage = self.registry.stage(member.client_id)
            if stage < 0:
                stage = self.registry.assign(member.client_id, member.name, req.p2p_peer_id)
        else:
            self.registry.add_trainer(member.client_id, member.name, req.p2p_peer_id)
        return {"stage": stage, "dht_peers": self.swarm.dht_peers, "roster": self.registry.roster()}

    def heartbeat(self, member: Member, req: pb.HeartbeatRequest) -> dict:
        stage = NO_STAGE
        if member.role == "peer":
            _check_peer_heartbeat(req)
            self.registry.report_peer(member.client_id, req.throughput, int(req.optimizer_steps),
                                      req.load if math.isfinite(req.load) else 0.0, serving=req.stage,
                                      refused=dict(req.refused), switch_s=req.switch_s,
                                      confirmed=dict(req.confirmed_tokens))
            stage = self.registry.stage(member.client_id)
        elif member.role == "trainer":
            loss = req.train_loss if math.isfinite(req.train_loss) and req.train_loss > 0 else None
            self.registry.report_trainer(member.client_id, member.name, int(req.microbatches_completed),
                                         int(req.microbatches_retried), int(req.microbatches_lost), int(req.tokens),
                                         loss, refused=dict(req.refused), routed=dict(req.confirmed_tokens))
            self.registry.report_lying(req.lying)   # spot checks' convictions, judged on their signed evidence
        return {"stage": stage, "roster": self.registry.roster()}

    def stage_download(self, stage: int, max_bytes: int) -> Iterator[pb.ModelChunk]:
        """A stage's latest committed average (a re-assigned peer starts from it)."""
        if stage >= len(self.swarm.driver.stage_names):
            raise no_stage(stage)
        base = self.swarm.driver.stage_state(stage)
        if base is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, Reason.NOT_READY,
                          "the coordinator is still loading the swarm's stages: retry shortly")
        return _whole(base, max_bytes)

    def download(self, req: pb.FetchModelRequest, msg: Message, max_bytes: int) -> Iterator[pb.ModelChunk]:
        """The stage average a sync starts from: the stages of one round differ, so no version chain."""
        return _whole(self.bases.base(req.task_id, msg), max_bytes)

    def served_digest(self, msg: Message) -> bytes:
        return wire.state_digest(self.bases.base(msg.metadata.message_id, msg))

    def weight(self, msg: Message, h: pb.UpdateHeader) -> int:
        """A stage sync weighs the peer's token count, capped at the tokens the trainers reported through that
        stage since its last average. A replica caught lying meanwhile has its sync refused."""
        if self.registry.is_liar(msg.metadata.dst_node_id):
            raise invalid(Reason.LYING_PEER, "this replica was caught lying: its stage sync is refused")
        return self.registry.sync_weight(task_stage(msg), h.num_examples, msg.metadata.dst_node_id)

    def status(self, limits: StatusLimits) -> dict:
        snap = self.registry.snapshot()   # events and re-assignments: bounded by the registry
        cap = limits.stage_peers
        snap["stages"] = [{**s, "peers": s["peers"][:cap], "peer_count": len(s["peers"])} for s in snap["stages"]]
        return {"swarm": snap}


def _check_peer_heartbeat(req: pb.HeartbeatRequest) -> None:
    if not (math.isfinite(req.throughput) and req.throughput >= 0):
        raise invalid(Reason.BAD_HEARTBEAT, "throughput must be a finite number >= 0")
    if not (math.isfinite(req.switch_s) and req.switch_s >= 0):
        raise invalid(Reason.BAD_HEARTBEAT, "switch_s must be a finite number of seconds >= 0")


def _whole(state: dict[str, torch.Tensor], max_bytes: int) -> Iterator[pb.ModelChunk]:
    return (pb.ModelChunk(part=p) for p in wire.state_parts(state, full_copy, max_bytes))


def mode_policy(cfg: RunConfig, swarm, downloads: ServedVersions, bases: TaskBases) -> FederatedMode | SwarmMode:
    """The run's mode policy: swarm when the run has a swarm (a SwarmContext), else federated."""
    return SwarmMode(swarm, bases) if swarm is not None else FederatedMode(cfg, downloads, bases)
