"""`fedswarm bench scale --scale-setups chat-lora`: the README's chat LoRA workflow at real size, timed per round.

Two sites, each with its own chat JSON Lines file (prompt / response), tune LoRA adapters of the bench's model
(bench_scale builds it; its tokenizer carries a chat template) as "Fine-tuning a Hugging Face model" runs them:
`--peft lora --format chat --evaluate clients`, every client with `--model` and `--data`. Then the run is exported
(`--merge`) and `fedswarm generate --model EXPORTED --prompt Q` answers, asked a second time with --show-prompt to
show the chat template it went through. Per round: its critical path over the slowest client's training, where
the rest went, and the clients' evaluation loss from the round record.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, run_fedswarm
from fedswarm.sim.tiny_hf import fact_records

KINDS = ("add", "color")        # one kind of fact per site (sim/tiny_hf.py)
RECORDS = 400                   # chat records per site
QUESTION = "What is 3 plus 4?"
ROUND_BUDGET = 1.15             # a round: at most this times its slowest client's training
CLI_TIMEOUT_S = 600.0           # export or generate at real size, on a loaded machine


def write_sites(folder: Path, records: int = RECORDS) -> list[Path]:
    """One chat JSON Lines file per site (prompt / response records)."""
    folder.mkdir(parents=True, exist_ok=True)
    sites = []
    for i, kind in enumerate(KINDS):
        path = folder / f"site-{kind}.jsonl"
        path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                                for r in fact_records(kind, records, i + 1)))
        sites.append(path)
    return sites


def run_chat(out: Path, model: Path, args: argparse.Namespace) -> dict:
    """The workflow's rounds, export and generate, in `out`."""
    from fedswarm.sim.bench_scale import PeakSampler, round_split, run_to_end

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sites = write_sites(out / "data")
    state = out / "state"
    coord = ["--state-dir", str(state), "--model", str(model), "--peft", "lora", "--lora-r", str(args.lora_r),
             "--format", "chat", "--evaluate", "clients", "--rounds", str(args.rounds), "--min-clients", str(len(sites)),
             "--local-steps", str(args.local_steps), "--seq-len", str(args.seq_len), "--batch-size",
             str(args.batch_size), "--eval-windows", str(args.eval_windows), "--seed", str(args.seed), "--lr",
             str(args.lr), "--threads", "1"]
    started = time.time()
    with PeakSampler(trace=out / "rss-trace.tsv") as peaks, \
            coordinator_process(out, coord, ready_timeout=args.scale_timeout) as (coordinator, address):
        peaks.watch("coordinator", coordinator.pid)
        clients = [Proc(f"site-{i}", fedswarm_cmd(
            "client", "--coordinator", address, "--model", str(model), "--data", str(site), "--name", f"site-{i}",
            "--threads", "1", "--device", "cpu", "--precision", args.precision), out / f"site-{i}.log")
            for i, site in enumerate(sites)]
        status = run_to_end(coordinator, address, clients, peaks, args.scale_timeout)
    rounds = status["rounds"]
    split = {r["round"]: r for r in round_split(rounds, [c.log_path for c in clients])}
    waited, scored = _waited(out / "coordinator.log"), _eval_seconds([c.log_path for c in clients])
    per_round = [_round_row(r, split.get(r["round"], {}), waited.get(r["round"], 0.0), scored.get(r["round"] - 1))
                 for r in rounds if r["round"] > 0]
    return {"setup": "chat-lora", "rounds": rounds, "split": list(split.values()), "per_round": per_round,
            "peak_mb": dict(peaks.peaks), "wall_s": round(time.time() - started, 1),
            "generate": export_and_generate(out, state)}


def _waited(log: Path) -> dict[int, float]:
    """Per round: seconds its aggregation waited for the previous round's evaluation and commit (logged over 1 s)."""
    from fedswarm.sim.bench_scale import _events

    return {int(g[0]): float(g[1]) for _, g in _events(log, r"round (\d+): waited ([\d.]+) s for round")}


