"""`fedswarm bench learning`: federated runs against one process on the same data and token budget.

Every run is a real `fedswarm sim` (coordinator + clients as processes, bytes counted at the relay's
socket). The yardstick is one client training on all the data (the same code path, upload and download
uncompressed), once for each inner optimizer the rows use: a row is measured against the one process
trained with its own optimizer (AdamW, or Muon for an @muon row). The federated runs split the data over N clients and, as data-parallel training would,
the one process's batch too: each client's batch is --batch-size / N, so every run makes the same
optimizer steps on the same global batch and the same tokens. Each row gives the held-out loss relative
to one process, the bytes up and down at the socket, and how many times fewer bytes the run moved (up +
down) than fp32 data-parallel ring all-reduce would for the same steps, and the socket's upload bytes over
the codec's arithmetic (values + positions + scales of every upload; int2z, of variable length: the update
messages received). After the grid come --extra-rows (dense low-bit codecs at their own local steps and
inner optimizer) and the sparse rows (topk both ways,
--sparse-strategies x --sparse-local-steps).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from fedswarm.sim.launcher import run_sim

DEFAULT_TOKENS = 2000 * 12 * 64      # 2,000 optimizer steps of 12 x 64 tokens in all
WITHIN, GOAL_WITHIN = 0.03, 0.05     # loss targets vs one process
# DiLoCo at its paper's outer settings (0.7, Nesterov 0.9) and at momentum 0.8, which tens of rounds from
# scratch favour (the paper's 0.9 was tuned for 500 inner steps from a pretrained model).
DEFAULT_STRATEGIES = ("fedavg", "fedavgm", "diloco", "diloco/0.7/0.8")
# topk both ways (--topk-chunk/--topk-bits, --ef-decay) at each of --sparse-densities: SparseLoCo's outer SGD
# (DiLoCo's Nesterov on sparse means ended 53 % above one process at 1/64, so it is not a default row)
DEFAULT_SPARSE = ("sparseloco",)
DEFAULT_SPARSE_STEPS = "25"
DEFAULT_SPARSE_DENSITIES = "1/16,1/64"
# dense low-bit rows, STRATEGY@LOCAL_STEPS@CODEC[@INNER_OPTIMIZER]: 2 bits at 50 local steps with AdamW inside
# (about 590x), and the recipe of examples/low-traffic.toml: Muon inside, int2z every 67 local steps (about
# 1,100x), measured against a one process trained with Muon
DEFAULT_EXTRA_ROWS = "diloco/0.7/0.8@50@int2,diloco/0.7/0.8@67@int2z@muon"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning (fedswarm bench learning)")
    g.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens trained by each run, all clients together")
    g.add_argument("--client-batch-size", type=int, default=0,
                   help="sequences per client step in the federated runs (0: --batch-size / --clients, "
                        "the one process's batch split as data-parallel training splits it)")
    g.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help="comma-separated NAME or NAME/SERVER_LR/SERVER_MOMENTUM (an outer optimizer's own "
                        "settings for that row; without them the strategy's defaults or --server-lr/--server-momentum)")
    g.add_argument("--local-steps-list", default="25,100", help="comma-separated local step counts for the federated runs")
    g.add_argument("--codec-list", default="int4",
                   help="comma-separated codecs for the grid: CODEC both ways, or UP:DOWN such as sign:int2")
    g.add_argument("--extra-codecs", default="int8,none",
                   help="codecs also tried for the last strategy at the first local step count")
    g.add_argument("--extra-rows", default=DEFAULT_EXTRA_ROWS,
                   help="comma-separated STRATEGY@LOCAL_STEPS@CODEC[@INNER_OPTIMIZER] rows also run, e.g. "
                        "diloco/0.7/0.8@50@sign; a row with its own inner optimizer (@muon) is measured against a "
                        "one process trained with it "
                        "(CODEC as in --codec-list; '': none)")
    g.add_argument("--sparse-strategies", default=",".join(DEFAULT_SPARSE),
                   help="strategies (as --strategies) run with the topk codec both ways ('': none)")
    g.add_argument("--sparse-local-steps", default=DEFAULT_SPARSE_STEPS,
                   help="comma-separated local step counts of the topk rows")
    g.add_argument("--sparse-densities", default=DEFAULT_SPARSE_DENSITIES,
                   help="comma-separated fractions kept per chunk by the topk rows: 1/16 (or 0.0625) both ways, "
                        "or UP:DOWN such as 1/64:1/16")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_strategy(spec: str) -> dict:
    """``fedavg`` or ``diloco/0.7/0.8`` -> {"strategy", "server_lr", "server_momentum", "label"}."""
    from fedswarm.coordinator.strategies import STRATEGIES

    name, *values = spec.split("/")
    if name not in STRATEGIES:
        raise ValueError(f"--strategies: unknown {name!r}; choose from {sorted(STRATEGIES)}")
    if len(values) > 2:
        raise ValueError(f"--strategies: {spec!r} has too many parts; write NAME or NAME/SERVER_LR/SERVER_MOMENTUM")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--strategies: {spec!r}: the server lr and momentum must be numbers, "
                         f"e.g. diloco/0.7/0.8") from None
    lr, momentum = (numbers + [None, None])[:2]
    if lr is not None and not 0 < lr <= 10 or momentum is not None and not 0 <= momentum < 1:
        raise ValueError(f"--strategies: {spec!r}: need 0 < server lr <= 10 and 0 <= momentum < 1")
    return {"strategy": name, "server_lr": lr, "server_momentum": momentum, "label": spec}


def plan_runs(args: argparse.Namespace) -> list[dict]:
    """The federated configurations: strategies x local steps x codecs, plus a codec sweep of the last."""
    strategies = [parse_strategy(s) for s in _names(args.strategies)]
    if not strategies:
        raise ValueError("--strategies is empty; name at least one, e.g. fedavg")
    steps = [int(s) for s in _names(args.local_steps_list)]
    codecs = _names(args.codec_list)
    _check_codecs(codecs + _names(args.extra_codecs))
    runs = [{**s, "local_steps": k, "codec": c} for s in strategies for k in steps for c in codecs]
    runs += [{**strategies[-1], "local_steps": steps[0], "codec": c}
             for c in _names(args.extra_codecs) if c not in codecs]
    runs += [parse_row(r) for r in _names(getattr(args, "extra_rows", ""))]
    sparse = [parse_strategy(s) for s in _names(getattr(args, "sparse_strategies", ""))]
    densities = [parse_density(d) for d in _names(getattr(args, "sparse_densities", DEFAULT_SPARSE_DENSITIES))]
    runs += [{**s, "local_steps": int(k), "codec": "topk", "topk_density": up, "download_topk_density": down}
             for s in sparse for k in _names(getattr(args, "sparse_local_steps", DEFAULT_SPARSE_STEPS))
             for up, down in densities]
    return runs


def parse_row(text: str) -> dict:
    """``diloco/0.7/0.8@50@sign`` -> a planned run: that strategy, local steps and codec (UP:DOWN allowed);
    ``...@muon`` also sets the clients' inner optimizer (else --inner-optimizer's)."""
    from fedswarm.run_config import INNER_OPTIMIZERS

    parts = text.split("@")
    if len(parts) not in (3, 4) or not parts[1].isdigit() or int(parts[1]) < 1 \
            or (len(parts) == 4 and parts[3] not in INNER_OPTIMIZERS):
        raise ValueError(f"--extra-rows: {text!r}: write STRATEGY@LOCAL_STEPS@CODEC[@INNER_OPTIMIZER], e.g. "
                         f"diloco/0.7/0.8@50@sign or diloco/0.7/0.8@50@int2@muon (optimizers: {INNER_OPTIMIZERS})")
    _check_codecs([parts[2]])
    row = {**parse_strategy(parts[0]), "local_steps": int(parts[1]), "codec": parts[2]}
    return {**row, "inner_optimizer": parts[3]} if len(parts) == 4 else row


def _check_codecs(specs: list[str]) -> None:
    from fedswarm.proto.codec import CODEC_NAMES

    for spec in specs:
        parts = spec.split(":")
        if len(parts) > 2 or any(p not in CODEC_NAMES for p in parts):
            raise ValueError(f"--codec-list/--extra-codecs: {spec!r}: write CODEC or UP:DOWN of {', '.join(CODEC_NAMES)}")


def parse_density(text: str) -> tuple[float, float]:
    """``1/16`` -> (0.0625, 0.0625); ``1/64:1/16`` -> up 1/64, down 1/16 (fractions kept per chunk, in (0, 1])."""
    up, _, down = text.partition(":")
    return _one_density(up), _one_density(down or up)


def _one_density(text: str) -> float:
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--sparse-densities: {text!r} is not a fraction; write e.g. 0.0625 or 1/16") from None
    if not 0 < value <= 1:
        raise ValueError(f"--sparse-densities: {text!r} must lie in (0, 1]")
    return value


def client_batch_size(args: argparse.Namespace) -> int:
    """Each federated client's batch: --client-batch-size, or the one process's batch split over the clients."""
    if args.client_batch_size:
        return args.client_batch_size
    if args.batch_size % args.clients:
        raise ValueError(f"--batch-size {args.batch_size} does not split over --clients {args.clients}; "
                         f"pick a multiple of {args.clients}, or set --client-batch-size")
    return args.batch_size // args.clients


def _rounds_for(tokens: int, clients: int, local_steps: int, batch_size: int, seq_len: int) -> int:
    return max(1, round(tokens / (clients * local_steps * batch_size * seq_len)))


def _one_run(args: argparse.Namespace, spec: dict, clients: int, batch_size: int) -> dict:
    """One `fedswarm sim` of ``spec`` (strategy, its server settings, local steps, codec) on the bench's budget."""
    sim_args = copy.copy(args)
    sim_args.clients, sim_args.batch_size = clients, batch_size
    sim_args.strategy, sim_args.local_steps = spec["strategy"], spec["local_steps"]
    sim_args.inner_optimizer = spec.get("inner_optimizer") or args.inner_optimizer
    for key in ("server_lr", "server_momentum"):
        if spec.get(key) is not None:
            setattr(sim_args, key, spec[key])
    sim_args.rounds = _rounds_for(args.tokens, clients, spec["local_steps"], batch_size, args.seq_len)
    up, _, down = spec["codec"].partition(":")
    sim_args.upload_codec, sim_args.download_codec = up, down or up
    if spec.get("topk_density"):
        sim_args.topk_density, sim_args.download_topk_density = spec["topk_density"], spec["download_topk_density"]
    sim_args.out, sim_args.quiet = str(Path(args.out) / spec["name"]), True
    print(f"{spec['name']}: {clients} client(s) of batch {batch_size}, {sim_args.rounds} rounds x "
          f"{spec['local_steps']} local steps, {spec['codec']} ...", flush=True)
    report = run_sim(sim_args, log=lambda *_: None)
    comm = report["communication"]
    label = spec["label"] if sim_args.inner_optimizer == "adamw" else f"{spec['label']} ({sim_args.inner_optimizer})"
    return {"name": spec["name"], "strategy": label, "inner_optimizer": sim_args.inner_optimizer,
            "clients": clients, "batch_size": batch_size,
            "local_steps": spec["local_steps"], "rounds": sim_args.rounds, "codec": _codec_label(sim_args),
            "tokens": comm["tokens"], "final_eval_loss": report["rounds"][-1]["eval_loss"],
            "socket_bytes": comm["socket_bytes_up"] + comm["socket_bytes_down"],
            "socket_bytes_up": comm["socket_bytes_up"], "socket_bytes_down": comm["socket_bytes_down"],
            "codec_bytes_up": _codec_bytes_up(report, sim_args),
            "allreduce_over_socket": comm["allreduce_over_socket"],
            "curve": [(r.get("socket_up", 0) + r.get("socket_down", 0), r["eval_loss"]) for r in report["rounds"]],
            "wall_seconds": report["wall_seconds"]}


