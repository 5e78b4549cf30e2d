"""report.json and PNG plots for a finished run."""
from __future__ import annotations

import json
from pathlib import Path

from fedswarm.run_config import RunConfig


def write_report(out_dir: Path, report: dict) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def privacy_report(status: dict) -> dict:
    """report.json's "privacy" (epsilon at delta after the last round, the DP settings) and "end_reason" (why
    the run ended before its last round), when the run has them."""
    return {k: status[k] for k in ("privacy", "end_reason") if status.get(k)}


def privacy_line(report: dict) -> str:
    """'; epsilon 3.2 at delta 0.0625 (ended: privacy_budget)' for the sim's last line ('' without DP)."""
    from fedswarm.coordinator.privacy import epsilon_text

    text = epsilon_text(report.get("privacy"))
    ended = f" (ended early: {report['end_reason']})" if report.get("end_reason") else ""
    return f"; {text}{ended}" if text else ended


def allreduce_bytes(tokens: int, workers: int, parameters: int, tokens_per_step: int) -> int:
    """fp32 data-parallel ring all-reduce for `tokens`: 2 (N-1)/N x 4 bytes x parameters per step per worker,
    `tokens_per_step` being one worker's batch x sequence length x grad accumulation."""
    steps = tokens / (workers * tokens_per_step)
    return int(steps * workers * 2 * (workers - 1) / workers * 4 * parameters)


def communication(rounds: list[dict], config: RunConfig, workers: int, socket_up: int, socket_down: int) -> dict:
    """Bytes at the socket, tokens trained, and the ratio against fp32 data-parallel all-reduce."""
    trained = [r for r in rounds if r["round"] > 0 and r["clients"]]
    tokens = sum(int(r.get("tokens") or 0) for r in trained)
    parameters = trained[0]["bytes_up_raw"] // (4 * len(trained[0]["clients"])) if trained else 0
    dp = allreduce_bytes(tokens, workers, parameters, config.batch_size * config.seq_len * config.grad_accum)
    moved = socket_up + socket_down
    return {"socket_bytes_up": socket_up, "socket_bytes_down": socket_down, "tokens": tokens,
            "parameters": parameters, "workers": workers,
            "update_bytes_up": sum(r["bytes_up"] for r in trained),
            "model_bytes_down": sum(int(r.get("bytes_down") or 0) for r in trained),
            "model_bytes_down_raw": sum(int(r.get("bytes_down_raw") or 0) for r in trained),
            "allreduce_fp32_bytes": dp,
            "allreduce_over_socket": round(dp / moved, 2) if dp and moved else None}


def eval_points(rounds: list[dict], source: str) -> list[tuple[int, float]]:
    """(round, loss) of one evaluation source (central, clients); a round recorded before `evals` existed
    (or a swarm round) counts its eval_loss as central."""
    out = []
    for r in rounds:
        evals = r.get("evals")
        if evals is None and source == "central" and r.get("eval_loss") is not None:
            out.append((r["round"], r["eval_loss"]))
        out += [(r["round"], e["loss"]) for e in evals or () if e["source"] == source]
    return out


def plot_rounds(out_dir: Path, rounds: list[dict], title: str) -> list[Path]:
    """eval_loss.png (eval and train loss per round) and upload_bytes.png (bytes up and down per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for source, label, marker in (("central", "eval loss (held out, coordinator)", "o"),
                                  ("clients", "eval loss (clients' held-out splits, by tokens)", "s")):
        points = eval_points(rounds, source)
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)
    train = [(r["round"], r["train_loss"]) for r in rounds if r.get("train_loss") is not None]
    if train:
        ax.plot(*zip(*train), marker=".", linestyle="--", label="train loss (clients' mean)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "eval_loss.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    trained = [r for r in rounds if r["round"] > 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["round"] for r in trained], [r["bytes_up"] / 1e6 for r in trained], label="updates up")
    if any(r.get("bytes_down") for r in trained):
        ax.bar([r["round"] for r in trained], [(r.get("bytes_down") or 0) / 1e6 for r in trained],
               bottom=[r["bytes_up"] / 1e6 for r in trained], label="models down")
    ax.plot([r["round"] for r in trained], [r["bytes_up_raw"] / 1e6 for r in trained], color="black",
            marker="_", linestyle="none", markersize=20, label="fp32 upload equivalent")
    ax.set_xlabel("round")
    ax.set_ylabel("MB (all clients)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "upload_bytes.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written
