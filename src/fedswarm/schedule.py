"""Learning-rate schedules over a run's global optimizer steps (rounds x local steps)."""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LrSchedule:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to `min_lr` at `total_steps`."""

    base_lr: float
    total_steps: int
    kind: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"--lr-schedule {self.kind!r}: choose one of {', '.join(SCHEDULES)}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("total steps must be >= 1 and --warmup-steps >= 0")
        if not 0 <= self.min_lr <= self.base_lr:
            raise ValueError(f"--min-lr {self.min_lr} must be in [0, --lr {self.base_lr}]")

    def lr_at(self, step: int) -> float:
        """The lr of global optimizer step `step` (0-based); steps past the end keep the final lr."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
