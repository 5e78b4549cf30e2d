"""`fedswarm bench`: side-by-side runs whose ratios go in the README."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import os
from pathlib import Path

from fedswarm.progress import Progress
from fedswarm.sim.bench_lora import add_arguments as add_lora_arguments
from fedswarm.sim.bench_lora import bench_lora
from fedswarm.run_config import RunConfig
from fedswarm.sim.bench_learning import add_arguments as add_learning_arguments
from fedswarm.sim.bench_learning import bench_learning
from fedswarm.sim.bench_aggregate import add_aggregate_arguments, bench_aggregate
from fedswarm.sim.bench_memory import add_arguments as add_memory_arguments
from fedswarm.sim.bench_scale import SCALE_DEFAULTS, bench_scale
from fedswarm.sim.bench_scale import add_arguments as add_scale_arguments
from fedswarm.sim.bench_privacy import DEFAULTS as PRIVACY_DEFAULTS
from fedswarm.sim.bench_privacy import add_arguments as add_privacy_arguments
from fedswarm.sim.bench_privacy import bench_privacy
from fedswarm.sim.launcher import add_arguments as add_sim_arguments
from fedswarm.sim.launcher import run_sim

BENCH_LEASE_S = 20.0
TARGETS = {"int8": (0.26, 0.01), "int4": (0.14, 0.03)}   # bytes ratio, eval-loss tolerance vs none


KINDS = {  # `fedswarm bench KIND` (sim/bench_load.py adds "load")
    "codecs": "upload bytes and final eval loss per codec vs none",
    "swarm": "tokens/s of the swarm vs one process, and with a peer killed every 30 s vs none",
    "threads": "seconds per round of a hand-started coordinator + 2 clients, defaults vs --threads 1",
    "lora": "bytes per round of full fine-tuning vs LoRA, codec none vs int8 (an HF model built here)",
    "learning": "federated held-out loss and traffic vs one process, same tokens",
    "aggregate": "coordinator peak RSS over idle while aggregating --uploads, streaming vs holding",
    "memory": "peak RSS and seconds per step of a 124M client and stage peer, with and without gradient checkpointing",
    "scale": "time per round and every process's peak RSS at 124M / 135M: full fine-tuning, LoRA, swarm",
    "privacy": "held-out loss against epsilon: no DP, then DP-FedAvg at each --noise-multipliers",
}
# settings whose default depends on the benchmark (None on the command line: _fill_defaults picks)
PER_BENCH = ("precision", "clients", "batch_size", "seq_len", "rounds", "local_steps", "eval_windows", "stages", "peers",
             "average_every")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=90.0, help="swarm: measured seconds per configuration")
    p.add_argument("--codecs", default="none,fp16,int8,int4",
                   help="codecs: the codecs to compare (none is always included)")
    add_aggregate_arguments(p)
    add_sim_arguments(p)
    add_learning_arguments(p)
    add_lora_arguments(p)
    add_memory_arguments(p)
    add_scale_arguments(p)
    add_privacy_arguments(p)
    p.set_defaults(out="bench-out", **dict.fromkeys(PER_BENCH))  # None: per benchmark


def _fill_defaults(args: argparse.Namespace) -> None:
    defaults = {"precision": "auto", "clients": 2, "batch_size": RunConfig.batch_size, "seq_len": RunConfig.seq_len, "rounds": 6,
                "local_steps": RunConfig.local_steps, "eval_windows": RunConfig.eval_windows,
                "stages": RunConfig.stages, "peers": 5, "average_every": RunConfig.average_every}
    if args.which == "learning":
        defaults.update(clients=4, batch_size=12, seq_len=64)
    if args.which == "memory":
        defaults.update(batch_size=2, seq_len=512)
    if args.which == "scale":
        defaults.update(SCALE_DEFAULTS)
    if args.which == "privacy":
        defaults.update(PRIVACY_DEFAULTS)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def bench_codecs(args: argparse.Namespace) -> dict:
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if codecs[0] != "none":
        codecs.insert(0, "none")
    runs = {}
    progress = Progress("bench codecs: rounds", len(codecs) * args.rounds)
    for i, codec in enumerate(codecs):
        sim_args = copy.copy(args)
        sim_args.upload_codec, sim_args.out, sim_args.quiet = codec, str(Path(args.out) / codec), True
        progress.line(f"running {codec} ({args.clients} clients, {args.rounds} rounds) ...")
        report = run_sim(sim_args, log=lambda *_: None,
                         on_round=lambda n, done=i * args.rounds: progress.update(done + n, f"bench codecs: {codec}"))
        rounds = [r for r in report["rounds"] if r["round"] > 0]
        runs[codec] = {
            "update_bytes": sum(r["bytes_up"] for r in rounds),
            "raw_bytes": sum(r["bytes_up_raw"] for r in rounds),
            "socket_bytes_up": report["socket_bytes"]["up"],
            "final_eval_loss": report["rounds"][-1]["eval_loss"],
            "initial_eval_loss": report["rounds"][0]["eval_loss"],
            "wall_seconds": report["wall_seconds"],
        }
    progress.close()
    base = runs["none"]
    rows = []
    for codec, r in runs.items():
        r["socket_ratio"] = r["socket_bytes_up"] / base["socket_bytes_up"]
        r["update_ratio"] = r["update_bytes"] / base["update_bytes"]
        r["loss_ratio"] = r["final_eval_loss"] / base["final_eval_loss"]
        target = TARGETS.get(codec)
        verdict = ""
        if target:
            ok = r["socket_ratio"] <= target[0] and abs(r["loss_ratio"] - 1) <= target[1]
            verdict = f"{'meets' if ok else 'MISSES'} (<= {target[0]}, within {target[1]:.0%})"
        rows.append(f"| {codec} | {r['socket_bytes_up'] / 1e6:.2f} | {r['socket_ratio']:.3f} | {r['update_ratio']:.3f} "
                    f"| {r['final_eval_loss']:.4f} | {r['loss_ratio']:.4f} | {verdict} |")
    table = "\n".join([
        "| codec | socket MB up | socket bytes vs none | update bytes vs none | final eval loss | loss vs none | target |",
        "|---|---|---|---|---|---|---|", *rows])
    print(f"\n{args.clients} clients, {args.rounds} rounds, {args.model}, seed {args.seed}, same data and schedule:\n")
    print(table)
    result = {"runs": runs, "table": table, "clients": args.clients, "rounds": args.rounds}
    (Path(args.out) / "bench-codecs.json").write_text(json.dumps(result, indent=2))
    return result


def single_process_tokens_per_s(args: argparse.Namespace, seconds: float) -> float:
    """The same model trained in one process on all cores: the swarm's yardstick."""
    import os
    import time

    import torch

    from fedswarm.client.trainer import LocalTrainer, resolve_precision
    from fedswarm.data import BatchSampler, load_train_tokens
    from fedswarm.models import trainable_state
    from fedswarm.stages import build_untied_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = build_untied_model(args.model, seed=args.seed)
    sampler = BatchSampler(load_train_tokens(args.data, 0, 1), args.seq_len, args.batch_size, args.seed)
    device = torch.device("cpu")
    trainer = LocalTrainer(model, sampler, device, resolve_precision(args.precision, device), lr=args.lr)
    state = trainable_state(model)
    state = trainer.train_round(state, 5).state      # warm-up
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        state = trainer.train_round(state, 10).state
        steps += 10
    return steps * args.batch_size * args.seq_len / (time.perf_counter() - start)


