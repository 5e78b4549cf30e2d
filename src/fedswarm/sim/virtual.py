"""A virtual-client worker: one process holding many client sessions on one `grpc.aio` event loop.

Each virtual client is a real session with the coordinator (its own connection, Join, heartbeats,
PullTask long-poll, client id and token) and its own data partition I/N. The sampled ones train one
at a time, on one model instance shared by the whole worker, in a single training thread so the
event loop keeps every other session's heartbeats going. Virtual clients keep no state between
tasks (optimizer moments and the error-feedback residual start at zero each task, as in Flower's
simulation engine); the daemon keeps both.

Run by sim/virtual_sim.py as `python -m fedswarm.sim.virtual SPEC_JSON` (local backend) or as a Ray
task calling `run_worker` (ray backend)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import grpc
import torch

from fedswarm.client import work
from fedswarm.client.aio_session import AsyncSession, open_aio_channel
from fedswarm.client.daemon import DigestMismatch, reconstruct
from fedswarm.client.secagg_client import SecAggClient
from fedswarm.client.session import ClientTimeouts
from fedswarm.client.trainer import LocalTrainer, resolve_device, resolve_precision
from fedswarm.data import BatchSampler, load_train_tokens
from fedswarm.models import build_model
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.run_config import RunConfig
from fedswarm.secagg import SecAggError
from fedswarm.sim.version_cache import VersionCache

log = logging.getLogger("fedswarm.virtual")
RESULT_PREFIX = "worker-result "


@dataclass
class WorkerSpec:
    """What one worker runs: virtual clients first..first+count-1 of `total`."""

    coordinator: str
    first: int
    count: int
    total: int
    data: str = "stdlib"
    precision: str = "auto"
    device: str = "cpu"
    threads: int = 1                  # torch threads of the training thread
    seed: int = 0                     # picks dropouts and stragglers (with the client index and round)
    dropout_rate: float = 0.0         # chance a sampled client silently leaves instead of training
    straggler_rate: float = 0.0       # chance a sampled client delays its upload
    straggler_delay_s: float = 5.0    # how long a straggler waits before uploading
    join_concurrency: int = 32        # Joins in flight at once (a thousand at once is a storm)
    version_cache_mb: float = 512.0   # model versions the worker keeps for its clients' delta downloads
    timeouts: dict = field(default_factory=lambda: {"give_up_s": 120.0})

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class WorkerStats:
    trained: int = 0                  # updates accepted by the coordinator
    refused: int = 0                  # uploads the coordinator refused (task closed, ...)
    dropped: list = field(default_factory=list)       # names of clients that left
    stragglers: int = 0
    lost_leases: int = 0              # sessions the coordinator forgot (re-joined)
    finished: int = 0                 # clients that saw TASK_DONE
    train_seconds: float = 0.0
    downloads_delta: int = 0          # downloads that were delta steps from the version the client held
    downloads_full: int = 0           # full float32 copies (the client held no version the worker still keeps)
    versions_evicted: int = 0         # versions the worker dropped to stay within --virtual-version-cache


def client_name(index: int) -> str:
    return f"v{index:04d}"


def _roll(seed: int, index: int, rnd: int, what: str) -> float:
    """A deterministic uniform [0, 1) draw per (seed, client, round, what)."""
    digest = hashlib.sha256(f"{seed}/{index}/{rnd}/{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


class Trainer:
    """The worker's one model, trained for one virtual client at a time (call from one thread only)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.precision = resolve_precision(spec.precision, self.device)
        self.model: torch.nn.Module | None = None

    def train(self, index: int, run_cfg: RunConfig, task: pb.Task, base: dict[str, torch.Tensor],
              secagg: SecAggClient | None = None) -> tuple[list[bytes], int, float, float, bytes]:
        """(serialized parts, num_examples, train_loss, seconds, base digest) of virtual client `index` on `task`;
        with `secagg` (--secure-aggregation) the parts are its masked vector."""
        if self.model is None:
            self.model = build_model(run_cfg.model, seed=run_cfg.seed)
        tokens = load_train_tokens(self.spec.data, index, self.spec.total)
        key = f"{run_cfg.seed}/{index}/{self.spec.total}/{task.round}"
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
        sampler = BatchSampler(tokens, run_cfg.seq_len, run_cfg.batch_size, seed)
        trainer = LocalTrainer(self.model, sampler, self.device, self.precision, lr=run_cfg.lr,
                               inner_optimizer=run_cfg.inner_optimizer)
        delta, result = work.train_on_task(trainer, run_cfg, task, base)
        if secagg is not None:
            parts = secagg.masked_parts(task.round, delta)
        else:
            parts = work.encode_delta(C.ErrorFeedback.for_run(run_cfg), delta)
        return parts, result.num_examples, result.train_loss, result.seconds, wire.state_digest(base)


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.timeouts = ClientTimeouts(**spec.timeouts)
        self.stats = WorkerStats()
        self.trainer = Trainer(spec)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")  # one model, one at a time
        self.join_gate = asyncio.Semaphore(spec.join_concurrency)
        self.versions = VersionCache(int(spec.version_cache_mb * (1 << 20)))

    async def run(self) -> WorkerStats:
        clients = [asyncio.create_task(self.client(self.spec.first + i), name=client_name(self.spec.first + i))
                   for i in range(self.spec.count)]
        try:  # one client failing unexpectedly fails the worker, loudly
            done, _ = await asyncio.wait(clients, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            self.pool.shutdown(wait=True)
        cache = self.versions.stats
        self.stats.downloads_delta, self.stats.downloads_full = cache.deltas, cache.full
        self.stats.versions_evicted = cache.evicted
        return self.stats

    async def client(self, index: int) -> None:
        """One virtual client: its lives until the run is done. A dropout ends it, except with
        --secure-aggregation, where it comes back as a new session once its lease has run out."""
        life = 0
        while (back_in := await self.life(index, life)) is not None:
            await asyncio.sleep(back_in)
            life += 1

    async def life(self, index: int, life: int) -> float | None:
        """Join, then pull and train until the run is done (None) or the client drops out (None, or with
        secure aggregation the seconds until it comes back)."""
        channel = open_aio_channel(self.spec.coordinator, timeouts=self.timeouts)
        session = AsyncSession(channel, client_name(index), self.timeouts)
        beats, secagg = None, SecAggClient()
        try:
            async with self.join_gate:
                await session.join()
            beats = asyncio.create_task(session.heartbeats())
            while True:
                task = await session.pull()
                if task.kind == pb.TASK_DONE:
                    self.stats.finished += 1
                    return None
                if task.kind not in (pb.TASK_TRAIN, pb.TASK_SECAGG):
                    continue
                if self._drops(index, life, task, session.run_cfg.secure_aggregation):
                    log.info("%s leaves silently in round %d (dropout)", session.name, task.round)
                    self.stats.dropped.append(session.name)
                    # no more heartbeats or polls: its lease runs out and its task fails
                    return 1.5 * session.joined.lease_s if session.run_cfg.secure_aggregation else None
                if task.kind == pb.TASK_SECAGG:
                    await self.secagg_stage(session, secagg, task)
                else:
                    await self.train(index, session, task, secagg)
        finally:
            session.close()
            if beats is not None:
                await asyncio.gather(beats, return_exceptions=True)
            self.stats.lost_leases += session.lost_leases
            await channel.close()

    def _drops(self, index: int, life: int, task: pb.Task, secure: bool) -> bool:
        """Whether the client leaves at this task: at a train task, or with secure aggregation half the dropouts
        at the unmask stage instead (after sending the masked vector)."""
        roll = _roll(self.spec.seed, index, task.round, "dropout" if life == 0 else f"dropout/{life}")
        if roll >= self.spec.dropout_rate:
            return False
        after_masking = secure and roll < self.spec.dropout_rate / 2
        if task.kind == pb.TASK_TRAIN:
            return not after_masking
        return after_masking and json.loads(task.config_json).get("secagg-stage") == "unmask"

    async def secagg_stage(self, session: AsyncSession, secagg: SecAggClient, task: pb.Task) -> None:
        """Answer a secure-aggregation stage (client/secagg_client.py); a protocol error sits the round out."""
        try:
            reply = await asyncio.to_thread(secagg.answer, session.client_id, task)
        except SecAggError as err:
            log.warning("%s: round %d: secure aggregation: %s", session.name, task.round, err)
            return
        reply.client_id, reply.session_token = session.client_id, session.token
        await session.with_retry("secure-aggregation answer",
                                 lambda: session.stub.PushSecAgg(reply, timeout=session.t.rpc_s))

    async def download(self, index: int, session: AsyncSession, task: pb.Task) -> dict[str, torch.Tensor]:
        """The task's weights: delta steps from the version this client holds (if the worker still keeps it),
        as a daemon downloads them, else a full copy; what it now holds is kept for its next task."""
        held = self.versions.held(index)
        codec = C.CodecSpec.of(session.run_cfg, "download")

        async def fetch(held):
            chunks = await session.fetch_chunks(task.task_id, held.version if held else None,
                                                held.digest if held else b"")
            got = await asyncio.to_thread(reconstruct, chunks, held, codec)
            got.wire_bytes = sum(c.ByteSize() for c in chunks)
            return got
        try:
            got = await fetch(held)
        except DigestMismatch as err:
            log.warning("%s; downloading a full copy", err)
            got = await fetch(None)
        return self.versions.downloaded(index, got).state

    async def train(self, index: int, session: AsyncSession, task: pb.Task, secagg: SecAggClient) -> None:
        if session.run_cfg.secure_aggregation and not secagg.ready(task.round):
            log.warning("%s: round %d: no secure-aggregation keys for it (joined mid-round): sitting it out",
                        session.name, task.round)
            return
        base = await self.download(index, session, task)
        loop = asyncio.get_running_loop()
        parts, examples, loss, seconds, digest = await loop.run_in_executor(
            self.pool, self.trainer.train, index, session.run_cfg, task, base,
            secagg if session.run_cfg.secure_aggregation else None)
        self.stats.train_seconds += seconds
        if _roll(self.spec.seed, index, task.round, "straggler") < self.spec.straggler_rate:
            self.stats.stragglers += 1
            await asyncio.sleep(self.spec.straggler_delay_s)
        c = session.creds
        chunks = work.update_stream(parts, client_id=c.client_id, token=c.token, run_id=c.run_id, task=task,
                                    num_tensors=len(base), num_examples=examples, train_loss=loss, seconds=seconds,
                                    base_digest=digest)
        try:
            await session.push(chunks)
            self.stats.trained += 1
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):
                raise
            self.stats.refused += 1
            log.warning("%s: round %d upload refused: %s", session.name, task.round, err.details())


def run_worker(spec: WorkerSpec | dict) -> dict:
    """Run one worker to the end of the run; returns its WorkerStats as a dict."""
    if isinstance(spec, dict):
        spec = WorkerSpec(**spec)
    torch.set_num_threads(max(1, spec.threads))

    async def main() -> WorkerStats:
        return await Worker(spec).run()
    return asdict(asyncio.run(main()))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        print("usage: python -m fedswarm.sim.virtual SPEC_JSON", file=sys.stderr)
        return 2
    stats = run_worker(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
