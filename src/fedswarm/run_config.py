"""The run contract: what every participant of a run must agree on. The coordinator stores it with the run and
sends it to each client at join (`JoinReply.run_config_json`); clients read it back with `RunConfig.from_json`.
Light on purpose (no torch at import): `fedswarm config` and `fedswarm status` import it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from fedswarm.errors import BadInput
from fedswarm.formats import check_format
from fedswarm.schedule import SCHEDULES, LrSchedule
from fedswarm.settings import opt

# The --strategy names; coordinator/strategies.py builds exactly these (checked when it is imported).
STRATEGY_NAMES = ("diloco", "fedadam", "fedavg", "fedavgm", "fedmedian", "fedprox", "fedtrimmedavg", "krum",
                  "sparseloco")
# Strategies whose aggregate is linear in the replies (a weighted mean of them): updates are folded.
MEAN_BASED = frozenset({"fedavg", "fedprox", "fedavgm", "fedadam", "diloco", "sparseloco"})
MODES = ("federated", "swarm")
SWARM_TRAFFIC = ("relayed", "chained")
ACTIVATION_CODECS = ("bf16", "fp16", "int8", "none")
EVALUATE = ("central", "clients", "both")
DP_MODES = ("central", "distributed")
PEFT_METHODS = ("none", "lora")
INNER_OPTIMIZERS = ("adamw", "muon")   # fedswarm.inner_optimizer builds exactly these


def _codecs() -> list[str]:
    from fedswarm.proto.codec import CODEC_NAMES   # torch: loaded only when the choices are asked for

    return [name for name in CODEC_NAMES if name != "masked"]   # masked: --secure-aggregation's own


@dataclass
class RunConfig:
    """What every participant must agree on; stored with the run and sent to clients. Each field is also a flag
    of `fedswarm coordinator` and `fedswarm sim` and a key of a config file's [run] table (fedswarm.settings)."""

    rounds: int = opt(5, "federated rounds (swarm: stage averagings) to run")
    min_clients: int = opt(2, "clients a round waits for and trains")
    strategy: str = opt("fedavg", "Flower strategy that aggregates the updates", choices=STRATEGY_NAMES)
    upload_codec: str = opt("int8", "how clients encode their update deltas", choices=_codecs)
    codec_block_size: int = opt(0, "values per scale block of the int codecs (0: the codec's default)")
    # the sparse codec (--upload-codec/--download-codec topk): chunk-wise top-k with low-bit values
    topk_chunk: int = opt(4096, "topk: values per chunk, each chunk keeping its largest by magnitude", metavar="N")
    topk_density: float = opt(1 / 64, "topk: fraction of each chunk's values sent (k = density x chunk, at least 1)",
                              metavar="D")
    download_topk_density: float = opt(0.0, "topk downloads: fraction of each chunk of the new model's delta "
                                            "sent (the mean of K clients' sparse updates has up to K x their "
                                            "values; 0: --topk-density)", metavar="D")
    topk_bits: int = opt(2, "topk: bits per sent value, 1, 2, 4 or 8 (a sign and a level of the chunk's scale)")
    client_momentum: float = opt(0.0, "clients take DiLoCo's Nesterov outer momentum on their own delta before "
                                      "the codec (with --strategy sparseloco: DiLoCo's outer step, its momentum "
                                      "inside the sparse uploads); 0: off", metavar="M")
    ef_decay: float = opt(1.0, "clients' error feedback: the residual carried into the next upload is scaled by "
                               "this (SparseLoCo's beta, 0.95; 1: all of it)", metavar="B")
    model: str = opt("gpt2-tiny", "preset (gpt2-tiny, gpt2-small8, llama-tiny, gpt2-124m), model config JSON or HF folder")
    local_steps: int = opt(40, "optimizer steps each client makes per round")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    batch_size: int = opt(16, "sequences per micro-batch")
    seq_len: int = opt(128, "tokens per sequence")
    # gpt2-tiny, 600 steps of 12 x 64: 3e-3 ends 21 % higher, cosine 3 % higher
    lr: float = opt(1e-3, "clients' local learning rate (AdamW's; Muon's matched to AdamW's update RMS)")
    inner_optimizer: str = opt("adamw", "clients' local optimizer: adamw, or muon (Muon on the hidden weight "
                                        "matrices, AdamW on embeddings, head, norms and biases: MuLoCo)",
                               choices=INNER_OPTIMIZERS)
    seed: int = opt(0, "seed of the initial model and the data sampling")
    proximal_mu: float = opt(0.01, "fedprox: weight of the proximal term")
    eval_data: str = opt("stdlib", "held-out data for centralized eval (stdlib or PATH)")
    eval_windows: int = opt(64, "held-out windows of --seq-len tokens each evaluation scores")
    # where each round's model is evaluated; either way off the critical path (the next round trains meanwhile)
    evaluate: str = opt("central", "central: the coordinator scores --eval-data; clients: sampled clients (or "
                                   "--role evaluator hosts, when any are connected) score their own held-out split "
                                   "through Flower's configure_evaluate/aggregate_evaluate; both: each round gets both",
                        choices=EVALUATE)
    fraction_evaluate: float = opt(1.0, "--evaluate clients/both: fraction of the connected evaluators (else "
                                        "clients) that evaluate each round (Flower's fraction_evaluate)", metavar="F")
    min_evaluate_nodes: int = opt(1, "--evaluate clients/both: at least this many evaluate each round (Flower's "
                                     "min_evaluate_nodes)", metavar="K")
    # swarm mode: pipeline stages served by peers, micro-batches driven by trainers
    mode: str = opt("federated", "federated rounds, or swarm pipelines (stage peers + trainers over hivemind)",
                    choices=MODES)
    stages: int = opt(3, "swarm: pipeline stages the model is cut into")
    average_every: int = opt(20, "swarm: replicas' optimizer steps between per-stage averages (one averaging = "
                                 "one round)")
    activation_codec: str = opt("bf16", "swarm: activations and their gradients on the wire",
                                choices=ACTIVATION_CODECS)
    swarm_traffic: str = opt("chained", "swarm: relayed (each stage's output returns to the trainer, which sends "
                                        "it on) or chained (each stage sends its output to the next stage's "
                                        "replica the trainer chose)", choices=SWARM_TRAFFIC)
    clip_update_norm: float = opt(0.0, "scale each update whose L2 norm exceeds C down to C (0: off)", metavar="C")
    max_update_norm_ratio: float = opt(10.0, "refuse (and count) an update whose L2 norm exceeds R x the median "
                                             "of recently accepted ones (before 3 are: R x the norm of the task's "
                                             "weights); 0: off", metavar="R")
    # fine-tuning: only adapters train and travel; the frozen base comes from --model on each side
    peft: str = opt("none", "lora: train (and send) only LoRA adapters on the frozen --model", choices=PEFT_METHODS)
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(16.0, "LoRA scale numerator (scale = alpha / r)")
    lora_targets: str = opt("", "comma-separated module names to adapt, or all-linear ('': peft's choice for "
                                "the architecture)")
    # how --data / --eval-data records are read (clients may override with their own flags)
    data_format: str = opt("text", "records as documents (text) or prompt/response pairs (chat: loss on the "
                                   "response only)", choices=("text", "chat"), flag="--format")
    text_field: str = opt("text", "JSON Lines / Parquet / datasets field holding the text")
    prompt_field: str = opt("prompt", "chat: record field of the prompt")
    response_field: str = opt("response", "chat: record field of the response (the only tokens with loss)")
    # learning-rate schedule over the run's global steps (rounds x local steps), applied by every client
    lr_schedule: str = opt("constant", "over the run's global steps (rounds x local steps); every client follows "
                                       "it", choices=SCHEDULES)
    warmup_steps: int = opt(0, "linear lr warm-up (global steps)")
    min_lr: float = opt(0.0, "cosine: the lr at the last step")
    download_codec: str = opt("int8", "model downloads: deltas from the version a client holds, in this codec",
                              choices=_codecs)
    # sampled rounds (federated): K clients per round and/or a fraction F of the connected ones
    clients_per_round: int = opt(0, "sample K of the connected clients each round (Flower's min_train_nodes); "
                                    "the others stay connected, long-polling (0: every client)", metavar="K")
    fraction: float = opt(0.0, "sample a fraction F of the connected clients each round, at least K (0: not set)",
                          metavar="F")
    # the coordinator's outer optimizer (fedavg, fedavgm, fedadam, diloco); None: the strategy's default
    server_lr: float | None = opt(None, "outer learning rate of fedavg/fedavgm/diloco (fedadam: eta); default: "
                                        "fedavg/fedavgm 1.0, fedadam 0.01, diloco 0.7")
    server_momentum: float | None = opt(None, "outer momentum (fedavgm: heavy ball, default 0.5; diloco: Nesterov, "
                                              "default 0.9; fedadam: beta_1, default 0.9)")

    # client-level differential privacy (DP-FedAvg; coordinator/privacy.py): clip, noise, account
    dp_clip: float = opt(0.0, "client-level DP: clip each client's update (its delta) to this L2 norm; 0: DP off",
                         metavar="C")
    dp_noise_multiplier: float = opt(0.0, "DP: Gaussian noise of std z x C on the sum of the clipped updates (the "
                                          "mean gets z x C / K); 0: clipping only, no guarantee", metavar="Z")
    dp_delta: float = opt(0.0, "DP: the delta epsilon is reported at; 0: 1/N^2, N = max(--min-clients, "
                               "--clients-per-round), the clients a round waits for", metavar="D")
    dp_mode: str = opt("central", "DP: central (the coordinator clips each upload and noises the mean) or "
                                  "distributed (each client clips its delta and adds noise of std z x C / sqrt(K) "
                                  "before the codec; the sum carries z x C)", choices=DP_MODES)
    dp_max_epsilon: float = opt(0.0, "DP: end the run (state done, end_reason privacy_budget) before a round that "
                                     "would push epsilon past E; 0: no limit", metavar="E")
    dp_adaptive_clip: bool = opt(False, "DP (central): adapt the clip norm each round toward the "
                                        "--dp-target-quantile of the updates' norms (Andrew et al. 2021), starting "
                                        "at --dp-clip; the count of unclipped updates is noised too")
    dp_target_quantile: float = opt(0.5, "DP adaptive clipping: the fraction of updates the clip norm should leave "
                                         "unclipped", metavar="Q")
    dp_clip_lr: float = opt(0.2, "DP adaptive clipping: the clip norm's geometric learning rate", metavar="ETA")
    dp_clipped_count_stddev: float = opt(0.0, "DP adaptive clipping: noise std on the count of unclipped updates; "
                                              "0: K / 20 (Flower's default); it must exceed z / 2", metavar="S")
    # secure aggregation (SecAgg+; fedswarm/secagg.py): the coordinator holds only masked vectors and their sum
    secure_aggregation: bool = opt(False, "SecAgg+: clients mask their quantized updates with pairwise masks and "
                                          "Shamir-shared seeds, so the coordinator sees only the round's sum "
                                          "(mean-based strategies only; uploads are 32-bit masked integers; "
                                          "--max-update-norm-ratio does not apply)")
    secagg_clip: float = opt(0.0, "secure aggregation: each update coordinate is clipped to [-R, R] and quantized "
                                  "to 2^22 levels (R / 2^21 apart); 0: --dp-clip if set, else 1.0", metavar="R")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        """The run config a coordinator sent or stored. Keys it lacks keep their defaults (an older coordinator);
        keys this version does not know are refused (BadInput): a newer coordinator asks for what this side
        cannot do."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise BadInput(f"the run config must be a JSON object, not {type(raw).__name__}")
        unknown = sorted(set(raw) - _FIELDS)
        if unknown:
            raise BadInput(f"the run config has settings this fedswarm does not know ({', '.join(unknown)}): "
                           f"install the coordinator's fedswarm version here")
        return cls(**raw)

    @classmethod
    def from_status(cls, status: dict) -> "RunConfig":
        """The run config in a Status reply, for display: keys this version does not know are left out (a viewer
        shows a newer coordinator what it can; it runs nothing)."""
        return cls(**{k: v for k, v in status["config"].items() if k in _FIELDS})

    def check(self) -> None:
        """Raise ValueError on settings that cannot run."""
        from fedswarm.proto.codec import codec_by_name   # these three load torch
        from fedswarm.models import check_tokenizer_fits
        from fedswarm.tokenizer import is_hf_folder

        if self.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if self.min_clients < 1:
            raise ValueError("--min-clients must be >= 1")
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"--strategy {self.strategy!r}: choose one of {sorted(STRATEGY_NAMES)}")
        codec_by_name(self.upload_codec)
        codec_by_name(self.download_codec)
        self._check_topk()
        for name in ("local_steps", "grad_accum", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.mode not in MODES:
            raise ValueError("--mode must be federated or swarm")
        self._check_evaluate()
        if self.mode == "swarm":
            from fedswarm.stages import num_layers_of

            if not 1 <= self.stages <= num_layers_of(self.model):
                raise ValueError(f"--stages must be 1..{num_layers_of(self.model)} for {self.model}")
            if self.activation_codec not in ACTIVATION_CODECS:
                raise ValueError("--activation-codec must be fp16, bf16, int8 or none")
            if self.swarm_traffic not in SWARM_TRAFFIC:
                raise ValueError(f"--swarm-traffic must be one of {', '.join(SWARM_TRAFFIC)}")
            if self.average_every < 1:
                raise ValueError("--average-every must be >= 1")
        if not (self.clip_update_norm >= 0 and self.clip_update_norm < float("inf")):
            raise ValueError("--clip-update-norm must be a finite number >= 0")
        if not (self.max_update_norm_ratio == 0 or 1 <= self.max_update_norm_ratio < float("inf")):
            raise ValueError("--max-update-norm-ratio must be 0 (off) or a finite number >= 1")
        if not 0 < self.lr < 1:
            raise ValueError("--lr must be in (0, 1)")
        if self.clients_per_round < 0:
            raise ValueError("--clients-per-round must be >= 0 (0: every connected client)")
        self._check_peft()
        self._check_inner_optimizer()
        check_format(self.data_format)
        if is_hf_folder(self.model):
            check_tokenizer_fits(self.model)
        LrSchedule(self.lr, self.rounds * self.local_steps, self.lr_schedule, self.warmup_steps, self.min_lr)
        if not 0 <= self.fraction <= 1:
            raise ValueError("--fraction must be in [0, 1] (0: not set)")
        if self.mode == "swarm" and (self.clients_per_round or self.fraction):
            raise ValueError("--clients-per-round / --fraction apply to federated rounds; a swarm averages every replica")
        if self.server_lr is not None and not 0 < self.server_lr <= 10:
            raise ValueError("--server-lr must be in (0, 10]")
        if self.server_momentum is not None and not 0 <= self.server_momentum < 1:
            raise ValueError("--server-momentum must be in [0, 1)")
        self._check_privacy()
        self._check_secure_aggregation()
        if self.strategy == "sparseloco" and self.server_momentum:
            raise ValueError("--strategy sparseloco has no outer momentum (the clients' error feedback, --ef-decay, "
                             "takes its place); use diloco for an outer Nesterov step")

    def _check_topk(self) -> None:
        from fedswarm.proto import topk

        if not topk.MIN_CHUNK <= self.topk_chunk <= topk.MAX_CHUNK:
            raise ValueError(f"--topk-chunk must be in [{topk.MIN_CHUNK}, {topk.MAX_CHUNK}]")
        if not 0 < self.topk_density <= 1:
            raise ValueError("--topk-density must be in (0, 1]")
        if not 0 <= self.download_topk_density <= 1:
            raise ValueError("--download-topk-density must be in [0, 1] (0: --topk-density)")
        if self.topk_bits not in topk.BITS:
            raise ValueError(f"--topk-bits must be one of {', '.join(map(str, topk.BITS))}")
        if not 0 <= self.ef_decay <= 1:
            raise ValueError("--ef-decay must be in [0, 1]")
        if not 0 <= self.client_momentum < 1:
            raise ValueError("--client-momentum must be in [0, 1)")

    def _check_peft(self) -> None:
        if self.peft not in PEFT_METHODS:
            raise ValueError(f"--peft {self.peft!r}: choose one of {PEFT_METHODS}")
        if self.peft == "lora" and (self.lora_r < 1 or self.lora_alpha <= 0):
            raise ValueError("--lora-r must be >= 1 and --lora-alpha > 0")

    def _check_inner_optimizer(self) -> None:
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"--inner-optimizer {self.inner_optimizer!r}: choose one of {INNER_OPTIMIZERS}")
        if self.inner_optimizer == "muon" and self.mode == "swarm":
            raise ValueError("--inner-optimizer muon applies to federated rounds; swarm peers train their stage "
                             "with AdamW: drop --inner-optimizer or use --mode federated")
        if self.inner_optimizer == "muon" and self.peft != "none":
            raise ValueError("--inner-optimizer muon trains full weight matrices; LoRA adapters train with AdamW: "
                             "drop --inner-optimizer muon or --peft")

    def _check_privacy(self) -> None:
        numbers = {"--dp-clip": self.dp_clip, "--dp-noise-multiplier": self.dp_noise_multiplier,
                   "--dp-max-epsilon": self.dp_max_epsilon}
        for flag, value in numbers.items():
            if not 0 <= value < float("inf"):
                raise ValueError(f"{flag} must be a finite number >= 0")
        if not 0 <= self.dp_delta < 1:
            raise ValueError("--dp-delta must be in [0, 1) (0: 1/N^2)")
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"--dp-mode must be one of {', '.join(DP_MODES)}")
        if not self.dp_clip:
            if self.dp_noise_multiplier or self.dp_max_epsilon or self.dp_delta or self.dp_mode != "central":
                raise ValueError("--dp-noise-multiplier, --dp-delta, --dp-mode and --dp-max-epsilon need --dp-clip C "
                                 "(the L2 norm each client's update is clipped to)")
            return
        if self.dp_max_epsilon and not self.dp_noise_multiplier:
            raise ValueError("--dp-max-epsilon needs --dp-noise-multiplier > 0 (without noise epsilon is infinite)")
        if self.mode == "swarm":
            raise ValueError("--dp-clip applies to federated rounds (client-level DP); a swarm averages stage replicas")
        if self.strategy not in MEAN_BASED:
            raise ValueError(f"--dp-clip: --strategy {self.strategy} does not average, and DP's noise is sized for a "
                             f"mean (one client moves it by at most C/K): use one of {', '.join(sorted(MEAN_BASED))}")
        if self.fraction:
            raise ValueError("--dp-clip with --fraction: the sampling rate would change with who is connected; "
                             "use --clients-per-round K (sampling rate K/N)")
        if max(self.min_clients, self.clients_per_round) < 2:
            raise ValueError("client-level DP needs --min-clients (or --clients-per-round) >= 2")
        self._check_adaptive_clip()
        checks_norms = self.max_update_norm_ratio and not self.secure_aggregation   # masked: no norm to check
        if self.dp_mode == "distributed" and (self.clip_update_norm or checks_norms):
            raise ValueError("--dp-mode distributed: every update carries noise of norm about z C sqrt(parameters "
                             "/ K), which --clip-update-norm and --max-update-norm-ratio would cut or refuse: set both "
                             "to 0, or use --dp-mode central")

    def _check_secure_aggregation(self) -> None:
        if "masked" in (self.upload_codec, self.download_codec):
            raise ValueError("the masked codec is --secure-aggregation's own: pick another --upload-codec and "
                             "--download-codec (downloads are never masked)")
        if not self.secure_aggregation:
            if self.secagg_clip:
                raise ValueError("--secagg-clip needs --secure-aggregation")
            return
        why = self.secure_aggregation_conflict()
        if why:
            raise ValueError(f"--secure-aggregation: {why}")
        if not 0 <= self.secagg_clip < float("inf"):
            raise ValueError("--secagg-clip must be a finite number >= 0 (0: --dp-clip, else 1.0)")

    def secure_aggregation_conflict(self) -> str:
        """Why this run cannot use secure aggregation ('' if it can)."""
        if self.mode == "swarm":
            return "it masks federated updates; a swarm averages stage replicas: use --mode federated"
        if self.strategy not in MEAN_BASED:
            return (f"--strategy {self.strategy} needs every client's update, and the coordinator sees only their "
                    f"sum: use one of {', '.join(sorted(MEAN_BASED - {'sparseloco'}))}")
        if self.strategy == "sparseloco" or self.client_momentum:
            return ("sparseloco and --client-momentum work in the upload codec's error feedback, and masked uploads "
                    "bypass the codec: use --strategy diloco (outer momentum on the coordinator) or fedavg")
        if self.clip_update_norm:
            return "--clip-update-norm clips each update at the coordinator, which cannot see one: set it to 0"
        if self.dp_clip and self.dp_mode == "central":
            return "central DP clips each update at the coordinator, which cannot see one: use --dp-mode distributed"
        if (self.clients_per_round or self.min_clients) < 3:
            return ("a sum of fewer than 3 updates would reveal them: at least 3 clients a round (--min-clients or "
                    "--clients-per-round; fedswarm sim: --clients)")
        return ""

    def masking_range(self) -> float:
        """Secure aggregation's per-coordinate clip R: --secagg-clip, else --dp-clip (a delta of norm C has no
        coordinate above C), else 1.0."""
        return self.secagg_clip or self.dp_clip or 1.0

    def _check_adaptive_clip(self) -> None:
        if not self.dp_adaptive_clip:
            return
        if self.dp_mode != "central":
            raise ValueError("--dp-adaptive-clip adapts the norm the coordinator clips to: use --dp-mode central")
        if not 0 <= self.dp_target_quantile <= 1 or not 0 < self.dp_clip_lr < float("inf"):
            raise ValueError("--dp-target-quantile must be in [0, 1] and --dp-clip-lr a finite number > 0")
        if not 0 <= self.dp_clipped_count_stddev < float("inf"):
            raise ValueError("--dp-clipped-count-stddev must be a finite number >= 0 (0: K / 20)")
        k = self.clients_per_round or self.min_clients   # K, the updates a round aggregates (dp.per_round)
        count_std = self.dp_clipped_count_stddev or k / 20
        if self.dp_noise_multiplier and self.dp_noise_multiplier >= 2 * count_std:
            raise ValueError(f"--dp-adaptive-clip: the count's noise ({count_std:g}) must exceed --dp-noise-multiplier"
                             f" / 2 = {self.dp_noise_multiplier / 2:g}, since both share the noise budget: raise "
                             f"--dp-clipped-count-stddev above {self.dp_noise_multiplier / 2:g}, or sample more "
                             f"clients a round (its default is K / 20 = {k / 20:g})")

    def _check_evaluate(self) -> None:
        if self.evaluate not in EVALUATE:
            raise ValueError(f"--evaluate must be one of {', '.join(EVALUATE)}")
        if self.mode == "swarm" and self.evaluate != "central":
            raise ValueError("--evaluate clients/both applies to federated rounds; a swarm is evaluated centrally")
        if not 0 < self.fraction_evaluate <= 1:
            raise ValueError("--fraction-evaluate must be in (0, 1]")
        if self.min_evaluate_nodes < 1:
            raise ValueError("--min-evaluate-nodes must be >= 1")
        if self.eval_windows < 1:
            raise ValueError("--eval-windows must be >= 1")


_FIELDS = frozenset(f.name for f in fields(RunConfig))
