"""`fedswarm client`: connect out to the coordinator, train on local data, upload compressed deltas."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import socket
import sys
import time
from dataclasses import dataclass

import grpc
import torch

from fedswarm import tokenized
from fedswarm.client import work
from fedswarm.client.identity import Identity
from fedswarm.client.options import ClientOptions, ClientSettings
from fedswarm.client.options import add_arguments as add_client_arguments
from fedswarm.client.preflight import check_options
from fedswarm.client.secagg_client import SecAggClient
from fedswarm.client.session import ClientTimeouts, JoinRefused, Session, SessionReplaced
from fedswarm.client.trainer import LocalTrainer, resolve_device, resolve_precision
from fedswarm.data import BatchSampler, parse_partition
from fedswarm.errors import BadInput, one_line
from fedswarm.lora import build_run_model
from fedswarm.models import trainable_state
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import refusals, signing, wire
from fedswarm.progress import Progress, setup_logging
from fedswarm.run_config import RunConfig
from fedswarm.secagg import SecAggError
from fedswarm.threads import BUDGET

log = logging.getLogger("fedswarm.client")
__all__ = ["ClientTimeouts", "FederatedRole", "Host", "RoleBase", "open_session"]   # ClientTimeouts: session.py's


@dataclass
class Host:
    """This host's side of any role: its name, device, precision, share of --data and key."""

    name: str
    device: torch.device
    precision: str
    index: int
    num_partitions: int
    identity: Identity | None

    @classmethod
    def of(cls, options: ClientOptions) -> "Host":
        device = resolve_device(options.device)
        if options.load_in_4bit and device.type != "cuda":
            raise ValueError(f"--load-in-4bit (QLoRA) needs a CUDA device, and this client trains on {device}: "
                             f"drop --load-in-4bit here (the run's LoRA adapters train on a full-precision base), "
                             f"or run this client on a GPU host with --device cuda")
        return cls(options.name or f"{socket.gethostname()}-{random.randrange(1 << 16):04x}", device,
                   resolve_precision(options.precision, device), *parse_partition(options.partition),
                   Identity.load(options.key) if options.key else None)


class RoleBase:
    """What every role shares: its host, the run config, no-op hooks, and the setup pieces they combine."""

    name = "client"
    p2p_peer_id = ""

    def __init__(self, settings: ClientSettings, host: Host | None = None):
        self.settings, self.options = settings, settings.options
        self.host = host or Host.of(self.options)
        self.device, self.precision = self.host.device, self.host.precision
        self.session: Session | None = None   # set by the Session this role is composed onto
        self.run_cfg: RunConfig | None = None
        self.metrics = None   # fedswarm.metrics.ClientMetrics with --metrics-port
        self.console = None   # a rich Console on a terminal: training shows a rounds bar on it

    def setup(self, cfg: RunConfig) -> None:
        self.run_cfg = cfg

    def on_task(self, task: pb.Task) -> None:
        log.error("round %d: a %s was sent a task it does not run (kind %d, %s)", task.round, self.name, task.kind,
                  task.task_id[:12])

    def heartbeat_fields(self) -> dict:
        return {}

    def on_heartbeat(self, reply: pb.HeartbeatReply) -> None:
        """A swarm peer switches stage, a trainer applies the roster."""

    def run(self) -> int:
        return self.session.serve_tasks()

    def close(self) -> None:
        pass

    # -- setup pieces --------------------------------------------------------------------
    def build_model(self, cfg: RunConfig) -> torch.nn.Module:
        """The run's model on this host (its own copy with --model); its weights are the run's version 0 (held)."""
        model = build_run_model(self.options.local_run(cfg), self.device, load_in_4bit=self.options.load_in_4bit)
        initial = trainable_state(model)   # the run's version 0, if the coordinator's digest agrees
        self.held = Held(0, initial, wire.state_digest(initial))
        return model

    def sampler(self, cfg: RunConfig, salt: str) -> BatchSampler:
        """Batches of this host's share of --data, drawn with a seed of the run's seed and `salt`."""
        tokens = tokenized.client_tokens(self.options.data_spec(cfg), self.options.local_run(cfg).model,
                                         self.host.index, self.host.num_partitions, self.options.cache_dir)
        seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}/{salt}".encode()).digest()[:4], "little")
        return tokenized.sampler(tokens, cfg.seq_len, cfg.batch_size, seed)

    def start_uploads(self, cfg: RunConfig) -> None:
        """The run's upload codec and this role's error feedback (residuals kept across uploads)."""
        self.codec = C.codec_by_name(cfg.upload_codec)
        self.feedback = C.ErrorFeedback.for_run(cfg)