def _codec_label(sim_args: argparse.Namespace) -> str:
    """``int4``, or ``topk 1/64 up, 1/16 down, 2 bits`` for the sparse rows."""
    if sim_args.upload_codec != "topk":
        up, down = sim_args.upload_codec, sim_args.download_codec
        return up if up == down else f"{up} up, {down} down"
    up = _fraction(sim_args.topk_density)
    down = _fraction(getattr(sim_args, "download_topk_density", 0) or sim_args.topk_density)
    return f"topk {up}" + (f" up, {down} down" if down != up else "") + f", {sim_args.topk_bits} bits"


def _fraction(d: float) -> str:
    return f"1/{1 / d:.0f}" if abs(1 / d - round(1 / d)) < 1e-6 else f"{d:g}"


def _codec_bytes_up(report: dict, sim_args: argparse.Namespace) -> int:
    """What the uploads weigh by the codec's arithmetic (data + scales of every tensor of every update); for a
    codec of variable length (int2z), the update messages as the coordinator received them (bytes_up)."""
    from fedswarm.models import build_model, trainable_state
    from fedswarm.proto import codec as C

    spec = C.CodecSpec.of(vars(sim_args), "upload")
    if C.variable_length(spec.codec):
        return sum(r["bytes_up"] for r in report["rounds"] if r["round"] > 0 and r["clients"])
    block = spec.block_size or C.DEFAULT_BLOCK_SIZE.get(spec.codec, 0)
    shapes = [t.numel() for t in trainable_state(build_model(sim_args.model, seed=0)).values()]
    per_update = sum(sum(C.expected_sizes(spec.codec, n, block, spec.topk, spec.bits)) for n in shapes)
    return per_update * sum(len(r["clients"]) for r in report["rounds"] if r["round"] > 0 and r["clients"])