def _eval_seconds(logs: list[Path]) -> dict[int, float]:
    """Per round N: the longest any client took to evaluate model N (at the start of round N + 1, before it trains)."""
    from fedswarm.sim.bench_scale import _events

    out: dict[int, float] = {}
    for log in logs:
        for _, g in _events(log, r"round (\d+): eval loss [-\d.einf]+ on \d+ held-out tokens in ([\d.]+) s"):
            out[int(g[0])] = max(out.get(int(g[0]), 0.0), float(g[1]))
    return out


def _round_row(record: dict, split: dict, waited: float, evaluating: float | None) -> dict:
    evals = [e for e in record.get("evals") or () if e.get("source") == "clients"]
    train = split.get("train_s") or record.get("train_seconds")
    return {"round": record["round"], "round_s": record["seconds"], "train_s": train,
            "ratio": record["seconds"] / train if train else None,
            "configure_s": record["configured_at"] - record["started_at"],
            "download_s": split.get("download_s"), "upload_s": split.get("upload_s"),
            "aggregate_s": split.get("aggregate_s"), "waited_s": waited, "client_eval_s": evaluating,
            "eval_loss": evals[0]["loss"] if evals else None, "eval_clients": evals[0].get("clients") if evals else None}


def export_and_generate(out: Path, state: Path) -> dict:
    """`fedswarm export --merge`, then `fedswarm generate --model EXPORTED --prompt Q` (no other flag), and once
    more with --show-prompt: what the model was fed (stderr)."""
    tuned = out / "tuned"
    done = run_fedswarm("export", "--state-dir", str(state), "--out", str(tuned), "--merge", timeout=CLI_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"fedswarm export failed:\n{done.stderr[-2000:]}")
    answer = run_fedswarm("generate", "--model", str(tuned), "--prompt", QUESTION, timeout=CLI_TIMEOUT_S)
    shown = run_fedswarm("generate", "--model", str(tuned), "--prompt", QUESTION, "--show-prompt",
                         timeout=CLI_TIMEOUT_S)
    for name, run in (("generate", answer), ("generate --show-prompt", shown)):
        if run.returncode != 0:
            raise RuntimeError(f"fedswarm {name} failed:\n{run.stderr[-2000:]}")
    lines = shown.stderr.strip().splitlines()   # progress bars, then "prompt (chat template, N tokens):" and it
    start = next((i for i, line in enumerate(lines) if line.startswith("prompt (")), 0)
    return {"command": f"fedswarm generate --model {tuned} --prompt {json.dumps(QUESTION)}",
            "answer": answer.stdout.strip(), "shown_prompt": "\n".join(lines[start:])}


def _fmt(value, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def chat_table(run: dict) -> str:
    """The chat-lora run, round by round, and what generate answered."""
    rows = [f"| {r['round']} | {_fmt(r['round_s'])} | {_fmt(r['train_s'])} | {_fmt(r['ratio'], '.2f')}"
            f"{'' if r['ratio'] is None or r['ratio'] <= ROUND_BUDGET else ' (over)'} | {_fmt(r['configure_s'])} "
            f"| {_fmt(r['download_s'])} | {_fmt(r['client_eval_s'])} | {_fmt(r['upload_s'])} | {_fmt(r['aggregate_s'])} "
            f"| {_fmt(r['waited_s'])} "
            f"| {_fmt(r['eval_loss'], '.4f')} |" for r in run["per_round"]]
    gen = run["generate"]
    return "\n".join([
        f"{run['model']} chat-lora (coordinator peak {_fmt(run['peak_mb'].get('coordinator'), '.0f')} MiB):", "",
        "| round | round s (critical path) | slowest client's train s | round / train "
        f"(<= {ROUND_BUDGET}) | configure s | download s (with the evaluation) | of which clients evaluate the last "
        "model s | upload s | aggregate s | waited for evaluate + commit s | clients' eval loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"$ {gen['command']}", gen["answer"], "", "what the model was fed (--show-prompt, stderr):",
        gen["shown_prompt"]])