def open_session(role: RoleBase, timeouts: ClientTimeouts | None = None) -> Session:
    """The role composed onto a session with the coordinator of its --coordinator."""
    host, options = role.host, role.options
    return Session(options.coordinator, host.name, role, timeouts=timeouts or role.settings.timeouts,
                   device=str(host.device), precision=host.precision, identity=host.identity, tls_ca=options.tls_ca)


class FederatedRole(RoleBase):
    """`--role client`: trains the whole model (or its adapters) on this host's data each round it is sampled."""

    name = "client"

    def __init__(self, settings: ClientSettings, host: Host | None = None):
        super().__init__(settings, host)
        self._rounds_bar = None
        self.trainer: LocalTrainer | None = None
        self.feedback: C.ErrorFeedback | None = None
        self.held: Held | None = None   # the global version this client holds (delta downloads start from it)
        self.secagg = SecAggClient()    # --secure-aggregation: this client's side of each round's protocol

    def setup(self, cfg: RunConfig) -> None:
        self.run_cfg = cfg
        sampler = self.sampler(cfg, f"{self.host.index}/{self.host.num_partitions}")
        model = self.build_model(cfg)
        self.trainer = LocalTrainer(model, sampler, self.device, self.precision, lr=cfg.lr,
                                    gradient_checkpointing=self.options.gradient_checkpointing,
                                    inner_optimizer=cfg.inner_optimizer)
        self.start_uploads(cfg)

    def on_task(self, task: pb.Task) -> None:
        if task.kind == pb.TASK_TRAIN:
            self.train(task)
        elif task.kind == pb.TASK_EVALUATE:
            self.evaluate(task)
        elif task.kind == pb.TASK_SECAGG:
            self.secagg_stage(task)

    def secagg_stage(self, task: pb.Task) -> None:
        """Answer a secure-aggregation stage (client/secagg_client.py); a protocol error sits the round out."""
        s = self.session
        try:
            reply = self.secagg.answer(s.creds.client_id, task)
        except SecAggError as err:
            log.error("round %d: secure aggregation: %s", task.round, err)
            return
        c = s.creds
        reply.client_id, reply.session_token = c.client_id, c.token
        if s.identity is not None:   # signed as updates are
            reply.signature = s.identity.key.sign(signing.update_message(
                c.run_id, task.round, c.client_id, task.task_id, signing.secagg_digest(reply)))
        s.with_retry("secure-aggregation answer", lambda: s.stub.PushSecAgg(reply, timeout=s.t.rpc_s))

    def close(self) -> None:
        if self._rounds_bar is not None:
            self._rounds_bar.close()

    def evaluate(self, task: pb.Task) -> None:
        """Score the task's model (downloaded as for training: deltas from the version held) on this client's
        held-out split, and answer with the loss and the tokens it averages."""
        BUDGET.refresh()
        base = self.fetch_global(task.task_id)
        try:
            if getattr(self, "_held_out", None) is None:   # tokenized once, on the first evaluation asked for
                self._held_out = work.held_out_windows(self.options, self.run_cfg)
        except ValueError as err:   # e.g. --data too small for a held-out split: say so rather than go silent
            log.error("round %d: cannot evaluate: %s", task.round, err)
            outcome, error = work.EvalOutcome(0.0, 0, 0.0), str(err)[:500]
        else:
            outcome, error = work.evaluate_on_task(self.evaluation_model(), self._held_out, base), ""
        s, c = self.session, self.session.creds
        req = work.eval_result(outcome, client_id=c.client_id, token=c.token, run_id=c.run_id, task=task,
                               base_digest=self.held.digest, identity=s.identity, error=error)
        s.with_retry("evaluation result", lambda: s.stub.PushEval(req, timeout=s.t.rpc_s))
        if not error:
            log.info("round %d: eval loss %.4f on %d held-out tokens in %.1f s", task.round, outcome.loss,
                     outcome.tokens, outcome.seconds)

    def evaluation_model(self) -> torch.nn.Module:
        """The model an evaluation loads the task's weights into (the trainer's: its optimizer state is apart)."""
        return self.trainer.model

    def train(self, task: pb.Task) -> None:
        BUDGET.refresh()   # other fedswarm processes may have started beside us since the last round
        if self.run_cfg.secure_aggregation and not self.secagg.ready(task.round):
            log.error("round %d: no secure-aggregation keys for this round (restarted mid-round?): sitting it out",
                      task.round)
            return
        base = self.fetch_global(task.task_id)
        log.info("round %d: training on task %s", task.round, task.task_id[:12])
        delta, result = work.train_on_task(self.trainer, self.run_cfg, task, base)
        steps = len(result.lrs)
        first, schedule = work.task_schedule(self.run_cfg, json.loads(task.config_json))
        log.info("round %d: lr %.6e -> %.6e over global steps %d..%d of %d", task.round, result.lrs[0],
                 result.lrs[-1], first, first + steps - 1, schedule.total_steps)
        uploading = time.monotonic()
        reply = self.upload(task, delta, result.num_examples, result.train_loss, result.seconds,
                            base_digest=self.held.digest, metrics=work.training_figures(result))
        if self.metrics:
            self.metrics.record_round(steps, result.num_examples * self.run_cfg.seq_len, result.seconds,
                                      time.monotonic() - uploading, reply.bytes_received)
        log.info("round %d: loss %.4f in %.1f s, uploaded %d bytes (%s)", task.round, result.train_loss,
                 result.seconds, reply.bytes_received, self.run_cfg.upload_codec)
        if self.console is not None:
            if self._rounds_bar is None:
                self._rounds_bar = Progress("training rounds", self.run_cfg.rounds, console=self.console)
            self._rounds_bar.update(task.round, f"round {task.round}: loss {result.train_loss:.3f}")

    def upload(self, task: pb.Task, delta: dict[str, torch.Tensor], num_examples: int, train_loss: float,
               seconds: float, base_digest: bytes = b"", metrics: dict[str, float] | None = None) -> pb.PushReply:
        """Encode `delta` with the run's codec (error feedback), sign it, stream it; retried while unreachable.

        If the coordinator restarted meanwhile (our session is gone), join again and re-send the same
        encoded update under the new session: it carries the digest of the weights it was trained from,
        so the coordinator can accept it for the re-run of the same round instead of losing the work."""
        saved = self.feedback.snapshot()
        if self.run_cfg.secure_aggregation:   # quantized and masked: no codec, no residual
            raw_parts = self.secagg.masked_parts(task.round, delta)
        else:
            raw_parts = work.encode_delta(self.feedback, delta)
        for attempt in range(3):
            c = self.session.creds
            chunks = work.update_stream(raw_parts, client_id=c.client_id, token=c.token, run_id=c.run_id,
                                        task=task, num_tensors=len(delta), num_examples=num_examples,
                                        train_loss=train_loss, seconds=seconds, base_digest=base_digest,
                                        identity=self.session.identity, metrics=metrics)
            try:
                reply = self.session.push(chunks)
                if attempt:
                    log.info("round %d: update re-sent after the coordinator restarted, and accepted", task.round)
                return reply
            except grpc.RpcError as err:
                session_gone = refusals.reason(err) in refusals.REJOIN
                if not (session_gone and base_digest and attempt < 2):
                    self.feedback.restore(saved)  # nothing was applied: residuals and momenta must not move on
                    raise
                log.warning("round %d: the coordinator lost our session while uploading; joining again to re-send",
                            task.round)
                self.session.join()
        raise AssertionError("unreachable")

    def fetch_global(self, task_id: str) -> dict[str, torch.Tensor]:
        """A federated task's weights: deltas from the version held, checked against the coordinator's digest;
        a full copy when the coordinator cannot serve deltas to us or the reconstruction does not match."""
        try:
            self.held = self._download(task_id, -1, self.held)
        except DigestMismatch as err:
            log.warning("%s; downloading a full copy", err)
            self.held = self._download(task_id, -1, None)
        how = (f"{self.held.steps} delta step(s)" if self.held.steps else
               "a full copy" if self.held.wire_bytes else "nothing (already held)")
        log.info("downloaded model version %d as %s, %d bytes", self.held.version, how, self.held.wire_bytes)
        return self.held.state

    def _download(self, task_id: str, stage: int, held: Held | None) -> Held:
        s = self.session

        def download():
            req = pb.FetchModelRequest(**s.creds.ids(), task_id=task_id,
                                       stage=stage + 1, has_version=held is not None,
                                       held_version=held.version if held else 0, held_digest=held.digest if held else b"")
            chunks = list(s.stub.FetchModel(req, timeout=s.t.transfer_s))
            got = reconstruct(chunks, held, C.CodecSpec.of(self.run_cfg, "download"))
            got.wire_bytes = sum(c.ByteSize() for c in chunks)
            return got
        return s.with_retry("model download", download)


