"""`fedswarm bench privacy`: held-out loss against epsilon, client-level DP (DP-FedAvg) at a few noise levels.

Each row is a real `fedswarm sim` on the same data, seed and schedule: no DP, then --dp-clip C at each of
--noise-multipliers (z = 0: clipping only, no guarantee). Per round the mean's noise has norm about
z x C x sqrt(parameters) / K against a clipped mean update of norm at most C, so the last column, the
ratio z x sqrt(parameters) / K, says how far from learning a row is: DP-FedAvg needs K in the thousands
for a model of a million parameters (McMahan et al. 2018 sampled 5,000 clients a round)."""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

from fedswarm.coordinator.privacy import epsilon_text
from fedswarm.progress import Progress
from fedswarm.sim.launcher import run_sim

DEFAULTS = {"clients": 4, "rounds": 4, "local_steps": 5, "batch_size": 8, "seq_len": 64, "eval_windows": 32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("privacy (fedswarm bench privacy)")
    g.add_argument("--noise-multipliers", default="0,0.5,1,2",
                   help="comma-separated --dp-noise-multiplier values, one DP row each (with --dp-clip, default 1)")


def _row(args: argparse.Namespace, name: str, z: float | None, progress: Progress, done: int) -> dict:
    sim_args = copy.copy(args)
    sim_args.out, sim_args.quiet = str(Path(args.out) / name), True
    sim_args.dp_clip = 0.0 if z is None else (args.dp_clip or 1.0)
    sim_args.dp_noise_multiplier = z or 0.0
    progress.line(f"running {name} ({args.clients} clients, {args.rounds} rounds) ...")
    report = run_sim(sim_args, log=lambda *_: None,
                     on_round=lambda n: progress.update(done + n, f"bench privacy: {name}"))
    rounds = report["rounds"]
    return {"noise_multiplier": z, "clip": sim_args.dp_clip or None, "privacy": report.get("privacy"),
            "initial_eval_loss": rounds[0]["eval_loss"], "final_eval_loss": rounds[-1]["eval_loss"],
            "parameters": report["communication"]["parameters"], "wall_seconds": report["wall_seconds"]}


def bench_privacy(args: argparse.Namespace) -> dict:
    levels = [float(v) for v in args.noise_multipliers.split(",") if v.strip()]
    if not levels or min(levels) < 0:
        raise ValueError("--noise-multipliers: comma-separated numbers >= 0")
    progress = Progress("bench privacy: rounds", (len(levels) + 1) * args.rounds)
    runs = {"no DP": _row(args, "no-dp", None, progress, 0)}
    for i, z in enumerate(levels, start=1):
        runs[f"z={z:g}"] = _row(args, f"z{z:g}", z, progress, i * args.rounds)
    progress.close()
    base, k = runs["no DP"], args.clients_per_round or args.clients
    rows = []
    for name, r in runs.items():
        ratio = "" if r["noise_multiplier"] is None else f"{r['noise_multiplier'] * math.sqrt(r['parameters']) / k:.0f}"
        rows.append(f"| {name} | {r['clip'] or '-'} | {epsilon_text(r['privacy']) or '-'} "
                    f"| {r['initial_eval_loss']:.4f} | {r['final_eval_loss']:.4f} "
                    f"| {r['final_eval_loss'] / base['final_eval_loss']:.3f} | {ratio} |")
    table = "\n".join(["| run | clip C | epsilon at delta | initial eval loss | final eval loss | vs no DP "
                       "| noise / update norm per round |", "|---|---|---|---|---|---|---|", *rows])
    print(f"\n{args.clients} clients ({k} a round), {args.rounds} rounds of {args.local_steps} local steps, "
          f"{args.model} ({base['parameters']:,} parameters), seed {args.seed}, {args.data}:\n")
    print(table)
    result = {"runs": runs, "table": table, "clients": args.clients, "rounds": args.rounds}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench-privacy.json").write_text(json.dumps(result, indent=2))
    return result
