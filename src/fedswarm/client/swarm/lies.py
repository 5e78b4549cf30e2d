"""FEDSWARM_LIE: a member peer that lies, to test and measure the swarm's defences (`fedswarm sim --liars`).

  corrupt:S       every forward output it sends gets Gaussian noise of S x its standard deviation (a last stage
                  reports its loss x (1 + S)); its own training stays honest
  nan_loss        as a chain's first stage: runs the chain, then answers a NaN loss
  blame_next      as a chain's first stage: answers at once that the next hop failed, naming it
  blame_replica   ... naming another replica of its own stage
  fabricate:L     ... answers a loss of L without calling the next stage
Several, comma-separated (blame_next,fabricate:0.05,corrupt): a chain head tells them in turn, one per chain,
serving an honest chain between two (so each lie costs it one short ban); corrupt, once its turn comes, lasts.
"""
from __future__ import annotations

import itertools
import logging
import math
import os

import torch

from fedswarm.proto import fedswarm_pb2 as pb

log = logging.getLogger(__name__)
KINDS = ("corrupt", "nan_loss", "blame_next", "blame_replica", "fabricate")


def _lie(spec: str) -> tuple[str, float]:
    kind, _, amount = spec.partition(":")
    try:
        value = float(amount) if amount else 1.0
    except ValueError:
        value = math.nan
    if kind not in KINDS or not math.isfinite(value):
        raise ValueError(f"FEDSWARM_LIE: {spec!r}: use corrupt:S, nan_loss, blame_next, blame_replica or "
                         "fabricate:LOSS (several: comma-separated)")
    return kind, value


def parse_lies(spec: str) -> list[tuple[str, float]]:
    return [_lie(part) for part in spec.split(",")]


class Liar:
    def __init__(self, lies: list[tuple[str, float]]):
        self.lies = lies
        self.kind, self.amount = lies[0]
        honest = [("honest", 0.0)] * (len(lies) > 1)
        self._turns = itertools.chain.from_iterable([lie, *honest] for lie in itertools.cycle(lies))

    @classmethod
    def from_env(cls) -> "Liar | None":
        spec = os.environ.get("FEDSWARM_LIE", "")
        return cls(parse_lies(spec)) if spec else None

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The forward output it sends (the true one unless it corrupts)."""
        if self.kind != "corrupt":
            return out
        out = out.detach().float()
        return out + self.amount * out.std() * torch.randn_like(out)

    def loss(self, loss: float) -> float:
        return loss * (1 + self.amount) if self.kind == "corrupt" else loss

    def instead_of_chain(self, stage: int, hops: list[str], me: str, replicas) -> pb.StageReply | None:
        """The reply a lying chain head sends without calling the next stage (None: it calls it)."""
        if stage != 0:
            return None
        if len(self.lies) > 1 and self.kind != "corrupt":
            self.kind, self.amount = next(self._turns)
        if self.kind not in ("corrupt", "honest"):
            log.warning("lying: %s (as peer %s)", self.kind, me)
        if self.kind == "blame_next":
            return pb.StageReply(failed_peer=hops[0], failed_reason="timeout: made up")
        if self.kind == "blame_replica":
            others = sorted(replicas)
            return pb.StageReply(failed_peer=others[0] if others else hops[0], failed_reason="timeout: made up")
        if self.kind == "fabricate":
            return pb.StageReply(loss=self.amount)
        return None

    def after_chain(self, stage: int, reply: pb.StageReply) -> pb.StageReply:
        if stage == 0 and self.kind == "nan_loss":
            reply.loss = math.nan
        return reply
