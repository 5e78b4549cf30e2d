"""`fedswarm client`: connect out to the coordinator, train on local data, upload compressed deltas."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from fedswarm import tokenized
from fedswarm.client import work
from fedswarm.client.identity import Identity, open_channel, signed_join_fields
from fedswarm.client.preflight import check_args
from fedswarm.client.trainer import PRECISIONS, LocalTrainer, resolve_device, resolve_precision
from fedswarm.data import parse_partition
from fedswarm.errors import BadInput, one_line
from fedswarm.lora import build_run_model
from fedswarm.models import trainable_state
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals, wire
from fedswarm.progress import Progress, setup_logging
from fedswarm.settings import add_arguments as add_setting_arguments
from fedswarm.settings import from_args, opt
from fedswarm.swarm_settings import SWARM_PREFIX, TRAINER_PREFIX, SwarmTimeouts, TrainerTimeouts
from fedswarm.threads import BUDGET

log = logging.getLogger("fedswarm.client")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}


@dataclass
class ClientTimeouts:
    """Every wait the daemon does, named; each is a flag of `fedswarm client` and a key of [client]."""

    rpc_s: float = opt(30.0, "seconds a unary call to the coordinator may take", flag="--rpc-timeout", metavar="S")
    pull_wait_s: float = opt(10.0, "seconds a task long-poll asks the coordinator to wait",
                             flag="--pull-wait", metavar="S")
    transfer_s: float = opt(300.0, "seconds a model download or an update upload may take",
                            flag="--transfer-timeout", metavar="S")
    backoff_initial_s: float = opt(0.5, "first retry delay while the coordinator is unreachable (doubles)",
                                   flag="--backoff-initial", metavar="S")
    backoff_max_s: float = opt(10.0, "longest retry delay while the coordinator is unreachable",
                               flag="--backoff-max", metavar="S")
    give_up_s: float = opt(0.0, "stop retrying after this many seconds unreachable (0: never)",
                           flag="--give-up-after", metavar="S")
    pending_s: float = opt(120.0, "seconds to keep re-sending an update the coordinator calls early",
                           flag="--pending-timeout", metavar="S")
    unknown_retries: int = opt(3, "times a call that hit an unexpected coordinator error (UNKNOWN) is retried",
                               flag="--unknown-retries", metavar="N")


class JoinRefused(Exception):
    """The coordinator does not accept this client's key or proof: retrying will not help."""


@dataclass(frozen=True)
class Credentials:
    """The session the coordinator gave this daemon; a re-join swaps the whole object at once, so a request
    built from one snapshot never pairs one session's id with another's token."""

    client_id: int = 0
    token: str = ""
    run_id: str = ""

    def ids(self) -> dict:
        """The session fields of a request."""
        return {"client_id": self.client_id, "session_token": self.token}


class SessionReplaced(Exception):
    """Another daemon joined with this client's key; only one may run per key, so this one stops."""


