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

from fedswarm.client.identity import Identity, open_channel
from fedswarm.client.trainer import PRECISIONS, LocalTrainer, resolve_device, resolve_precision
from fedswarm.data import BatchSampler, load_train_tokens, parse_partition
from fedswarm.models import build_model, trainable_state
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import wire
from fedswarm.schedule import LrSchedule

log = logging.getLogger("fedswarm.client")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}


@dataclass
class ClientTimeouts:
    """Every wait the daemon does, named."""

    rpc_s: float = 30.0               # deadline of a unary call
    pull_wait_s: float = 10.0         # long-poll length asked of PullTask
    transfer_s: float = 300.0         # deadline of a model download or update upload
    backoff_initial_s: float = 0.5    # first retry delay while the coordinator is unreachable
    backoff_max_s: float = 10.0       # cap on the retry delay
    give_up_s: float = 0.0            # stop retrying after this long unreachable (0: never)
    pending_s: float = 120.0          # how long to keep re-sending an update the coordinator says is early


class JoinRefused(Exception):
    """The coordinator does not accept this client's key or proof: retrying will not help."""


class SessionLost(Exception):
    """The coordinator no longer knows this session (it restarted or dropped us): join again."""


class ClientDaemon:
    role = "client"   # federated client; swarm roles subclass this (client/swarm/roles.py)
    def __init__(self, args: argparse.Namespace, timeouts: ClientTimeouts | None = None):
        self.args = args
        self.t = timeouts or ClientTimeouts()
        self.name = args.name or f"{socket.gethostname()}-{random.randrange(1 << 16):04x}"
        self.device = resolve_device(args.device)
        self.precision = resolve_precision(args.precision, self.device)
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
        self.client_id, self.token, self.run_id = 0, "", ""
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
        delay, started = self.t.backoff_initial_s, time.monotonic()
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise
                if self.t.give_up_s and time.monotonic() - started > self.t.give_up_s:
                    raise
                if err.code() == grpc.StatusCode.ABORTED and time.monotonic() - started > self.t.pending_s:
                    raise  # "come back shortly" that never resolves: give the work up
                wait = delay * random.uniform(0.5, 1.5)
                log.warning("%s failed (%s: %s); retrying in %.1f s", what, err.code().name, err.details(), wait)
                time.sleep(wait)
                delay = min(delay * 2, self.t.backoff_max_s)

    def join(self) -> None:
        with self._join_lock:
            self._join()

    def _join(self) -> None:
        def attempt():  # a fresh timestamp and nonce per attempt: a resent proof would count as a replay
            proof = self.identity.join_proof(self.name) if self.identity else {}
            req = pb.JoinRequest(name=self.name, device=str(self.device), precision=self.precision,
                                 resume_client_id=self.client_id, resume_token=self.token, role=self.role, **proof)
            return self.stub.Join(req, timeout=self.t.rpc_s)
        try:
            reply = self.with_retry("join", attempt)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            hint = "" if self.identity else " (this client has no --key)"
            raise JoinRefused(f"the coordinator refused to let {self.name} join: {err.details()}{hint}") from None
        if self.run_id and reply.run_id != self.run_id:
            raise RuntimeError(f"the coordinator now serves run {reply.run_id}, not {self.run_id}; restart the client")
        self.client_id, self.token, self.run_id = reply.client_id, reply.session_token, reply.run_id
        self.heartbeat_s = reply.heartbeat_interval_s
        self.assigned_stage, self.dht_peers = reply.stage, list(reply.dht_peers)
        if self._heartbeat is None:  # before any slow setup: the lease must not lapse while we load
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
            self._heartbeat.start()
        if not self.run_cfg:
            self._setup(json.loads(reply.run_config_json))
        log.info("joined run %s as %s (id %d) on %s/%s", self.run_id, self.name, self.client_id, self.device, self.precision)

    def _setup(self, cfg: dict) -> None:
        self.run_cfg = cfg
        tokens = load_train_tokens(self.args.data, self.index, self.num_partitions)
        seed = int.from_bytes(hashlib.sha256(f"{cfg['seed']}/{self.index}/{self.num_partitions}".encode()).digest()[:4], "little")
        sampler = BatchSampler(tokens, cfg["seq_len"], cfg["batch_size"], seed)
        model = build_model(cfg["model"], seed=cfg["seed"])
        initial = trainable_state(model)   # the run's version 0, if the coordinator's digest agrees
        self.held = Held(0, initial, wire.state_digest(initial))
        self.trainer = LocalTrainer(model, sampler, self.device, self.precision, lr=cfg["lr"])
        self.codec = C.codec_by_name(cfg["upload_codec"])
        self.feedback = C.ErrorFeedback(self.codec, cfg.get("codec_block_size") or None)

    def heartbeat_request(self) -> pb.HeartbeatRequest:
        """Subclasses add their stats."""
        return pb.HeartbeatRequest(client_id=self.client_id, session_token=self.token)

    def on_heartbeat(self, reply: pb.HeartbeatReply) -> None:
        """Subclasses react (a swarm peer switches stage)."""

    def _heartbeat_loop(self) -> None:
        while not self._hb_stop.wait(self.heartbeat_s):
            try:
                with self.fork_guard:
                    reply = self.stub.Heartbeat(self.heartbeat_request(), timeout=self.t.rpc_s)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED and not self._hb_stop.is_set():
                    log.warning("the coordinator no longer knows this session (%s); joining again", err.details())
                    try:
                        self.join()
                    except Exception:  # noqa: BLE001 - the next beat tries again
                        log.exception("re-join from the heartbeat failed")
                else:
                    log.debug("heartbeat failed: %s", err.code().name)
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
                        pb.PullTaskRequest(client_id=self.client_id, session_token=self.token, wait_s=self.t.pull_wait_s),
                        timeout=self.t.pull_wait_s + self.t.rpc_s))
                    if task.kind == pb.TASK_DONE:
                        log.info("run finished at round %d; exiting", task.round)
                        return 0
                    if task.kind == pb.TASK_TRAIN:
                        self.train(task)
                except SessionLost:
                    log.warning("session lost; joining again")
                    self.join()
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                        log.warning("coordinator refused the session (%s); joining again", err.details())
                        self.join()
                    elif err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        log.warning("task dropped: %s", err.details())
                    else:
                        raise
        finally:
            self._hb_stop.set()
            if self._heartbeat is not None:
                self._heartbeat.join(timeout=self.t.rpc_s)
            self.channel.close()

    def train(self, task: pb.Task) -> None:
        config = json.loads(task.config_json)
        base = self.fetch_global(task.task_id)
        log.info("round %d: training on task %s", task.round, task.task_id[:12])
        mu = float(config.get("proximal-mu", 0.0))
        steps = int(config.get("local-steps", self.run_cfg["local_steps"]))
        first, schedule = self.schedule(config, steps)
        result = self.trainer.train_round(base, steps, self.run_cfg.get("grad_accum", 1), proximal_mu=mu,
                                          lr_at=lambda i: schedule.lr_at(first + i))
        log.info("round %d: lr %.6e -> %.6e over global steps %d..%d of %d", task.round, result.lrs[0],
                 result.lrs[-1], first, first + steps - 1, schedule.total_steps)
        delta = {n: result.state[n] - base[n] for n in base}
        reply = self.upload(task, delta, result.num_examples, result.train_loss, result.seconds,
                            base_digest=self.held.digest)
        log.info("round %d: loss %.4f in %.1f s, uploaded %d bytes (%s)", task.round, result.train_loss,
                 result.seconds, reply.bytes_received, self.run_cfg["upload_codec"])

    def schedule(self, config: dict, steps: int) -> tuple[int, LrSchedule]:
        """(the round's first global step, the run's lr schedule) from the task's config."""
        cfg = self.run_cfg
        total = int(config.get("total-steps", cfg["rounds"] * cfg["local_steps"]))
        return int(config.get("global-step", 0)), LrSchedule(
            float(config.get("lr", cfg["lr"])), max(total, 1), cfg.get("lr_schedule", "constant"),
            int(cfg.get("warmup_steps", 0)), float(cfg.get("min_lr", 0.0)))

    def upload(self, task: pb.Task, delta: dict[str, torch.Tensor], num_examples: int, train_loss: float,
               seconds: float, base_digest: bytes = b"") -> pb.PushReply:
        """Encode `delta` with the run's codec (error feedback), sign it, stream it; retried while unreachable.

        If the coordinator restarted meanwhile (our session is gone), join again and re-send the same
        encoded update under the new session: it carries the digest of the weights it was trained from,
        so the coordinator can accept it for the re-run of the same round instead of losing the work."""
        saved = {n: r.clone() for n, r in self.feedback.residuals.items()}
        encoded = {n: self.feedback.compress(n, d)[0] for n, d in delta.items()}
        parts = [p for n, d in delta.items() for p in wire.tensor_parts(n, tuple(d.shape), encoded[n])]
        raw_parts = [pb.UpdateChunk(part=p).SerializeToString() for p in parts]
        for attempt in range(3):
            header = pb.UpdateHeader(client_id=self.client_id, session_token=self.token, task_id=task.task_id,
                                     round=task.round, num_examples=num_examples, train_loss=train_loss,
                                     num_tensors=len(delta), num_parts=len(parts), train_seconds=seconds,
                                     base_digest=base_digest)
            if self.identity:  # the coordinator hashes exactly these bytes: send them as they are
                header.signature = self.identity.sign_update(self.run_id, task.round, self.client_id, task.task_id,
                                                             num_examples, train_loss, len(parts), raw_parts)
            chunks = [pb.UpdateChunk(header=header).SerializeToString()] + raw_parts
            try:
                reply = self.with_retry("upload", lambda: self._push_raw(iter(chunks), timeout=self.t.transfer_s))
                if attempt:
                    log.info("round %d: update re-sent after the coordinator restarted, and accepted", task.round)
                return reply
            except grpc.RpcError as err:
                session_gone = err.code() == grpc.StatusCode.UNAUTHENTICATED and "join again" in (err.details() or "")
                if not (session_gone and base_digest and attempt < 2):
                    self.feedback.residuals = saved  # nothing was applied: the residual must not move on
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
            req = pb.FetchModelRequest(client_id=self.client_id, session_token=self.token, task_id=task_id,
                                       stage=stage + 1, has_version=held is not None,
                                       held_version=held.version if held else 0, held_digest=held.digest if held else b"")
            chunks = list(self.stub.FetchModel(req, timeout=self.t.transfer_s))
            got = reconstruct(chunks, held, C.codec_by_name(self.run_cfg.get("download_codec", "none")))
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


def reconstruct(chunks: list[pb.ModelChunk], held: Held | None, delta_codec: int) -> Held:
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
    p.add_argument("--data", default="stdlib", help="stdlib (the running Python's sources) or a text file / folder")
    p.add_argument("--partition", default="0/1", help="I/N: this client's share of --data (0-based)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--name", default="", help="name shown in status (default: host name + random suffix)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--role", default="client", choices=["client", "peer", "trainer"],
                   help="client: federated rounds; peer: serve a swarm pipeline stage; trainer: drive swarm micro-batches")
    p.add_argument("--inflight", type=int, default=2, help="trainer: micro-batches in flight at once")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM) to verify a TLS coordinator")
    p.add_argument("--key", metavar="FILE", help="Ed25519 private key (PEM) proving this client's identity")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cls = ClientDaemon
    if args.role != "client":
        from fedswarm.client.swarm.roles import PeerDaemon, TrainerDaemon

        cls = PeerDaemon if args.role == "peer" else TrainerDaemon
    try:
        daemon = cls(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return daemon.run()
    except JoinRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
