"""The run's configuration (sent to every client at join) and the coordinator's own timeouts."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


SWARM_TRAFFIC = ("relayed", "chained")


@dataclass
class RunConfig:
    """What every participant must agree on; stored with the run and sent to clients."""

    rounds: int = 5
    min_clients: int = 2
    strategy: str = "fedavg"
    upload_codec: str = "int8"
    codec_block_size: int = 0          # 0: the codec's default
    model: str = "gpt2-tiny"
    local_steps: int = 40
    grad_accum: int = 1
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 0
    proximal_mu: float = 0.01          # FedProx only
    eval_data: str = "stdlib"
    eval_windows: int = 64
    # swarm mode (--mode swarm): pipeline stages served by peers, micro-batches driven by trainers
    mode: str = "federated"
    stages: int = 3
    average_every: int = 20            # replicas' optimizer steps between stage averages
    activation_codec: str = "bf16"     # activations and their gradients on the swarm wire
    swarm_traffic: str = "relayed"     # relayed: every hop through the trainer; chained: stage to stage
    clip_update_norm: float = 0.0      # > 0: updates with a larger L2 norm are scaled down to it

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def check(self) -> None:
        """Raise ValueError on settings that cannot run."""
        from fedswarm.coordinator.strategies import STRATEGIES
        from fedswarm.proto.codec import codec_by_name

        if self.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if self.min_clients < 1:
            raise ValueError("--min-clients must be >= 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy {self.strategy!r}: choose one of {sorted(STRATEGIES)}")
        codec_by_name(self.upload_codec)
        for name in ("local_steps", "grad_accum", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.mode not in ("federated", "swarm"):
            raise ValueError("--mode must be federated or swarm")
        if self.mode == "swarm":
            from fedswarm.stages import num_layers_of

            if not 1 <= self.stages <= num_layers_of(self.model):
                raise ValueError(f"--stages must be 1..{num_layers_of(self.model)} for {self.model}")
            if self.activation_codec not in ("fp16", "bf16", "int8", "none"):
                raise ValueError("--activation-codec must be fp16, bf16, int8 or none")
            if self.swarm_traffic not in SWARM_TRAFFIC:
                raise ValueError(f"--swarm-traffic must be one of {', '.join(SWARM_TRAFFIC)}")
            if self.average_every < 1:
                raise ValueError("--average-every must be >= 1")
        if not (self.clip_update_norm >= 0 and self.clip_update_norm < float("inf")):
            raise ValueError("--clip-update-norm must be a finite number >= 0")
        if not 0 < self.lr < 1:
            raise ValueError("--lr must be in (0, 1)")


@dataclass
class CoordinatorTimeouts:
    """Every wait the coordinator does, named."""

    lease_s: float = 15.0              # a client silent this long is dropped (its open tasks fail)
    heartbeat_interval_s: float = 2.0  # what clients are told to use
    round_timeout_s: float = 600.0     # replies not in by then count as failures
    max_pull_wait_s: float = 30.0      # upper bound on a PullTask long-poll
    reaper_interval_s: float = 1.0     # how often leases are checked
    failed_round_backoff_s: float = 1.0       # wait before repeating a round with no usable reply (doubles) ...
    failed_round_backoff_max_s: float = 60.0  # ... up to this
    max_failed_rounds: int = 10        # rounds in a row with no usable reply before the run fails (0: never)