def _steady_rate(report: dict, warmup: float = 10.0) -> float:
    """Tokens/s between the first completed micro-batch + warmup and the end of the run."""
    tl = [p for p in report["timeline"] if p["tokens"] > 0]
    if len(tl) < 2:
        return 0.0
    start = next((p for p in tl if p["t"] >= tl[0]["t"] + warmup), tl[0])
    end = tl[-1]
    return (end["tokens"] - start["tokens"]) / max(end["t"] - start["t"], 1e-9)


def _peer_memory_rows(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """Peer memory on stage 0 (the largest: it holds the embeddings), stage-only vs the old full-model build."""
    from fedswarm.sim.peer_memory import measure_peer_memory

    print(f"peer memory, stage 0 of {args.stages}: stage-only vs full-model build ...", flush=True)
    measured = measure_peer_memory(args.model, args.stages, args.seed, args.batch_size, args.seq_len, which=[0])
    by_build = {m["build"]: m for m in measured}
    label = {"stage": "stage only (meta construction, its tensors from the coordinator)",
             "full": "whole model built, then the stage cut out (the old path)"}
    rows = [f"| {label[b]} | {m['rss_mb']:.0f} | {m['peak_mb']:.0f} | {m['peak_mb'] - m['imports_mb']:.0f} |"
            for b, m in by_build.items()]
    return rows, measured


def _memory_table(args: argparse.Namespace, rows: list[str], runs: dict) -> str:
    for name, run in runs.items():
        mem = run.get("peer_memory") or {}
        if mem:
            rss = sorted(m["rss_mb"] for m in mem.values())
            peak = sorted(m["peak_mb"] for m in mem.values())
            rows.append(f"| {len(mem)} real peers at the end of '{name}' (stage only), min-max "
                        f"| {rss[0]:.0f}-{rss[-1]:.0f} | {peak[0]:.0f}-{peak[-1]:.0f} | |")
    return "\n".join([f"| peer process ({args.model}, {args.stages} stages, batch {args.batch_size}x{args.seq_len}) "
                      "| RSS MiB | peak MiB | peak above imports MiB |", "|---|---|---|---|", *rows])


def _swarm_run(args: argparse.Namespace, name: str, out: str, **overrides) -> dict:
    from fedswarm.sim.swarm_sim import run_swarm_sim

    sim_args = copy.copy(args)
    sim_args.mode, sim_args.quiet, sim_args.out = "swarm", True, str(Path(args.out) / out)
    sim_args.rounds, sim_args.duration, sim_args.duration_from_first_tokens = 10_000, args.seconds + 10.0, True
    sim_args.lease = BENCH_LEASE_S   # no faults here: a lease long enough that peers starting under load keep it
    for key, value in overrides.items():
        setattr(sim_args, key, value)
    print(f"{name}, {args.seconds:.0f} s after the first micro-batch ...", flush=True)
    report = run_swarm_sim(sim_args, log=lambda *_: None)
    return {"tokens_per_s": _steady_rate(report), "lost": report["swarm"]["microbatches_lost"],
            "replayed": report["swarm"]["microbatches_retried"],
            "completed": report["swarm"]["microbatches_completed"],
            "kills": sum(f["kind"] == "SIGKILL" for f in report["faults"]),
            "reassignments": len(report["swarm"]["reassignments"]),
            "final_eval_loss": report["rounds"][-1]["eval_loss"] if report["rounds"] else None,
            "peer_memory": report.get("peer_memory", {})}


def bench_swarm_hosts(args: argparse.Namespace) -> dict:
    """Every process on its own namespace host: relayed vs chained stage traffic, host links capped at
    --host-bandwidth (50mbit) vs uncapped; then peer memory, stage-only vs the whole model."""
    rates = (args.host_bandwidth or "50mbit", "")
    runs = {}
    for rate in rates:
        for traffic in ("relayed", "chained"):
            name = f"{rate or 'uncapped'}, {traffic}"
            runs[name] = _swarm_run(args, name, f"{rate or 'uncapped'}-{traffic}", hosts=True, host_bandwidth=rate,
                                    swarm_traffic=traffic)
    hosts = 1 + args.peers + args.trainers
    rows = []
    for name, r in runs.items():
        rate, traffic = name.split(", ")
        relayed = runs[f"{rate}, relayed"]["tokens_per_s"]
        uncapped = runs[f"uncapped, {traffic}"]["tokens_per_s"]
        rows.append(f"| {rate} links, {traffic} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / max(relayed, 1e-9):.2f} "
                    f"| {r['tokens_per_s'] / max(uncapped, 1e-9):.2f} | {r['completed']} | {r['replayed']} | {r['lost']} |")
    table = "\n".join([f"| {args.stages} stages, {args.peers} peers, {args.trainers} trainer on {hosts} hosts "
                       "| tokens/s | vs relayed | vs uncapped | micro-batches | replayed | lost |",
                       "|---|---|---|---|---|---|---|", *rows])
    memory_rows, measured = _peer_memory_rows(args)
    memory = _memory_table(args, memory_rows, runs)
    print(f"\n{args.seconds:.0f} s measured per configuration (from the first micro-batch + 10 s), {args.model}, "
          f"batch {args.batch_size}x{args.seq_len}, {args.precision} precision, {os.cpu_count()} cores, one run:\n")
    print(table + "\n\n" + memory)
    result = {"runs": runs, "peer_memory": measured, "table": table, "memory_table": memory}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench-swarm-hosts.json").write_text(json.dumps(result, indent=2))
    return result


def bench_swarm(args: argparse.Namespace) -> dict:
    from fedswarm.sim.swarm_sim import run_swarm_sim

    if args.hosts:
        return bench_swarm_hosts(args)
    print(f"single process, {args.seconds:.0f} s ...", flush=True)
    single = single_process_tokens_per_s(args, args.seconds)
    runs = {}
    for name, kill_every in (("swarm", 0.0), ("swarm, kill every 30 s", 30.0)):
        sim_args = copy.copy(args)
        sim_args.mode, sim_args.kill_every, sim_args.quiet = "swarm", kill_every, True
        sim_args.rounds, sim_args.duration = 10_000, args.seconds + 25.0   # ~25 s of start-up before trainers run
        sim_args.out = str(Path(args.out) / ("faults" if kill_every else "nofaults"))
        print(f"{name}, {sim_args.duration:.0f} s ...", flush=True)
        report = run_swarm_sim(sim_args, log=lambda *_: None)
        runs[name] = {"tokens_per_s": _steady_rate(report), "lost": report["swarm"]["microbatches_lost"],
                      "replayed": report["swarm"]["microbatches_retried"],
                      "completed": report["swarm"]["microbatches_completed"],
                      "kills": sum(f["kind"] == "SIGKILL" for f in report["faults"]),
                      "reassignments": len(report["swarm"]["reassignments"]),
                      "final_eval_loss": report["rounds"][-1]["eval_loss"]}
    clean, faulty = runs["swarm"], runs["swarm, kill every 30 s"]
    rows = [
        f"| one process ({args.model}, all cores) | {single:.0f} | 1.00 | | | |",
        f"| swarm: {args.stages} stages, {args.peers} peers, {args.trainers} trainer | {clean['tokens_per_s']:.0f} "
        f"| {clean['tokens_per_s'] / single:.2f} (target >= 0.8) | {clean['completed']} | {clean['replayed']} | {clean['lost']} |",
        f"| swarm, a peer SIGKILLed every 30 s ({faulty['kills']} kills, {faulty['reassignments']} re-assignments) "
        f"| {faulty['tokens_per_s']:.0f} | {faulty['tokens_per_s'] / max(clean['tokens_per_s'], 1e-9):.2f} of no-fault "
        f"(target >= 0.7) | {faulty['completed']} | {faulty['replayed']} | {faulty['lost']} |",
    ]
    table = "\n".join(["| configuration | tokens/s | ratio | micro-batches | replayed | lost |",
                       "|---|---|---|---|---|---|", *rows])
    print(f"\n{args.seconds:.0f} s measured per configuration, batch {args.batch_size}x{args.seq_len}, "
          f"{args.precision} precision, same machine, one run:\n")
    print(table)
    result = {"single_tokens_per_s": single, "runs": runs, "table": table}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench-swarm.json").write_text(json.dumps(result, indent=2))
    return result


def main(args: argparse.Namespace) -> int:
    _fill_defaults(args)
    try:
        _run_bench(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _run_bench(args: argparse.Namespace) -> None:
    if args.which == "learning":
        bench_learning(args)
    elif args.which == "codecs":
        bench_codecs(args)
    elif args.which == "swarm":
        bench_swarm(args)
    elif args.which == "threads":
        from fedswarm.sim.bench_threads import bench_threads

        bench_threads(args)
    elif args.which == "lora":
        bench_lora(args)
    elif args.which == "aggregate":
        bench_aggregate(args)
    elif args.which == "memory":
        from fedswarm.sim.bench_memory import bench_memory

        bench_memory(args)
    elif args.which == "scale":
        bench_scale(args)
    elif args.which == "privacy":
        bench_privacy(args)
