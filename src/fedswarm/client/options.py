"""`fedswarm client`'s own options: each field is a flag, a key of a config file's [client] table and a row of
docs/SETTINGS.md (fedswarm.settings). The run's settings are not here: the coordinator sends them at join
(fedswarm.run_config.RunConfig); the data and model flags below only say how this host reads its copy."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from fedswarm import settings
from fedswarm.client.session import ClientTimeouts
from fedswarm.client.trainer import PRECISIONS
from fedswarm.formats import DataSpec
from fedswarm.run_config import RunConfig
from fedswarm.settings import opt
from fedswarm.swarm_settings import SPOT_PREFIX, SWARM_PREFIX, TRAINER_PREFIX, SpotChecks, SwarmTimeouts, TrainerTimeouts

ROLES = ("client", "evaluator", "peer", "trainer")


@dataclass
class ClientOptions:
    """This host's choices, whatever the run."""

    coordinator: str = opt(None, "HOST:PORT of the coordinator", required=True)
    data: str = opt("stdlib", "stdlib (the running Python's sources), a text file / folder, JSON Lines, Parquet, or a "
                              "datasets save_to_disk folder")
    model: str | None = opt(None, "this host's copy of the run's model folder (default: the path the coordinator "
                                  "names)", metavar="HF_DIR")
    format: str | None = opt(None, "records as documents (text) or prompt/response pairs (chat) (default: the run's)",
                             choices=("text", "chat"))
    text_field: str | None = opt(None, "record field holding the text (default: the run's)")
    prompt_field: str | None = opt(None, "chat: record field of the prompt (default: the run's)")
    response_field: str | None = opt(None, "chat: record field of the response (default: the run's)")
    cache_dir: str | None = opt(None, "where tokenized shards go when the data's folder is read-only "
                                      "(default: $FEDSWARM_CACHE or ~/.cache/fedswarm/tokens)")
    load_in_4bit: bool = opt(False, "QLoRA: hold the frozen base in 4 bits (bitsandbytes; CUDA clients of a --peft "
                                    "lora run)")
    gradient_checkpointing: bool = opt(False, "recompute each transformer block's activations in the backward pass "
                                              "instead of keeping them: far less memory for about a third more "
                                              "compute (clients and peers; this host's choice)")
    partition: str = opt("0/1", "I/N: this client's share of --data (0-based)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    precision: str = opt("auto", "auto: bf16 autocast on CPU and bf16 GPUs, else fp16 with a scaler",
                         choices=PRECISIONS)
    name: str = opt("", "name shown in status (default: host name + random suffix)")
    threads: int = opt(0, "torch CPU threads (0: this host's CPUs shared among the fedswarm processes running on "
                          "it, re-checked each round)")
    role: str = opt("client", "client: federated rounds; evaluator: only evaluate each round's model on --data's "
                              "held-out split (--evaluate clients/both; never sampled for training); peer: serve a "
                              "swarm pipeline stage; trainer: drive swarm micro-batches", choices=ROLES)
    inflight: int = opt(2, "trainer: micro-batches in flight at once")
    tls_ca: str | None = opt(None, "CA certificate (PEM) to verify a TLS coordinator", metavar="FILE")
    key: str | None = opt(None, "Ed25519 private key (PEM) proving this client's identity", metavar="FILE")
    p2p_host: str = opt("127.0.0.1", "swarm: address the hivemind node binds (default loopback; port 0/omitted: any "
                                     "free port)", metavar="IP[:PORT]")
    p2p_announce: str = opt("", "swarm: address other hosts dial when it differs from --p2p-host (NAT, containers)",
                            metavar="IP[:PORT]")
    metrics_port: int | None = opt(None, "serve Prometheus metrics at http://--metrics-host:PORT/metrics (0: a free "
                                         "port; default: off)", metavar="PORT")
    metrics_host: str = opt("127.0.0.1", "address the metrics endpoint binds")

    def local_run(self, run: RunConfig) -> RunConfig:
        """The run as this host builds it: its own copy of the model (--model) when it names one."""
        return replace(run, model=self.model) if self.model else run

    def data_spec(self, run: RunConfig) -> DataSpec:
        """This host's --data, read with the run's format and fields unless its own flags say otherwise."""
        return DataSpec.from_run(self.data, run, self.format, self.text_field, self.prompt_field, self.response_field)


@dataclass(frozen=True)
class ClientSettings:
    """Everything `fedswarm client` is told on its command line (or [client] table): its options and the waits
    of its session and roles."""

    options: ClientOptions
    timeouts: ClientTimeouts
    swarm: SwarmTimeouts          # peers and trainers
    trainer: TrainerTimeouts      # trainers
    spot_checks: SpotChecks       # trainers

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClientSettings":
        return cls(*(settings.from_args(kind, args, prefix=prefix) for kind, prefix in _PARTS))


_PARTS = ((ClientOptions, ""), (ClientTimeouts, ""), (SwarmTimeouts, SWARM_PREFIX), (TrainerTimeouts, TRAINER_PREFIX),
          (SpotChecks, SPOT_PREFIX))   # ClientSettings' fields, in order, with their dests' prefixes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag of `fedswarm client`."""
    for kind, prefix in _PARTS:
        settings.add_arguments(p, kind, prefix=prefix)
