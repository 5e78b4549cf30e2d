"""Round time against the slowest client's training at real size: evaluation and commit off the critical path.

    python -m fedswarm.sim.bench_eval [--rounds 4] [--local-steps 3] [--before DIR] [--out bench-eval]

builds a GPT-2 of the 124M shape (12 layers, 768 wide, 12 heads, 50,257 embeddings; random weights; a BPE
tokenizer trained on the spot) and runs `fedswarm sim` with 2 clients on it, once with this code (central
evaluation and the checkpoint on the committer, while the next round trains) and, with `--before DIR`, once
with the code importable from DIR (e.g. an earlier commit's packages laid out as `DIR/fedswarm/...`: evaluation
and commit on the critical path). For each round after the first: its period (from the previous round's
commit to its own, read from the state dir) over the slowest client's training seconds (from the clients'
logs), so both runs are measured the same way."""
from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

TRAINED = re.compile(r"round (\d+): loss [0-9.]+ in ([0-9.]+) s")
GPT2_124M = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def build_model(folder: Path, corpus: Path) -> Path:
    """A random-init GPT-2 of the 124M shape with a byte-level BPE tokenizer trained on `corpus`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedswarm.sim.tiny_hf import train_tokenizer

    if (folder / "config.json").is_file():
        return folder
    text = corpus.read_text()
    tokenizer = train_tokenizer([text[i:i + 4096] for i in range(0, len(text), 4096)], vocab_size=2048)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_124M, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_corpus(path: Path, megabytes: float) -> Path:
    """The first `megabytes` of the standard library's sources, as one text file."""
    if path.is_file():
        return path
    chunks, size = [], 0
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = source.read_text(errors="replace")
        chunks.append(text)
        size += len(text)
        if size >= megabytes * 1e6:
            break
    path.write_text("".join(chunks))
    return path


def periods(sim_out: Path, clients: int) -> list[dict]:
    """Per round after the first: commit-to-commit period, the slowest client's training, their ratio."""
    with sqlite3.connect(sim_out / "state" / "fedswarm.sqlite3") as db:
        committed = dict(db.execute("SELECT round, committed_at FROM rounds"))
    train: dict[int, float] = {}
    for i in range(clients):
        for rnd, seconds in TRAINED.findall((sim_out / f"client-{i}.log").read_text()):
            train[int(rnd)] = max(train.get(int(rnd), 0.0), float(seconds))
    out = []
    for rnd in sorted(committed)[2:]:   # round 1's period includes the clients' start-up
        period = committed[rnd] - committed[rnd - 1]
        out.append({"round": rnd, "period_s": round(period, 2), "slowest_train_s": train[rnd],
                    "ratio": round(period / train[rnd], 3)})
    return out


def run(out: Path, args, model: Path, corpus: Path, before: str | None) -> list[dict]:
    sim = [sys.executable, "-m", "fedswarm", "sim", "--clients", "2", "--model", str(model), "--data", str(corpus),
           "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--eval-windows", str(args.eval_windows), "--quiet", "--out", str(out)]
    env = dict(os.environ)
    if before:
        env["PYTHONPATH"] = before + os.pathsep + env.get("PYTHONPATH", "")
    else:
        sim += ["--evaluate", args.evaluate]
    subprocess.run(sim, env=env, check=True)
    return periods(out, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-eval")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--evaluate", default="central", choices=["central", "clients", "both"])
    p.add_argument("--corpus-mb", type=float, default=2.0)
    p.add_argument("--before", metavar="DIR", help="also run the code importable from DIR (PYTHONPATH)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(out / "corpus.txt", args.corpus_mb)
    model = build_model(out / "gpt2-124m", corpus)
    result = {"args": vars(args)}
    if args.before:
        result["before"] = run(out / "before", args, model, corpus, args.before)
    result["after"] = run(out / "after", args, model, corpus, None)
    print(json.dumps(result, indent=1))
    (out / "bench_eval.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
