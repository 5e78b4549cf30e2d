"""`fedswarm bench aggregate`: the coordinator's peak RSS while it aggregates N uploads, against its idle RSS.

Each configuration runs a real `fedswarm coordinator` process; this process plays
N lightweight sessions over gRPC on loopback (join, long-poll the task, fetch the
model, upload a codec-encoded delta exactly as the client daemon does: same
header, same parts). Idle RSS is read once the coordinator has evaluated the
initial model and waits for clients; the peak (VmHWM, reset at that point through
/proc/PID/clear_refs) is read when aggregate_train has returned (the coordinator
logs it), and again once the round is committed (evaluation and checkpoint
included). Paths side by side:
`stream` (updates folded into a running sum, or spilled to disk for robust
strategies) and `hold` (Flower's stock path: every reply holds its weights).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fedswarm.client.session import ClientTimeouts, Session
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.sim.processes import coordinator_process, fetch_status, wait_until

AGGREGATED = re.compile(r"round 1 aggregated: RSS (\d+), peak RSS (\d+) bytes")
TARGET = 3.0   # peak above idle, in units of the model's fp32 size
RPC_S = 120.0


def add_aggregate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uploads", type=int, default=32, help="aggregate: uploads in the measured round")
    p.add_argument("--concurrency", type=int, default=1,
                   help="aggregate: uploads in flight at once (each holds its decoded delta until delivered)")
    p.add_argument("--paths", default="stream,hold", help="aggregate: coordinator --aggregation paths to compare")
    p.add_argument("--robust", default="", help="aggregate: also measure these strategies (e.g. fedmedian), spilled")


def _rss(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")   # VmHWM := VmRSS (Linux >= 4.0)


class BenchSession:
    """One client session (client/session.py: join, heartbeats, retries) doing a round as the daemon does,
    without training."""

    def __init__(self, address: str, index: int):
        self.session = Session(address, f"bench-{index}", precision="fp32",
                               timeouts=ClientTimeouts(rpc_s=RPC_S, transfer_s=RPC_S, pull_wait_s=20.0))
        self.session.join()   # its heartbeat thread keeps the lease while the others take their turn
        self.index = index

    def one_round(self) -> int:
        s = self.session
        task = pb.Task(kind=pb.TASK_NONE)
        while task.kind == pb.TASK_NONE:
            task = s.pull()
        if task.kind != pb.TASK_TRAIN:
            raise RuntimeError(f"bench-{self.index}: expected a training task, got kind {task.kind}")
        shapes = {}
        c = s.creds
        for chunk in s.stub.FetchModel(pb.FetchModelRequest(**c.ids(), task_id=task.task_id), timeout=RPC_S):
            shapes[chunk.part.name] = tuple(chunk.part.shape)
        upload = C.CodecSpec.of(s.run_cfg, "upload")
        gen = torch.Generator().manual_seed(self.index)
        parts = [pb.UpdateChunk(part=p).SerializeToString()
                 for name, shape in shapes.items()
                 for p in wire.tensor_parts(name, shape, upload.encode(
                     1e-3 * torch.randn(math.prod(shape), generator=gen)))]
        header = pb.UpdateHeader(client_id=c.client_id, session_token=c.token, task_id=task.task_id,
                                 round=task.round, num_examples=1 + self.index, train_loss=1.0,
                                 num_tensors=len(shapes), num_parts=len(parts), train_seconds=0.0)
        reply = s.push([pb.UpdateChunk(header=header).SerializeToString(), *parts])
        if not reply.accepted:
            raise RuntimeError(f"bench-{self.index}: upload refused: {reply.message}")
        return reply.bytes_received

    def close(self) -> None:
        self.session.close()


def measure(args: argparse.Namespace, path: str, strategy: str) -> dict:
    out = Path(args.out) / f"aggregate-{strategy}-{path}"
    shutil.rmtree(out / "state", ignore_errors=True)   # a fresh run each time
    coord_args = ["--state-dir", str(out / "state"), "--rounds", "1", "--min-clients", str(args.uploads),
                  "--model", args.model, "--upload-codec", args.upload_codec, "--strategy", strategy,
                  "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--lease", "60", "--round-timeout", "7200",
                  "--aggregation", path]
    with coordinator_process(out, coord_args) as (coordinator, address):
        wait_until("the initial model's evaluation", lambda: fetch_status(address)["rounds"], 300, watch=[coordinator])
        idle = _rss(coordinator.pid)["VmRSS"]
        _reset_peak(coordinator.pid)
        sessions = [BenchSession(address, i) for i in range(args.uploads)]
        try:
            with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
                sent = sum(pool.map(lambda s: s.one_round(), sessions))
            aggregated = coordinator.wait_for_line(AGGREGATED, 600)
            status = wait_until("round 1 to commit", lambda: (s := fetch_status(address))["round"] >= 1 and s,
                                600, watch=[coordinator])
            round_peak = _rss(coordinator.pid)["VmHWM"]
        finally:
            for s in sessions:
                s.close()
    record = status["rounds"][1]
    model_bytes = record["bytes_up_raw"] / args.uploads
    peak = int(aggregated.group(2))   # VmHWM when aggregate_train returned: uploads, folds and the strategy step
    return {"path": path, "strategy": strategy, "idle_rss": idle, "peak_rss": peak, "above_idle": peak - idle,
            "model_fp32_bytes": model_bytes, "ratio": (peak - idle) / model_bytes, "uploads": len(record["clients"]),
            "round_peak_rss": round_peak, "round_ratio": (round_peak - idle) / model_bytes, "bytes_sent": sent}


def bench_aggregate(args: argparse.Namespace) -> dict:
    runs = []
    configs = [(p.strip(), args.strategy) for p in args.paths.split(",") if p.strip()]
    configs += [(p, s.strip()) for s in args.robust.split(",") if s.strip() for p in ("stream", "hold")]
    for path, strategy in configs:
        print(f"{strategy}, {path}: {args.uploads} uploads of {args.model} ({args.upload_codec}), "
              f"{args.concurrency} at a time ...", flush=True)
        runs.append(measure(args, path, strategy))
        r = runs[-1]
        print(f"  idle {r['idle_rss'] / 2**20:.0f} MiB, peak {r['peak_rss'] / 2**20:.0f} MiB: "
              f"{r['ratio']:.2f}x the fp32 model above idle", flush=True)
    mb = 1 / 2**20
    rows = [f"| {r['strategy']} | {r['path']} | {r['uploads']} | {r['idle_rss'] * mb:.0f} | {r['peak_rss'] * mb:.0f} "
            f"| {r['above_idle'] * mb:.0f} | {r['ratio']:.2f} {'meets' if r['ratio'] <= TARGET else 'MISSES'} "
            f"(<= {TARGET:.0f}) | {r['round_ratio']:.2f} |" for r in runs]
    table = "\n".join(["| strategy | path | uploads | idle RSS MiB | peak RSS MiB (through aggregation) "
                       "| peak - idle MiB | (peak - idle) / fp32 model | same, through eval + checkpoint |",
                       "|---|---|---|---|---|---|---|---|", *rows])
    print(f"\n{args.model}: fp32 model {runs[0]['model_fp32_bytes'] * mb:.1f} MiB; {args.uploads} uploads "
          f"({args.upload_codec}), {args.concurrency} in flight at a time; a real coordinator process per row:\n")
    print(table)
    result = {"runs": runs, "table": table}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench-aggregate.json").write_text(json.dumps(result, indent=2))
    return result
