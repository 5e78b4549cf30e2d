"""What a federated client does with a task, apart from the connection: train on it, and encode the
result as the PushUpdate stream. Shared by the daemon (client/daemon.py) and the simulation's
virtual clients (sim/virtual.py), so both send exactly the same bytes for the same work."""
from __future__ import annotations

import json

import torch

from fedswarm.client.trainer import LocalTrainer, RoundResult
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.schedule import LrSchedule


def task_schedule(run_cfg: dict, config: dict) -> tuple[int, LrSchedule]:
    """(the round's first global step, the run's lr schedule) from the task's config."""
    total = int(config.get("total-steps", run_cfg["rounds"] * run_cfg["local_steps"]))
    return int(config.get("global-step", 0)), LrSchedule(
        float(config.get("lr", run_cfg["lr"])), max(total, 1), run_cfg.get("lr_schedule", "constant"),
        int(run_cfg.get("warmup_steps", 0)), float(run_cfg.get("min_lr", 0.0)))


def train_on_task(trainer: LocalTrainer, run_cfg: dict, task: pb.Task,
                  base: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], RoundResult]:
    """Run the task's local steps from `base`, each at the run's scheduled lr for its global step;
    returns (delta = new weights - base, the round's result)."""
    config = json.loads(task.config_json)
    mu = float(config.get("proximal-mu", 0.0))
    steps = int(config.get("local-steps", run_cfg["local_steps"]))
    first, schedule = task_schedule(run_cfg, config)
    result = trainer.train_round(base, steps, run_cfg.get("grad_accum", 1), proximal_mu=mu,
                                 lr_at=lambda i: schedule.lr_at(first + i))
    return {n: result.state[n] - base[n] for n in base}, result


def encode_delta(feedback: C.ErrorFeedback, delta: dict[str, torch.Tensor]) -> list[bytes]:
    """Compress each tensor with error feedback (moves the residuals) and cut it into serialized
    UpdateChunk parts, in the delta's order."""
    encoded = {n: feedback.compress(n, d)[0] for n, d in delta.items()}
    return [pb.UpdateChunk(part=p).SerializeToString()
            for n, d in delta.items() for p in wire.tensor_parts(n, tuple(d.shape), encoded[n])]


def update_stream(raw_parts: list[bytes], *, client_id: int, token: str, run_id: str, task: pb.Task,
                  num_tensors: int, num_examples: int, train_loss: float, seconds: float,
                  base_digest: bytes = b"", identity=None) -> list[bytes]:
    """The whole PushUpdate stream: a header (signed with `identity`, a client.identity.Identity, if
    given) and then the parts as they are (the coordinator hashes exactly those bytes)."""
    header = pb.UpdateHeader(client_id=client_id, session_token=token, task_id=task.task_id, round=task.round,
                             num_examples=num_examples, train_loss=train_loss, num_tensors=num_tensors,
                             num_parts=len(raw_parts), train_seconds=seconds, base_digest=base_digest)
    if identity is not None:
        header.signature = identity.sign_update(run_id, task.round, client_id, task.task_id,
                                                num_examples, train_loss, len(raw_parts), raw_parts)
    return [pb.UpdateChunk(header=header).SerializeToString()] + raw_parts
