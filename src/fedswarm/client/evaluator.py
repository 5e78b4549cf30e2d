"""`fedswarm client --role evaluator`: a host that only evaluates (an accelerator holding the eval data).

It joins like a client, is never sampled for training, and answers each round's TASK_EVALUATE with the loss of
that round's model on the held-out split of its --data (downloaded as deltas from the version it holds)."""
from __future__ import annotations

import logging

import torch

from fedswarm.client.daemon import FederatedRole
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.run_config import RunConfig

log = logging.getLogger("fedswarm.client")


class EvaluatorRole(FederatedRole):
    """A federated role that only evaluates: no training data, optimizer or upload codec."""

    name = "evaluator"

    def setup(self, cfg: RunConfig) -> None:
        """The run's model on this host's device."""
        self.run_cfg = cfg
        model = self.build_model(cfg)
        self.model = model if getattr(model, "is_loaded_in_4bit", False) else model.to(self.device)

    def evaluation_model(self) -> torch.nn.Module:
        return self.model

    def train(self, task: pb.Task) -> None:
        log.error("round %d: an evaluator was sent a training task (%s); it does not train", task.round,
                  task.task_id[:12])
