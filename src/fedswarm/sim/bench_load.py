"""`fedswarm bench load`: how many client sessions one coordinator holds.

For each N, a real coordinator process and N lightweight sessions in load-worker processes (each
one `grpc.aio` event loop; sessions do what the daemon does: Join, heartbeat at the coordinator's
interval, long-poll PullTask, and when sampled download the model and upload a minimal valid
update, a zero delta in the run's codec). Prints members held, heartbeat and Status latency
(p50, p99), rounds per minute and the coordinator's RSS. Loopback only; every loop is bounded by
--seconds (plus the join ramp)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from fedswarm.client import work
from fedswarm.client.aio_session import AsyncSession, assemble, open_aio_channel
from fedswarm.client.daemon import ClientTimeouts
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.run_config import RunConfig

log = logging.getLogger("fedswarm.bench.load")
RESULT_PREFIX = "load-result "
STARTED = "load-worker started"
WORKER_START_S = 300.0         # a worker process must be up (imports done) within this
SESSIONS_PER_WORKER = 500
STATUS_TIMEOUT_S = 30.0        # a Status slower than this counts as this long
MAX_SEARCH = 16384             # --max stops doubling here
HOLDS_STATUS_P99_S = 1.0       # "holds N": every member kept, no lease lost, Status p99 under this


@dataclass
class LoadSpec:
    coordinator: str
    first: int
    count: int
    run_for_s: float                  # the worker stops every session after this long
    join_concurrency: int = 32
    timeouts: dict = field(default_factory=lambda: {"rpc_s": 10.0, "give_up_s": 30.0})


# ---------------------------------------------------------------- load worker (its own process)

async def _session_life(spec: LoadSpec, index: int, gate: asyncio.Semaphore, deadline: float,
                        zeros: "ZeroUpdates", samples: list, totals: dict) -> None:
    channel = open_aio_channel(spec.coordinator)
    session = AsyncSession(channel, f"load-{index:05d}", ClientTimeouts(**spec.timeouts),
                           on_latency=lambda kind, s: samples.append((kind, round(time.time(), 3), round(s, 5))))
    beats = None
    try:
        async with gate:
            await session.join()
        totals["joined"] += 1
        beats = asyncio.create_task(session.heartbeats())
        while time.monotonic() < deadline:
            try:
                task = await asyncio.wait_for(session.pull(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            if task.kind == pb.TASK_DONE:
                break
            if task.kind == pb.TASK_TRAIN:
                await _minimal_update(session, task, zeros, totals)
    except grpc.aio.AioRpcError as err:
        totals["errors"][err.code().name] = totals["errors"].get(err.code().name, 0) + 1
    finally:
        session.close()
        if beats is not None:
            await asyncio.gather(beats, return_exceptions=True)
        totals["lost_leases"] += session.lost_leases
        for code, n in session.heartbeat_failures.items():
            totals["heartbeat_failures"][code] = totals["heartbeat_failures"].get(code, 0) + n
        await channel.close()


class ZeroUpdates:
    """The minimal valid update of a round: a zero delta in the run's codec, with the digest of the
    round's weights. Every sampled session of a round would send the same bytes, so a worker
    encodes them once per round (off the event loop) and the sessions only download and upload."""

    def __init__(self):
        self._by_round: dict[int, asyncio.Future] = {}

    async def get(self, task: pb.Task, parts: list[pb.TensorPart], cfg: RunConfig) -> tuple[list[bytes], int, bytes]:
        if task.round not in self._by_round:
            self._by_round = {task.round: asyncio.ensure_future(asyncio.to_thread(self._encode, parts, cfg))}
        return await self._by_round[task.round]

    @staticmethod
    def _encode(parts: list[pb.TensorPart], cfg: RunConfig) -> tuple[list[bytes], int, bytes]:
        base = assemble(parts)
        feedback = C.ErrorFeedback.for_run(cfg)
        return (work.encode_delta(feedback, {n: t.new_zeros(t.shape) for n, t in base.items()}), len(base),
                wire.state_digest(base))


async def _minimal_update(session: AsyncSession, task: pb.Task, zeros: ZeroUpdates, totals: dict) -> None:
    """Download the task's model and upload a zero delta (valid, and costs no training)."""
    cfg = session.run_cfg
    raw_parts, num_tensors, digest = await zeros.get(task, await session.fetch_parts(task.task_id), cfg)
    examples = cfg.local_steps * cfg.grad_accum * cfg.batch_size
    chunks = work.update_stream(raw_parts, client_id=session.client_id, token=session.token, run_id=session.run_id,
                                task=task, num_tensors=num_tensors, num_examples=examples, train_loss=1.0,
                                seconds=0.0, base_digest=digest)
    try:
        await session.push(chunks)
        totals["uploads"] += 1
    except grpc.aio.AioRpcError as err:
        totals["upload_failures"] += 1
        log.warning("%s: upload refused: %s %s", session.name, err.code().name, err.details())