def bench_learning(args: argparse.Namespace) -> dict:
    runs_planned = plan_runs(args)
    per_client = client_batch_size(args)
    singles = _one_processes(args, runs_planned)
    single = singles[args.inner_optimizer]
    runs = []
    for spec in runs_planned:
        name = f"{spec['label'].replace('/', '-')}-k{spec['local_steps']}-{spec['codec'].replace(':', '-')}"
        if spec.get("topk_density"):
            name += f"-up{1 / spec['topk_density']:.0f}-down{1 / spec['download_topk_density']:.0f}"
        if spec.get("inner_optimizer", args.inner_optimizer) != args.inner_optimizer:
            name += f"-{spec['inner_optimizer']}"
        runs.append(_one_run(args, {**spec, "name": name}, args.clients, per_client))
    for r in runs:   # each against the one process of its own inner optimizer
        r["loss_vs_single"] = r["final_eval_loss"] / singles[r["inner_optimizer"]]["final_eval_loss"] - 1
    table = _table(list(singles.values()), runs, args)
    print(f"\n{args.model}, data {args.data}, {args.clients} clients of batch {per_client} vs one process of batch "
          f"{args.batch_size}, {single['tokens']} tokens each (sequences of {args.seq_len}), lr {args.lr} "
          f"{args.lr_schedule} (warm-up {args.warmup_steps}), seed {args.seed}:\n")
    print(table)
    summary = _summary(runs)
    print("\n" + summary)
    result = {"single": single, "singles": singles, "runs": runs, "table": table, "summary": summary,
              "args": {k: v for k, v in vars(args).items() if k != "func"}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench-learning.json").write_text(json.dumps(result, indent=2))
    _plot(Path(args.out) / "loss_vs_bytes.png", list(singles.values()), runs)
    return result


def _one_processes(args: argparse.Namespace, planned: list[dict]) -> dict[str, dict]:
    """The yardstick of each inner optimizer the rows use (--inner-optimizer's first): one client, codec none."""
    steps = max(int(s) for s in _names(args.local_steps_list))
    used = dict.fromkeys([args.inner_optimizer, *(s["inner_optimizer"] for s in planned if "inner_optimizer" in s)])
    return {o: _one_run(args, {**parse_strategy("fedavg"), "name": "one-process" + ("" if o == args.inner_optimizer
                                                                                    else f"-{o}"),
                               "local_steps": steps, "codec": "none", "inner_optimizer": o}, 1, args.batch_size)
            for o in used}


def _table(singles: list[dict], runs: list[dict], args: argparse.Namespace) -> str:
    rows = [f"| {s['strategy'].replace('fedavg', 'one process')} | 1 x {s['batch_size']} | {s['local_steps']} x "
            f"{s['rounds']} | none | {s['tokens']} | {s['final_eval_loss']:.4f} | 1.000 | {_mb(s['socket_bytes_up'])} "
            f"| {_mb(s['socket_bytes_down'])} | - | - |" for s in singles]
    for r in runs:
        ratio = f"{r['allreduce_over_socket']:.0f}x" if r["allreduce_over_socket"] else "-"
        arithmetic = f"{r['socket_bytes_up'] / r['codec_bytes_up']:.3f}" if r.get("codec_bytes_up") else "-"
        rows.append(f"| {r['strategy']} | {r['clients']} x {r['batch_size']} | {r['local_steps']} x {r['rounds']} "
                    f"| {r['codec']} | {r['tokens']} | {r['final_eval_loss']:.4f} | {1 + r['loss_vs_single']:.3f} "
                    f"| {_mb(r['socket_bytes_up'])} | {_mb(r['socket_bytes_down'])} | {ratio} | {arithmetic} |")
    return "\n".join([
        "| strategy | clients x batch | local steps x rounds | codec (up, down) | tokens | held-out loss | vs one process "
        "| MB up | MB down | fp32 all-reduce / socket | socket / codec arithmetic (up) |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows])


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}" if n < 10e6 else f"{n / 1e6:.1f}"


def _summary(runs: list[dict]) -> str:
    lines = []
    for within in (WITHIN, GOAL_WITHIN):
        ok = [r for r in runs if r["loss_vs_single"] <= within and r["allreduce_over_socket"]]
        if ok:
            best = max(ok, key=lambda r: (round(r["allreduce_over_socket"]), -r["loss_vs_single"]))   # ties: lower loss
            lines.append(f"largest reduction within {within:.0%} of one process: {best['allreduce_over_socket']:.0f}x "
                         f"({best['name']}, {best['loss_vs_single']:+.1%})")
        else:
            closest = min(runs, key=lambda r: r["loss_vs_single"])
            lines.append(f"no run within {within:.0%} of one process (closest: {closest['name']}, "
                         f"{closest['loss_vs_single']:+.1%})")
    return "\n".join(lines)


def _plot(path: Path, singles: list[dict], runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        pts = [(b / 1e6, loss) for b, loss in r["curve"] if b > 0]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=r["name"])
    for single, style in zip(singles, ("--", ":")):
        ax.axhline(single["final_eval_loss"], color="black", linestyle=style,
                   label=f"{single['strategy'].replace('fedavg', 'one process')} (final)")
    ax.set_xscale("log")
    ax.set_xlabel("MB moved at the socket (up + down, cumulative)")
    ax.set_ylabel("held-out loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
