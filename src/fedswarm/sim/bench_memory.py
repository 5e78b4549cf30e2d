"""`fedswarm bench memory`: peak RSS and seconds per step with and without --gradient-checkpointing, at real size.

The model is a 124M GPT-2 shape (12 layers, 768 wide, 12 heads, GPT-2's 50257-token vocabulary) built on the
spot with random weights. Each configuration runs in a fresh process, so its peak RSS (VmHWM) is its own:

- client: a federated client's LocalTrainer (AdamW; --precision auto: fp32 unless the CPU has native bf16)
  on the whole model; client-muon: the same with --inner-optimizer muon (Muon on the hidden matrices);
- peer: a swarm peer's StageServer on stage 0 of 2 (the embeddings and 6 blocks, built alone from its
  tensors), `--inflight` micro-batches forward (their graphs cached, as a peer keeps them) then backward.

    python -m fedswarm.sim.bench_memory --child '{"part": "client", "checkpointing": true, ...}'
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedswarm.run_config import RunConfig

GPT2_124M = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
PARTS = ("client", "client-muon", "peer")
CHILD_TIMEOUT_S = 1800.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-parts", default="client,peer",
                   help="memory: what to measure, of client (the whole model, AdamW), client-muon (the same, "
                        "--inner-optimizer muon) and peer (stage 0 of 2)")
    p.add_argument("--memory-steps", type=int, default=3, help="memory: timed steps per configuration (after one warm-up)")


def _memory_mb() -> dict[str, float]:
    from fedswarm.sim.peer_memory import proc_memory_mb

    return proc_memory_mb()


def _client(spec: dict, model: str) -> tuple[float, list[tuple[float, float]]]:
    """(RSS after the build, (wall, CPU) seconds of each step) of a LocalTrainer on the whole model."""
    import numpy as np
    import torch

    from fedswarm.client.trainer import LocalTrainer, resolve_precision
    from fedswarm.data import BatchSampler
    from fedswarm.models import build_model, trainable_state

    net = build_model(model, seed=0)
    tokens = np.random.default_rng(0).integers(0, GPT2_124M["vocab_size"], 200_000, dtype=np.int64)
    sampler = BatchSampler(tokens, spec["seq_len"], spec["batch_size"], 0)
    cpu = torch.device("cpu")
    trainer = LocalTrainer(net, sampler, cpu, resolve_precision(spec["precision"], cpu), lr=1e-4,
                           gradient_checkpointing=spec["checkpointing"],
                           inner_optimizer="muon" if spec["part"] == "client-muon" else "adamw")
    built = _memory_mb()["rss_mb"]
    state, times = trainable_state(net), []
    for _ in range(spec["steps"] + 1):
        cpu_started = time.process_time()
        state = (result := trainer.train_round(state, local_steps=1)).state
        times.append((result.seconds, time.process_time() - cpu_started))
    return built, times[1:]


def _peer(spec: dict, model: str) -> tuple[float, list[tuple[float, float]]]:
    """(RSS after the build, (wall, CPU) seconds of each step: inflight forwards, then their backwards) of
    stage 0 of 2."""
    import torch
    from transformers import AutoModelForCausalLM

    from fedswarm.client.swarm.roles import PeerStageServer
    from fedswarm.client.swarm.tensors import ids_to_bytes, to_wire
    from fedswarm.proto import codec as C
    from fedswarm.proto import fedswarm_pb2 as pb
    from fedswarm.stages import Stage, _untied_config

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Stage(AutoModelForCausalLM.from_config(_untied_config(model)), 0, 2)
                  .named_parameters()}
    state = {n: 0.02 * torch.randn(shape) for n, shape in shapes.items()}   # what a peer fetches
    B, T, D = spec["batch_size"], spec["seq_len"], GPT2_124M["n_embd"]
    cfg = RunConfig(model=model, mode="swarm", stages=2, seed=0, lr=1e-4, seq_len=T, batch_size=B,
                    activation_codec="bf16")
    from fedswarm.client.trainer import resolve_precision

    server = PeerStageServer("bench", cfg, torch.device("cpu"), resolve_precision(spec["precision"], torch.device("cpu")),
                             gradient_checkpointing=spec["checkpointing"])
    server.serve(0, state)
    del state
    built = _memory_mb()["rss_mb"]
    bf16 = C.CODEC_NAMES["bf16"]
    times = []
    for step in range(spec["steps"] + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        reqs = [pb.StageRequest(run_id="bench", stage=0, microbatch_id=f"{step}-{i}", ids_shape=[B, T],
                                ids=ids_to_bytes(torch.randint(0, GPT2_124M["vocab_size"], (B, T))))
                for i in range(spec["inflight"])]
        for req in reqs:
            server._timed_compute(req)   # forward: the graph is cached for the backward, as a peer's is
        for req in reqs:
            req.backward = True
            req.grad_output.CopyFrom(to_wire(torch.randn(B, T, D) * 1e-3, bf16))
            server._timed_compute(req)   # backward on the cached graph, and the stage's optimizer step
        times.append((time.perf_counter() - started, time.process_time() - cpu_started))
    server.close()
    return built, times[1:]


def _child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    model = spec["model_json"]
    before = _memory_mb()["rss_mb"]
    built, times = (_peer if spec["part"] == "peer" else _client)(spec, model)
    peak = _memory_mb()["peak_mb"]
    return {**{k: spec[k] for k in ("part", "checkpointing")}, "imports_mb": before, "built_mb": built,
            "peak_mb": peak, "training_mb": round(peak - built, 1),
            "seconds_per_step": round(statistics.median(t for t, _ in times), 2),
            "cpu_seconds_per_step": round(statistics.median(c for _, c in times), 2), "steps": len(times)}


def measure(spec: dict) -> dict:
    """One configuration in a fresh interpreter; its JSON line back."""
    proc = subprocess.run([sys.executable, "-m", "fedswarm.sim.bench_memory", "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench memory ({spec['part']}, checkpointing {spec['checkpointing']}) failed with "
                           f"{proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def bench_memory(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_json = out / "gpt2-124m.json"
    model_json.write_text(json.dumps(GPT2_124M))
    parts = [p.strip() for p in args.memory_parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        raise ValueError(f"--memory-parts {args.memory_parts!r}: choose from {', '.join(PARTS)}")
    threads = args.threads or os.cpu_count() or 1
    precision = _precision(args.precision)
    runs = []
    for part in parts:
        for checkpointing in (False, True):
            print(f"{part}, gradient checkpointing {'on' if checkpointing else 'off'} ...", flush=True)
            runs.append(measure({"part": part, "checkpointing": checkpointing, "model_json": str(model_json),
                                 "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.memory_steps,
                                 "precision": precision, "inflight": args.inflight, "threads": threads}))
    table = _table(runs, args, threads, precision)
    print("\n" + table)
    result = {"runs": runs, "table": table}
    (out / "bench-memory.json").write_text(json.dumps(result, indent=2))
    return result


def _precision(precision: str) -> str:
    """auto: bf16 where the CPU multiplies bf16 natively (AVX-512 BF16 / AMX), else fp32: without them a bf16
    matmul runs a reference kernel, 50-100x slower than fp32 (measured: 35 s vs 0.44 s for 1024x768x3072)."""
    if precision != "auto":
        return precision
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def _table(runs: list[dict], args: argparse.Namespace, threads: int, precision: str) -> str:
    rows = []
    for r in runs:
        off = next(o for o in runs if o["part"] == r["part"] and not o["checkpointing"])
        what = {"client": "client (whole model)", "client-muon": "client (whole model), Muon"}.get(
            r["part"], f"peer (stage 0 of 2, {args.inflight} micro-batches in flight)")
        vs = "" if not r["checkpointing"] else (
            f"{r['peak_mb'] - off['peak_mb']:+.0f} MiB ({r['training_mb'] / max(off['training_mb'], 1e-9):.2f}x), "
            f"{r['cpu_seconds_per_step'] / off['cpu_seconds_per_step']:.2f}x")
        rows.append(f"| {what} | {'on' if r['checkpointing'] else 'off'} | {r['built_mb']:.0f} | {r['peak_mb']:.0f} "
                    f"| {r['training_mb']:.0f} | {r['seconds_per_step']:.1f} | {r['cpu_seconds_per_step']:.1f} | {vs} |")
    head = (f"| GPT-2 124M, batch {args.batch_size}x{args.seq_len}, {precision}, {threads} threads | checkpointing "
            "| RSS built MiB | peak MiB | peak above built MiB | s / step | CPU s / step "
            "| vs off: peak (above built), CPU time |")
    return "\n".join([head, "|---|---|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, help="one configuration as JSON")
    print(json.dumps(_child(json.loads(parser.parse_args().child))), flush=True)
