"""report.json and PNG plots for a finished run."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(out_dir: Path, report: dict) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def plot_rounds(out_dir: Path, rounds: list[dict], title: str) -> list[Path]:
    """eval_loss.png (eval and train loss per round) and upload_bytes.png (bytes up per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["eval_loss"] for r in rounds], marker="o", label="eval loss (held out)")
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
    ax.bar([r["round"] for r in trained], [r["bytes_up"] / 1e6 for r in trained], label="received (socket)")
    ax.plot([r["round"] for r in trained], [r["bytes_up_raw"] / 1e6 for r in trained], color="black",
            marker="_", linestyle="none", markersize=20, label="fp32 equivalent")
    ax.set_xlabel("round")
    ax.set_ylabel("upload MB (all clients)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "upload_bytes.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written
