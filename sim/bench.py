"""`fedswarm bench`: side-by-side runs whose ratios go in the README."""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from fedswarm.sim.launcher import add_arguments as add_sim_arguments
from fedswarm.sim.launcher import run_sim

TARGETS = {"int8": (0.26, 0.01), "int4": (0.14, 0.03)}   # bytes ratio, eval-loss tolerance vs none


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["codecs"], help="codecs: upload bytes and final eval loss per codec vs none")
    p.add_argument("--codecs", default="none,fp16,int8,int4")
    add_sim_arguments(p)
    p.set_defaults(clients=2, rounds=6, out="bench-out")


def bench_codecs(args: argparse.Namespace) -> dict:
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if codecs[0] != "none":
        codecs.insert(0, "none")
    runs = {}
    for codec in codecs:
        sim_args = copy.copy(args)
        sim_args.upload_codec, sim_args.out, sim_args.quiet = codec, str(Path(args.out) / codec), True
        print(f"running {codec} ({args.clients} clients, {args.rounds} rounds) ...", flush=True)
        report = run_sim(sim_args, log=lambda *_: None)
        rounds = [r for r in report["rounds"] if r["round"] > 0]
        runs[codec] = {
            "update_bytes": sum(r["bytes_up"] for r in rounds),
            "raw_bytes": sum(r["bytes_up_raw"] for r in rounds),
            "socket_bytes_up": report["socket_bytes"]["up"],
            "final_eval_loss": report["rounds"][-1]["eval_loss"],
            "initial_eval_loss": report["rounds"][0]["eval_loss"],
            "wall_seconds": report["wall_seconds"],
        }
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


def main(args: argparse.Namespace) -> int:
    if args.which == "codecs":
        bench_codecs(args)
    return 0