def run_load_worker(spec: LoadSpec) -> dict:
    async def main() -> dict:
        samples: list = []
        totals = {"joined": 0, "uploads": 0, "upload_failures": 0, "lost_leases": 0,
                  "heartbeat_failures": {}, "errors": {}}
        gate, deadline = asyncio.Semaphore(spec.join_concurrency), time.monotonic() + spec.run_for_s
        zeros = ZeroUpdates()
        sessions = [asyncio.create_task(_session_life(spec, spec.first + i, gate, deadline, zeros, samples, totals))
                    for i in range(spec.count)]
        # SIGTERM (the driver, once it measured): end every session now, then report
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: [s.cancel() for s in sessions])
        await asyncio.gather(*sessions, return_exceptions=True)
        return {**totals, "samples": samples}
    return asyncio.run(main())


# ---------------------------------------------------------------- driver

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default="100,1000",
                   help="session counts to try, comma-separated (default 100,1000)")
    p.add_argument("--max", action="store_true",
                   help=f"then keep doubling N until the coordinator no longer holds it (up to {MAX_SEARCH})")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per N, after every session joined")
    p.add_argument("--ramp", type=float, default=0.0,
                   help="seconds allowed for the N joins before measuring anyway (0: 30 s + N / 20 per s)")
    p.add_argument("--clients-per-round", type=int, default=10, help="sessions sampled per round")
    p.add_argument("--model", default="gpt2-tiny", help="model the coordinator serves (uploads are zero deltas of it)")
    p.add_argument("--workers", type=int, default=0,
                   help=f"load-worker processes (0: one per {SESSIONS_PER_WORKER} sessions)")
    p.add_argument("--out", default="bench-out/load", help="folder for logs and load.json")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MB of a live process, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(n: int, args: argparse.Namespace, log_line=print) -> dict:
    """One coordinator, n sessions; returns the figures for the table."""
    from fedswarm.sim.processes import Proc, coordinator_process, fetch_status

    out = Path(args.out) / f"n{n}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    per_round = max(1, min(args.clients_per_round, n))
    ramp_s = args.ramp or 30.0 + n / 20
    coord_args = ["--state-dir", str(out / "state"), "--rounds", "100000", "--min-clients", str(per_round),
                  "--clients-per-round", str(per_round), "--model", args.model, "--local-steps", "1",
                  "--batch-size", "2", "--seq-len", "32", "--round-timeout", "60",
                  "--max-connections-per-address", str(max(1024, n + 64))]   # every session dials from here
    workers = args.workers or math.ceil(n / SESSIONS_PER_WORKER)
    bounds = [n * w // workers for w in range(workers + 1)]
    with coordinator_process(out, coord_args) as (coordinator, address):
        idle_rss, _ = _rss_mb(coordinator.pid)
        run_for = ramp_s + args.seconds + 60   # a bound only: the driver stops them by SIGTERM
        procs = [Proc(f"load-{w}", [sys.executable, "-m", "fedswarm.sim.bench_load",
                                    json.dumps(asdict(LoadSpec(address, lo, hi - lo, run_for)))],
                      out / f"load-{w}.log") for w, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
        try:
            for proc in procs:  # the ramp counts from when the workers are up, not from their launch
                proc.wait_for_line(re.compile(STARTED), WORKER_START_S)
            started = time.monotonic()
            members, status_s, rounds_seen = [], [], []

            def probe() -> int:
                t0 = time.perf_counter()
                try:
                    status = fetch_status(address, timeout=STATUS_TIMEOUT_S)
                except grpc.RpcError:
                    status_s.append(STATUS_TIMEOUT_S)
                    return -1
                status_s.append(time.perf_counter() - t0)
                rounds_seen.append((time.monotonic(), status["round"]))
                return status["clients_total"]   # every session (the list is bounded)

            while time.monotonic() - started < ramp_s and probe() < n:   # the join ramp
                time.sleep(0.5)
            ramp_took = time.monotonic() - started
            status_s.clear()
            rounds_seen.clear()
            window_start, window_wall = time.monotonic(), time.time()
            while time.monotonic() - window_start < args.seconds:   # the measured window
                members.append(probe())
                time.sleep(max(0.0, 1.0 - (status_s[-1] if status_s else 0)))
            window_end_wall = time.time()
            rss, peak = _rss_mb(coordinator.pid)
            results = []
            for proc in procs:
                proc.stop(grace=60)   # SIGTERM: the worker ends its sessions and prints its result
                # the result line holds every latency sample (hundreds of kB at 500 sessions): read the whole log
                lines = [ln for ln in proc.full_output().splitlines() if ln.startswith(RESULT_PREFIX)]
                if not lines:
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} and no result; "
                                       f"see {proc.log_path}")
                results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
        finally:
            for proc in procs:
                proc.stop()
    beats = [s for r in results for kind, at, s in r["samples"]
             if kind == "heartbeat" and window_wall <= at <= window_end_wall]
    committed = [r for _, r in rounds_seen]
    span_min = (rounds_seen[-1][0] - rounds_seen[0][0]) / 60 if len(rounds_seen) > 1 else 0
    held = [m for m in members if m >= 0]
    row = {
        "sessions": n, "joined": sum(r["joined"] for r in results), "ramp_s": round(ramp_took, 1),
        "members_min": min(held) if held else 0, "members_end": held[-1] if held else 0,
        "lost_leases": sum(r["lost_leases"] for r in results),
        "heartbeat_failures": _merge(r["heartbeat_failures"] for r in results),
        "errors": _merge(r["errors"] for r in results),
        "heartbeat_p50_ms": _ms(_percentile(beats, 50)), "heartbeat_p99_ms": _ms(_percentile(beats, 99)),
        "heartbeats": len(beats),
        "status_p50_ms": _ms(_percentile(status_s, 50)), "status_p99_ms": _ms(_percentile(status_s, 99)),
        "status_calls": len(status_s), "status_timeouts": sum(1 for s in status_s if s >= STATUS_TIMEOUT_S),
        "rounds_per_min": round((committed[-1] - committed[0]) / span_min, 2) if span_min else 0.0,
        "uploads": sum(r["uploads"] for r in results),
        "coordinator_rss_mb": round(rss, 1), "coordinator_peak_rss_mb": round(peak, 1),
        "coordinator_idle_rss_mb": round(idle_rss, 1), "seconds": args.seconds,
    }
    row["holds"] = (row["members_min"] == n and row["lost_leases"] == 0 and row["status_timeouts"] == 0
                    and (row["status_p99_ms"] or 0) < HOLDS_STATUS_P99_S * 1000)
    log_line(f"N={n}: {'holds' if row['holds'] else 'does NOT hold'}: members min {row['members_min']}, "
             f"lost leases {row['lost_leases']}, status p99 {row['status_p99_ms']} ms")
    return row


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _merge(counters) -> dict:
    total: dict = {}
    for c in counters:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def table(rows: list[dict]) -> str:
    lines = ["| sessions | held (min / end) | lost leases | heartbeat p50 / p99 ms | Status p50 / p99 ms "
             "| rounds/min | coordinator RSS MB (idle / end / peak) | holds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sessions']} | {r['members_min']} / {r['members_end']} | {r['lost_leases']} "
                     f"| {r['heartbeat_p50_ms']} / {r['heartbeat_p99_ms']} | {r['status_p50_ms']} / {r['status_p99_ms']} "
                     f"| {r['rounds_per_min']} | {r['coordinator_idle_rss_mb']} / {r['coordinator_rss_mb']} / "
                     f"{r['coordinator_peak_rss_mb']} | {'yes' if r['holds'] else 'no'} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        sizes = [int(x) for x in str(args.clients).split(",") if x.strip()]
    except ValueError:
        print(f"error: --clients {args.clients!r}: give session counts like 100,1000", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 1 or args.seconds <= 0 or args.clients_per_round < 1:
        print("error: --clients needs counts >= 1, --seconds > 0 and --clients-per-round >= 1", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # a connection per session, in the children too
    rows: list[dict] = []
    Path(args.out).mkdir(parents=True, exist_ok=True)

    def run(n: int) -> None:
        rows.append(measure(n, args))
        (Path(args.out) / "load.json").write_text(json.dumps(rows, indent=1))   # kept as it grows

    for n in sizes:
        run(n)
    while args.max and rows[-1]["holds"] and rows[-1]["sessions"] * 2 <= MAX_SEARCH:
        run(rows[-1]["sessions"] * 2)
    print(f"\n{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}); {args.clients_per_round} sampled "
          f"per round, {args.model}, {args.seconds:.0f} s measured per N:\n")
    print(table(rows))
    return 0


if __name__ == "__main__":   # a load worker: python -m fedswarm.sim.bench_load SPEC_JSON
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(STARTED, flush=True)
    result = run_load_worker(LoadSpec(**json.loads(sys.argv[1])))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a stop that comes now must not lose the result
    print(RESULT_PREFIX + json.dumps(result), flush=True)