@dataclass
class Held:
    """A global model version as this client reconstructed it."""

    version: int
    state: dict[str, torch.Tensor]
    digest: bytes          # as the coordinator announced it (checked against our reconstruction)
    steps: int = 0         # delta steps the download applied (0: a full copy)
    wire_bytes: int = 0    # size of the ModelChunk messages it took


class DigestMismatch(wire.WireError):
    """The reconstructed weights differ from the coordinator's: the deltas were applied to other weights."""


def reconstruct(chunks: list[pb.ModelChunk], held: Held | None, delta_codec: int | C.CodecSpec) -> Held:
    """Apply a FetchModel stream: one full float32 copy, or steps (codec-encoded deltas) onto `held`.
    Each version's result must hash to the digest its first chunk announces."""
    groups: list[tuple[int, bool, bytes, list[pb.TensorPart]]] = []
    for chunk in chunks:
        if not groups or (chunk.version, chunk.delta) != groups[-1][:2] or chunk.digest:
            groups.append((chunk.version, chunk.delta, bytes(chunk.digest), []))
        groups[-1][3].append(chunk.part)
    state = held.state if held else None
    version, digest = (held.version, held.digest) if held else (0, b"")
    steps = 0
    for version, delta, digest, parts in groups:
        steps = steps + 1 if delta else 0
        if delta:
            if state is None:
                raise wire.WireError("the coordinator sent a delta but this client holds no version")
            assembler = wire.PartAssembler({n: tuple(t.shape) for n, t in state.items()}, {delta_codec})
        else:
            assembler = wire.PartAssembler({p.name: tuple(p.shape) for p in parts}, {C.CODEC_NAMES["none"]})
        for part in parts:
            assembler.add(part)
        values = assembler.finish()
        state = {n: state[n] + values[n] for n in state} if delta else values
        if digest and wire.state_digest(state) != digest:
            raise DigestMismatch(f"model version {version} reconstructed from {'deltas' if delta else 'a full copy'} "
                                 f"does not match the coordinator's digest")
    if state is None:
        raise wire.WireError("the model download carried no tensors")
    return Held(version, state, digest, steps)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`fedswarm client`'s flags: ClientOptions and the waits of its session and roles (client/options.py)."""
    add_client_arguments(p)


def role_class(name: str) -> type[RoleBase]:
    """The role class of `--role NAME`."""
    if name == "evaluator":
        from fedswarm.client.evaluator import EvaluatorRole

        return EvaluatorRole
    if name in ("peer", "trainer"):
        from fedswarm.client.swarm.roles import PeerRole, TrainerRole

        return PeerRole if name == "peer" else TrainerRole
    return FederatedRole


def main(args: argparse.Namespace) -> int:
    settings = ClientSettings.from_args(args)
    options = settings.options
    try:
        check_options(options)   # address, data and model: before anything connects (or logs, or sizes threads)
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    console = setup_logging()   # through rich on a terminal, so the rounds bar and the log share it
    BUDGET.configure(options.threads)
    try:
        role = role_class(options.role)(settings)
        session = open_session(role)
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    role.console = console
    if options.metrics_port is not None:
        from fedswarm.metrics import ClientMetrics, serve as serve_metrics
        role.metrics = ClientMetrics(role)
        try:
            serve_metrics(role.metrics.registry, options.metrics_host, options.metrics_port)
        except ValueError as err:
            session.close()
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        return session.run()
    except (JoinRefused, SessionReplaced) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BadInput as err:   # data or model that only the run's settings show unusable (e.g. its text field)
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
