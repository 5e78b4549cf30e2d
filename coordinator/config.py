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
    lr: float = 1e-3                   # gpt2-tiny, 600 steps of 12 x 64: 3e-3 ends 21 % higher, cosine 3 % higher
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
    # fine-tuning (--peft lora): only adapters train and travel; the frozen base comes from --model on each side
    peft: str = "none"                 # none | lora
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = ""             # comma-separated module names ("": peft's default for the architecture)
    # how --data / --eval-data records are read (clients may override with their own flags)
    data_format: str = "text"          # text | chat
    text_field: str = "text"           # JSON Lines / Parquet / datasets column holding the text
    prompt_field: str = "prompt"       # chat: the user's turn
    response_field: str = "response"   # chat: the assistant's turn (the only tokens with loss)
    # learning-rate schedule over the run's global steps (rounds x local steps), applied by every client
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    # downloads: codec-encoded deltas from the version a client holds (full float32 copy when it holds none)
    download_codec: str = "int8"
    # sampled rounds (federated): K clients per round and/or a fraction F of the connected ones
    clients_per_round: int = 0         # 0: no fixed K
    fraction: float = 0.0              # 0: no fraction (every client when K is 0 too)
    # the coordinator's outer optimizer (fedavg, fedavgm, fedadam, diloco); None: the strategy's default
    server_lr: float | None = None
    server_momentum: float | None = None

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
        codec_by_name(self.download_codec)
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
        if self.clients_per_round < 0:
            raise ValueError("--clients-per-round must be >= 0 (0: every connected client)")
        from fedswarm.formats import check_format
        from fedswarm.lora import check_peft_settings
        from fedswarm.models import check_tokenizer_fits
        from fedswarm.tokenizer import is_hf_folder

        check_peft_settings(self.peft, self.lora_r, self.lora_alpha, load_in_4bit=False)
        check_format(self.data_format)
        if self.peft != "none" and self.mode == "swarm":
            raise ValueError("--peft lora runs in federated mode only for now: drop --mode swarm or --peft")
        if is_hf_folder(self.model):
            check_tokenizer_fits(self.model)
        from fedswarm.schedule import LrSchedule

        LrSchedule(self.lr, self.rounds * self.local_steps, self.lr_schedule, self.warmup_steps, self.min_lr)
        if not 0 <= self.fraction <= 1:
            raise ValueError("--fraction must be in [0, 1] (0: not set)")
        if self.mode == "swarm" and (self.clients_per_round or self.fraction):
            raise ValueError("--clients-per-round / --fraction apply to federated rounds; a swarm averages every replica")
        if self.server_lr is not None and not 0 < self.server_lr <= 10:
            raise ValueError("--server-lr must be in (0, 10]")
        if self.server_momentum is not None and not 0 <= self.server_momentum < 1:
            raise ValueError("--server-momentum must be in [0, 1)")


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
