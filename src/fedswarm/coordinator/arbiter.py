"""The coordinator settles a spot check that the only two replicas of a stage dispute: it re-runs the stage on
its own copy of the committed average both ran on (the current one or a kept checkpoint's, found by the
weights version, wire.state_digest of its bf16 copy) and convicts the replica its own output contradicts."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from fedswarm import receipts as R
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire

IGNORE_INDEX = -100   # a label without loss (chat data), as the last stage takes it


class StageArbiter:
    """`current(stage)`: the stage's latest average (None before the run loaded it); `kept(names)`: those
    tensors of each kept checkpoint, newest first (Store.kept_tensors). One re-run at a time."""

    def __init__(self, cfg, current: Callable[[int], dict | None], kept: Callable[[list[str]], Iterator[dict]]):
        self.cfg, self.current, self.kept = cfg, current, kept
        self._busy = threading.Lock()

    def judge(self, run_id: str, report: pb.LyingReport) -> str:
        """The peer id this coordinator's own re-run convicts; BadReceipt unless the evidence settles it."""
        signers = R.check_dispute(run_id, report)
        with self._busy:   # a trainer sends each pair's dispute once: settle it, even if another one is running
            state = self._state_at(report.stage, report.receipts[0].weights_version)
            return signers[R.settle(report.receipts, self._rerun(report.stage, state, report.request))]

    def _state_at(self, stage: int, version: bytes) -> dict[str, torch.Tensor]:
        """The stage's average whose bf16 copy has digest `version`, as the replicas ran it (bf16 values)."""
        latest = self.current(stage)
        if latest is None:
            raise R.BadReceipt("the coordinator has not loaded the stages yet")
        for state in (latest, *self.kept(sorted(latest))):
            base = {n: t.to(torch.bfloat16) for n, t in state.items()}
            if wire.state_digest(base) == version:
                return base
        raise R.BadReceipt(f"the coordinator keeps no average of stage {stage} at that weights version")

    def _rerun(self, stage: int, base: dict[str, torch.Tensor], req: pb.StageRequest) -> torch.Tensor:
        """The stage's output for `req` on `base` (the last stage: its loss), as a spot check computes it."""
        from fedswarm.stage_lora import build_lora_stage
        from fedswarm.stages import build_stage

        state = {n: t.float() for n, t in base.items()}
        module = (build_lora_stage(self.cfg, stage, state) if self.cfg.peft == "lora"
                  else build_stage(self.cfg.model, stage, self.cfg.stages, state=state)).eval()
        x, labels = self._inputs(module, req)
        with torch.no_grad():
            if module.is_last:
                return torch.tensor([float(module(x, labels))], dtype=torch.float64)
            return module(x).double()

    def _inputs(self, module, req: pb.StageRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The disputed input, within the run's micro-batch (batch x seq_len x hidden) and vocabulary."""
        batch, length, vocab = self.cfg.batch_size, self.cfg.seq_len, module.config.vocab_size
        if module.is_first:
            shape = tuple(req.ids_shape)
            x = _ids(req.ids, shape, batch, length, vocab)
        else:
            x = R.activation(req.hidden, "the disputed input").float()
            shape = tuple(x.shape)
            if len(shape) != 3 or not (shape[0] <= batch and shape[1] <= length
                                       and shape[2] == module.config.hidden_size) or not torch.isfinite(x).all():
                raise R.BadReceipt(f"the disputed input's shape {shape[:8]} is not this run's, or not finite")
        labels = _ids(req.labels, shape[:2], batch, length, vocab, labels=True) if module.is_last else None
        return x, labels


def _ids(data: bytes, shape: tuple, batch: int, length: int, vocab: int, labels: bool = False) -> torch.Tensor:
    if len(shape) != 2 or not (1 <= shape[0] <= batch and 1 <= shape[1] <= length) \
            or len(data) != 4 * shape[0] * shape[1]:
        raise R.BadReceipt(f"disputed token ids of shape {shape[:8]}: not this run's micro-batch")
    ids = torch.from_numpy(np.frombuffer(data, dtype="<i4").astype(np.int64)).view(shape)
    valid = (ids >= 0) & (ids < vocab)
    if labels:
        valid |= ids == IGNORE_INDEX
    if not bool(valid.all()):
        raise R.BadReceipt("disputed token ids outside the vocabulary")
    return ids
