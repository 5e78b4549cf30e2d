"""`fedswarm client --role evaluator`: a host that only evaluates (an accelerator holding the eval data).

It joins like a client, is never sampled for training, and answers each round's TASK_EVALUATE with the loss of
that round's model on the held-out split of its --data (downloaded as deltas from the version it holds)."""
from __future__ import annotations

import logging

import torch

from fedswarm.client.daemon import ClientDaemon, Held
from fedswarm.lora import build_run_model
from fedswarm.models import trainable_state
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire

log = logging.getLogger("fedswarm.client")


class EvaluatorDaemon(ClientDaemon):
    role = "evaluator"

    def _setup(self, cfg: dict) -> None:
        """The run's model on this host's device; no training data, optimizer or upload codec."""
        self.run_cfg = cfg
        local = {**cfg, "model": getattr(self.args, "model", None) or cfg["model"]}  # this host's copy of the model
        model = build_run_model(local, self.device, load_in_4bit=getattr(self.args, "load_in_4bit", False))
        initial = trainable_state(model)   # the run's version 0, if the coordinator's digest agrees
        self.held = Held(0, initial, wire.state_digest(initial))
        self.model = model if getattr(model, "is_loaded_in_4bit", False) else model.to(self.device)

    def evaluation_model(self) -> torch.nn.Module:
        return self.model

    def train(self, task: pb.Task) -> None:
        log.error("round %d: an evaluator was sent a training task (%s); it does not train", task.round,
                  task.task_id[:12])
