"""`fedswarm bench learning`: federated runs against one process on the same data and token budget.

Every run is a real `fedswarm sim` (coordinator + clients as processes, bytes counted at the relay's
socket). The yardstick is one client training on all the data (the same code path, upload and download
uncompressed); the federated runs split the data over N clients and the same number of tokens over
the rounds. Each row gives the held-out loss relative to one process and how many times fewer bytes the
run moved (up + down, at the socket) than fp32 data-parallel ring all-reduce would for its tokens.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from fedswarm.sim.launcher import run_sim

DEFAULT_TOKENS = 600 * 12 * 64       # 600 optimizer steps of 12 x 64 tokens in all
WITHIN, GOAL_WITHIN = 0.03, 0.05     # loss targets vs one process (issue 10)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning (fedswarm bench learning)")
    g.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens trained by each run, all clients together")
    g.add_argument("--strategies", default="", help="comma-separated (default: fedavg,fedavgm and diloco if present)")
    g.add_argument("--local-steps-list", default="10,50", help="comma-separated local step counts for the federated runs")
    g.add_argument("--codec-list", default="int8", help="comma-separated codecs (upload and download) for the grid")
    g.add_argument("--extra-codecs", default="none,int4",
                   help="codecs also tried for the first strategy at the first local step count")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def plan_runs(args: argparse.Namespace) -> list[dict]:
    """The federated configurations: strategies x local steps x codecs, plus a codec sweep of the first."""
    from fedswarm.coordinator.strategies import STRATEGIES

    strategies = _names(args.strategies) or ["fedavg", "fedavgm"] + (["diloco"] if "diloco" in STRATEGIES else [])
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; choose from {sorted(STRATEGIES)}")
    steps = [int(s) for s in _names(args.local_steps_list)]
    codecs = _names(args.codec_list)
    runs = [{"strategy": s, "local_steps": k, "codec": c} for s in strategies for k in steps for c in codecs]
    runs += [{"strategy": strategies[0], "local_steps": steps[0], "codec": c}
             for c in _names(args.extra_codecs) if c not in codecs]
    return runs


def _rounds_for(tokens: int, clients: int, local_steps: int, args: argparse.Namespace) -> int:
    per_round = clients * local_steps * args.batch_size * args.seq_len
    return max(1, round(tokens / per_round))


def _one_run(args: argparse.Namespace, name: str, clients: int, strategy: str, local_steps: int,
             codec: str) -> dict:
    sim_args = copy.copy(args)
    sim_args.clients, sim_args.strategy, sim_args.local_steps = clients, strategy, local_steps
    sim_args.rounds = _rounds_for(args.tokens, clients, local_steps, args)
    sim_args.upload_codec = sim_args.download_codec = codec
    sim_args.out, sim_args.quiet = str(Path(args.out) / name), True
    print(f"{name}: {clients} client(s), {sim_args.rounds} rounds x {local_steps} local steps, {codec} ...", flush=True)
    report = run_sim(sim_args, log=lambda *_: None)
    comm = report["communication"]
    return {"name": name, "strategy": strategy, "clients": clients, "local_steps": local_steps,
            "rounds": sim_args.rounds, "codec": codec, "tokens": comm["tokens"],
            "final_eval_loss": report["rounds"][-1]["eval_loss"],
            "socket_bytes": comm["socket_bytes_up"] + comm["socket_bytes_down"],
            "allreduce_over_socket": comm["allreduce_over_socket"],
            "curve": [(r.get("socket_up", 0) + r.get("socket_down", 0), r["eval_loss"]) for r in report["rounds"]],
            "wall_seconds": report["wall_seconds"]}


def bench_learning(args: argparse.Namespace) -> dict:
    runs_planned = plan_runs(args)
    single_steps = max(int(s) for s in _names(args.local_steps_list))
    single = _one_run(args, "one-process", 1, "fedavg", single_steps, "none")
    runs = []
    for spec in runs_planned:
        name = f"{spec['strategy']}-k{spec['local_steps']}-{spec['codec']}"
        runs.append(_one_run(args, name, args.clients, spec["strategy"], spec["local_steps"], spec["codec"]))
    for r in runs:
        r["loss_vs_single"] = r["final_eval_loss"] / single["final_eval_loss"] - 1
    table = _table(single, runs, args)
    print(f"\n{args.model}, data {args.data}, {args.clients} clients vs one process, {single['tokens']} tokens "
          f"each ({args.batch_size} x {args.seq_len} per step), lr {args.lr} {args.lr_schedule} "
          f"(warm-up {args.warmup_steps}), seed {args.seed}:\n")
    print(table)
    summary = _summary(runs)
    print("\n" + summary)
    result = {"single": single, "runs": runs, "table": table, "summary": summary,
              "args": {k: v for k, v in vars(args).items() if k != "func"}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench-learning.json").write_text(json.dumps(result, indent=2))
    _plot(Path(args.out) / "loss_vs_bytes.png", single, runs)
    return result


def _table(single: dict, runs: list[dict], args: argparse.Namespace) -> str:
    rows = [f"| one process | 1 | {single['local_steps']} x {single['rounds']} | none | {single['tokens']} "
            f"| {single['final_eval_loss']:.4f} | 1.000 | {single['socket_bytes'] / 1e6:.1f} | - |"]
    for r in runs:
        ratio = f"{r['allreduce_over_socket']:.0f}x" if r["allreduce_over_socket"] else "-"
        rows.append(f"| {r['strategy']} | {r['clients']} | {r['local_steps']} x {r['rounds']} | {r['codec']} "
                    f"| {r['tokens']} | {r['final_eval_loss']:.4f} | {1 + r['loss_vs_single']:.3f} "
                    f"| {r['socket_bytes'] / 1e6:.1f} | {ratio} |")
    return "\n".join([
        "| strategy | clients | local steps x rounds | codec (up, down) | tokens | held-out loss | vs one process "
        "| MB at socket | fp32 all-reduce / socket |",
        "|---|---|---|---|---|---|---|---|---|", *rows])


def _summary(runs: list[dict]) -> str:
    lines = []
    for within in (WITHIN, GOAL_WITHIN):
        ok = [r for r in runs if r["loss_vs_single"] <= within and r["allreduce_over_socket"]]
        if ok:
            best = max(ok, key=lambda r: r["allreduce_over_socket"])
            lines.append(f"largest reduction within {within:.0%} of one process: {best['allreduce_over_socket']:.0f}x "
                         f"({best['name']}, {best['loss_vs_single']:+.1%})")
        else:
            closest = min(runs, key=lambda r: r["loss_vs_single"])
            lines.append(f"no run within {within:.0%} of one process (closest: {closest['name']}, "
                         f"{closest['loss_vs_single']:+.1%})")
    return "\n".join(lines)


def _plot(path: Path, single: dict, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        pts = [(b / 1e6, loss) for b, loss in r["curve"] if b > 0]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=r["name"])
    ax.axhline(single["final_eval_loss"], color="black", linestyle="--", label="one process (final)")
    ax.set_xscale("log")
    ax.set_xlabel("MB moved at the socket (up + down, cumulative)")
    ax.set_ylabel("held-out loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