class ClientDaemon:
    role = "client"   # federated client; swarm roles subclass this (client/swarm/roles.py)
    p2p_peer_id = ""  # swarm roles: the libp2p peer id their signed join binds
    def __init__(self, args: argparse.Namespace, timeouts: ClientTimeouts | None = None):
        self.args = args
        self.t = timeouts or from_args(ClientTimeouts, args)
        self.name = args.name or f"{socket.gethostname()}-{random.randrange(1 << 16):04x}"
        self.device = resolve_device(args.device)
        self.precision = resolve_precision(args.precision, self.device)
        if getattr(args, "load_in_4bit", False) and self.device.type != "cuda":
            raise ValueError(f"--load-in-4bit (QLoRA) needs a CUDA device, and this client trains on {self.device}: "
                             f"drop --load-in-4bit here (the run's LoRA adapters train on a full-precision base), "
                             f"or run this client on a GPU host with --device cuda")
        self.index, self.num_partitions = parse_partition(args.partition)
        key = getattr(args, "key", None)
        self.identity = Identity.load(key) if key else None  # signs joins and updates
        self.channel = open_channel(args.coordinator, getattr(args, "tls_ca", None), options=[
            ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
            ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096),
            # gRPC's own reconnect backoff (1 s growing to 120 s) would otherwise override backoff_max_s
            ("grpc.initial_reconnect_backoff_ms", int(self.t.backoff_initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.t.backoff_max_s * 1000))])
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self._push_raw = self.channel.stream_unary(  # PushUpdate taking pre-serialized UpdateChunks
            "/fedswarm.Coordinator/PushUpdate", request_serializer=None, response_deserializer=pb.PushReply.FromString)
        self.creds = Credentials()
        self.metrics = None   # fedswarm.metrics.ClientMetrics with --metrics-port
        self.console = None   # a rich Console on a terminal: training shows a rounds bar on it
        self._rounds_bar = None
        self.trainer: LocalTrainer | None = None
        self.feedback: C.ErrorFeedback | None = None
        self.run_cfg: dict = {}
        self.held: Held | None = None   # the global version this client holds (delta downloads start from it)
        self._hb_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._join_lock = threading.RLock()
        # hivemind starts its DHT with fork(): a gRPC call in flight at that moment leaves a held mutex in the
        # child (abseil "Check w->waitp->cond == nullptr failed"). Calls from background threads take this
        # lock, and so does whoever forks.
        self.fork_guard = threading.Lock()

    # -- connection ------------------------------------------------------------------
    def with_retry(self, what: str, call):
        """Call until it succeeds; exponential backoff with jitter while the coordinator is unreachable."""
        delay, started, unknown = self.t.backoff_initial_s, time.monotonic(), 0
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                why = refusals.reason(err)
                unknown += err.code() == grpc.StatusCode.UNKNOWN
                transient = err.code() in RETRYABLE or why in refusals.RETRY_SOON or \
                    (err.code() == grpc.StatusCode.UNKNOWN and unknown <= self.t.unknown_retries)
                if not transient or why in refusals.FINAL:
                    raise
                if self.t.give_up_s and time.monotonic() - started > self.t.give_up_s:
                    raise
                if err.code() == grpc.StatusCode.ABORTED and time.monotonic() - started > self.t.pending_s:
                    raise  # "come back shortly" that never resolves: give the work up
                wait = delay * random.uniform(0.5, 1.5)
                log.warning("%s failed (%s: %s); retrying in %.1f s", what, err.code().name, err.details(), wait)
                time.sleep(wait)
                delay = min(delay * 2, self.t.backoff_max_s)

    @property
    def client_id(self) -> int:
        return self.creds.client_id

    @property
    def run_id(self) -> str:
        return self.creds.run_id

    def join(self) -> None:
        with self._join_lock:
            self._join()

    def _join(self) -> None:
        def attempt():  # a fresh challenge and nonce per attempt: a resent proof would count as a replay
            proof = signed_join_fields(self.stub, self.identity, self.name, self.role, self.t.rpc_s, self.p2p_peer_id)
            req = pb.JoinRequest(name=self.name, device=str(self.device), precision=self.precision,
                                 resume_client_id=self.creds.client_id, resume_token=self.creds.token, role=self.role,
                                 p2p_peer_id=self.p2p_peer_id, **proof)
            return self.stub.Join(req, timeout=self.t.rpc_s)
        for tries in range(1, 4):
            try:
                reply = self.with_retry("join", attempt)
                break
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                why = refusals.reason(err)
                if why in refusals.RETRY_JOIN and tries < 3:  # the coordinator restarted between challenge and join
                    log.warning("join refused (%s); signing a fresh challenge", why)
                    continue
                hint = "" if self.identity else " (this client has no --key)"
                raise JoinRefused(f"the coordinator refused to let {self.name} join ({why or err.code().name}): "
                                  f"{err.details()}{hint}") from None
        if self.run_id and reply.run_id != self.run_id:
            raise RuntimeError(f"the coordinator now serves run {reply.run_id}, not {self.run_id}; restart the client")
        self.creds = Credentials(reply.client_id, reply.session_token, reply.run_id)
        self.heartbeat_s = reply.heartbeat_interval_s
        self.assigned_stage, self.dht_peers = reply.stage, list(reply.dht_peers)
        self.joined = reply  # swarm roles read the roster from it
        if self._heartbeat is None:  # before any slow setup: the lease must not lapse while we load
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
            self._heartbeat.start()
        if not self.run_cfg:
            self._setup(json.loads(reply.run_config_json))
        log.info("joined run %s as %s (id %d) on %s/%s", self.run_id, self.name, self.client_id, self.device, self.precision)

    def _setup(self, cfg: dict) -> None:
        self.run_cfg = cfg
        tokens = tokenized.client_tokens(self.args, cfg, self.index, self.num_partitions)
        seed = int.from_bytes(hashlib.sha256(f"{cfg['seed']}/{self.index}/{self.num_partitions}".encode()).digest()[:4], "little")
        sampler = tokenized.sampler(tokens, cfg["seq_len"], cfg["batch_size"], seed)
        local = {**cfg, "model": getattr(self.args, "model", None) or cfg["model"]}  # this host's copy of the model
        model = build_run_model(local, self.device, load_in_4bit=getattr(self.args, "load_in_4bit", False))
        initial = trainable_state(model)   # the run's version 0, if the coordinator's digest agrees
        self.held = Held(0, initial, wire.state_digest(initial))
        self.trainer = LocalTrainer(model, sampler, self.device, self.precision, lr=cfg["lr"],
                                    gradient_checkpointing=getattr(self.args, "gradient_checkpointing", False))
        self.codec = C.codec_by_name(cfg["upload_codec"])
        self.feedback = C.ErrorFeedback.for_run(cfg)

    def heartbeat_request(self) -> pb.HeartbeatRequest:
        """Subclasses add their stats."""
        return pb.HeartbeatRequest(**self.creds.ids())

    def on_heartbeat(self, reply: pb.HeartbeatReply) -> None:
        """Subclasses react (a swarm peer switches stage)."""

    def _heartbeat_loop(self) -> None:
        while not self._hb_stop.wait(self.heartbeat_s):
            try:
                with self.fork_guard:
                    reply = self.stub.Heartbeat(self.heartbeat_request(), timeout=self.t.rpc_s)
            except grpc.RpcError as err:
                why = refusals.reason(err)
                if why in refusals.REJOIN and not self._hb_stop.is_set():
                    log.warning("heartbeat refused (%s): the coordinator no longer knows this session; joining again",
                                why)
                    try:
                        self.join()
                    except Exception:  # noqa: BLE001 - the next beat tries again
                        log.exception("re-join from the heartbeat failed")
                elif why == refusals.REPLACED:
                    log.error("heartbeat refused (%s): %s", why, err.details())
                    self._hb_stop.set()
                else:
                    log.debug("heartbeat failed: %s %s", err.code().name, why)
                continue
            try:
                self.on_heartbeat(reply)
            except Exception:  # noqa: BLE001 - keep the heartbeat alive whatever a hook does
                log.exception("heartbeat hook failed")

    # -- work ------------------------------------------------------------------------
    def run(self) -> int:
        self.join()
        try:
            while True:
                try:
                    task = self.with_retry("pull task", lambda: self.stub.PullTask(
                        pb.PullTaskRequest(**self.creds.ids(), wait_s=self.t.pull_wait_s),
                        timeout=self.t.pull_wait_s + self.t.rpc_s))
                    if task.kind == pb.TASK_DONE:
                        log.info("run finished at round %d; exiting", task.round)
                        return 0
                    if task.kind == pb.TASK_TRAIN:
                        self.train(task)
                    elif task.kind == pb.TASK_EVALUATE:
                        self.evaluate(task)
                except grpc.RpcError as err:
                    why = refusals.reason(err)
                    if why in refusals.REJOIN:
                        log.warning("refused (%s): the coordinator no longer knows this session; joining again", why)
                        self.join()
                    elif why == refusals.REPLACED:
                        raise SessionReplaced(f"{err.details()} (refused: {why})") from None
                    elif err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):
                        log.warning("task dropped (%s): %s", why or err.code().name, err.details())
                    else:
                        raise
        finally:
            self._hb_stop.set()
            if self._heartbeat is not None:
                self._heartbeat.join(timeout=self.t.rpc_s)
            self.channel.close()
            if self._rounds_bar is not None:
                self._rounds_bar.close()

    def evaluate(self, task: pb.Task) -> None:
        """Score the task's model (downloaded as for training: deltas from the version held) on this client's
        held-out split, and answer with the loss and the tokens it averages."""
        BUDGET.refresh()
        base = self.fetch_global(task.task_id)
        try:
            if getattr(self, "_held_out", None) is None:   # tokenized once, on the first evaluation asked for
                self._held_out = work.held_out_windows(self.args, self.run_cfg)
        except ValueError as err:   # e.g. --data too small for a held-out split: say so rather than go silent
            log.error("round %d: cannot evaluate: %s", task.round, err)
            outcome, error = work.EvalOutcome(0.0, 0, 0.0), str(err)[:500]
        else:
            outcome, error = work.evaluate_on_task(self.evaluation_model(), self._held_out, base), ""
        c = self.creds
        req = work.eval_result(outcome, client_id=c.client_id, token=c.token, run_id=c.run_id, task=task,
                               base_digest=self.held.digest, identity=self.identity, error=error)
        self.with_retry("evaluation result", lambda: self.stub.PushEval(req, timeout=self.t.rpc_s))
        if not error:
            log.info("round %d: eval loss %.4f on %d held-out tokens in %.1f s", task.round, outcome.loss,
                     outcome.tokens, outcome.seconds)

    def evaluation_model(self) -> torch.nn.Module:
        """The model an evaluation loads the task's weights into (the trainer's: its optimizer state is apart)."""
        return self.trainer.model

    def train(self, task: pb.Task) -> None:
        BUDGET.refresh()   # other fedswarm processes may have started beside us since the last round
        base = self.fetch_global(task.task_id)
        log.info("round %d: training on task %s", task.round, task.task_id[:12])
        delta, result = work.train_on_task(self.trainer, self.run_cfg, task, base)
        steps = len(result.lrs)
        first, schedule = work.task_schedule(self.run_cfg, json.loads(task.config_json))
        log.info("round %d: lr %.6e -> %.6e over global steps %d..%d of %d", task.round, result.lrs[0],
                 result.lrs[-1], first, first + steps - 1, schedule.total_steps)
        uploading = time.monotonic()
        reply = self.upload(task, delta, result.num_examples, result.train_loss, result.seconds,
                            base_digest=self.held.digest)
        if self.metrics:
            self.metrics.record_round(steps, result.num_examples * self.run_cfg["seq_len"], result.seconds,
                                      time.monotonic() - uploading, reply.bytes_received)
        log.info("round %d: loss %.4f in %.1f s, uploaded %d bytes (%s)", task.round, result.train_loss,
                 result.seconds, reply.bytes_received, self.run_cfg["upload_codec"])
        if self.console is not None:
            if self._rounds_bar is None:
                self._rounds_bar = Progress("training rounds", self.run_cfg["rounds"], console=self.console)
            self._rounds_bar.update(task.round, f"round {task.round}: loss {result.train_loss:.3f}")

    def upload(self, task: pb.Task, delta: dict[str, torch.Tensor], num_examples: int, train_loss: float,
               seconds: float, base_digest: bytes = b"") -> pb.PushReply:
        """Encode `delta` with the run's codec (error feedback), sign it, stream it; retried while unreachable.

        If the coordinator restarted meanwhile (our session is gone), join again and re-send the same
        encoded update under the new session: it carries the digest of the weights it was trained from,
        so the coordinator can accept it for the re-run of the same round instead of losing the work."""
        saved = self.feedback.snapshot()
        raw_parts = work.encode_delta(self.feedback, delta)
        for attempt in range(3):
            c = self.creds
            chunks = work.update_stream(raw_parts, client_id=c.client_id, token=c.token, run_id=c.run_id,
                                        task=task, num_tensors=len(delta), num_examples=num_examples,
                                        train_loss=train_loss, seconds=seconds, base_digest=base_digest,
                                        identity=self.identity)
            try:
                reply = self.with_retry("upload", lambda: self._push_raw(iter(chunks), timeout=self.t.transfer_s))
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
                self.join()
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

    def fetch_model(self, task_id: str, stage: int = -1) -> dict[str, torch.Tensor]:
        """The weights of a task, or (swarm, no task) a stage's latest committed average (full copies)."""
        return self._download(task_id, stage, None).state

    def _download(self, task_id: str, stage: int, held: Held | None) -> Held:
        def download():
            req = pb.FetchModelRequest(**self.creds.ids(), task_id=task_id,
                                       stage=stage + 1, has_version=held is not None,
                                       held_version=held.version if held else 0, held_digest=held.digest if held else b"")
            chunks = list(self.stub.FetchModel(req, timeout=self.t.transfer_s))
            got = reconstruct(chunks, held, C.CodecSpec.of({"download_codec": "none", **self.run_cfg}, "download"))
            got.wire_bytes = sum(c.ByteSize() for c in chunks)
            return got
        return self.with_retry("model download", download)


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
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--data", default="stdlib",
                   help="stdlib (the running Python's sources), a text file / folder, JSON Lines, Parquet, "
                        "or a datasets save_to_disk folder")
    p.add_argument("--model", default=None, metavar="HF_DIR",
                   help="this host's copy of the run's model folder (default: the path the coordinator names)")
    p.add_argument("--format", default=None, choices=["text", "chat"],
                   help="records as documents (text) or prompt/response pairs (chat) (default: the run's)")
    p.add_argument("--text-field", default=None, help="record field holding the text (default: the run's)")
    p.add_argument("--prompt-field", default=None, help="chat: record field of the prompt (default: the run's)")
    p.add_argument("--response-field", default=None, help="chat: record field of the response (default: the run's)")
    p.add_argument("--cache-dir", default=None,
                   help="where tokenized shards go when the data's folder is read-only "
                        "(default: $FEDSWARM_CACHE or ~/.cache/fedswarm/tokens)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: hold the frozen base in 4 bits (bitsandbytes; CUDA clients of a --peft lora run)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each transformer block's activations in the backward pass instead of keeping "
                        "them: far less memory for about a third more compute (clients and peers; this host's choice)")
    p.add_argument("--partition", default="0/1", help="I/N: this client's share of --data (0-based)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CPU and bf16 GPUs, else fp16 with a scaler")
    p.add_argument("--name", default="", help="name shown in status (default: host name + random suffix)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: this host's CPUs shared among the fedswarm processes running on it, "
                        "re-checked each round)")
    p.add_argument("--role", default="client", choices=["client", "evaluator", "peer", "trainer"],
                   help="client: federated rounds; evaluator: only evaluate each round's model on --data's held-out "
                        "split (--evaluate clients/both; never sampled for training); peer: serve a swarm pipeline "
                        "stage; trainer: drive swarm micro-batches")
    p.add_argument("--inflight", type=int, default=2, help="trainer: micro-batches in flight at once")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM) to verify a TLS coordinator")
    p.add_argument("--key", metavar="FILE", help="Ed25519 private key (PEM) proving this client's identity")
    p.add_argument("--p2p-host", default="127.0.0.1", metavar="IP[:PORT]",
                   help="swarm: address the hivemind node binds (default loopback; port 0/omitted: any free port)")
    p.add_argument("--p2p-announce", default="", metavar="IP[:PORT]",
                   help="swarm: address other hosts dial when it differs from --p2p-host (NAT, containers)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://--metrics-host:PORT/metrics (0: a free port; default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics endpoint binds")
    add_setting_arguments(p, ClientTimeouts)
    add_setting_arguments(p, SwarmTimeouts, prefix=SWARM_PREFIX)       # peers and trainers
    add_setting_arguments(p, TrainerTimeouts, prefix=TRAINER_PREFIX)   # trainers


def main(args: argparse.Namespace) -> int:
    try:
        check_args(args)   # address, data and model: before anything connects (or logs, or sizes threads)
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    console = setup_logging()   # through rich on a terminal, so the rounds bar and the log share it
    BUDGET.configure(args.threads)
    cls = ClientDaemon
    if args.role == "evaluator":
        from fedswarm.client.evaluator import EvaluatorDaemon

        cls = EvaluatorDaemon
    elif args.role != "client":
        from fedswarm.client.swarm.roles import PeerDaemon, TrainerDaemon

        cls = PeerDaemon if args.role == "peer" else TrainerDaemon
    try:
        daemon = cls(args)
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    daemon.console = console
    if args.metrics_port is not None:
        from fedswarm.metrics import ClientMetrics, serve as serve_metrics
        daemon.metrics = ClientMetrics(daemon)
        try:
            serve_metrics(daemon.metrics.registry, args.metrics_host, args.metrics_port)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        return daemon.run()
    except (JoinRefused, SessionReplaced) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BadInput as err:   # data or model that only the run's settings show unusable (e.g. its text field)
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
