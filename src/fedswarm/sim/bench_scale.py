"""`fedswarm bench scale`: federated full fine-tuning, LoRA and the swarm at real size, one after the other.

The models are built here with random weights (nothing downloaded): a 124M GPT-2 shape and a 135M Llama
shape, each saved as a Hugging Face folder with a BPE tokenizer trained on the spot. Each setup runs real
`fedswarm coordinator` and `fedswarm client` processes on loopback. Per round it reports where the time
went (download, train, upload from the clients' logs; aggregate, evaluate, checkpoint from the
coordinator's log and its store), and every process's peak RSS (VmHWM, sampled from /proc), against the
budgets: a full fine-tune's coordinator within 3x the model's fp32 size above its imports, a LoRA
coordinator that does not grow with the base, a peer within its imports + 1.3x its stage's state. The
chat-lora setup (asked for by name) runs the README's chat LoRA workflow round by round (bench_chat.py).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from datetime import datetime
from pathlib import Path

from fedswarm.sim.bench_chat import chat_table, run_chat
from fedswarm.sim.peer_memory import proc_memory_mb
from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status, wait_until
from fedswarm.proto.run_state import RunState

# lora-clients: --evaluate clients (no central evaluation); chat-lora: the README's chat LoRA workflow (bench_chat.py)
SETUPS = ("full", "lora", "lora-clients", "swarm", "chat-lora")
DEFAULT_SETUPS = ("full", "lora", "lora-clients", "swarm")
SWARM_ROUNDS = 10_000      # --scale-swarm-seconds: the swarm's round limit (it is stopped long before)
PEER_BUDGET = 1.3          # a peer's peak: its imports + this times its stage's state
COORDINATOR_BUDGET = 3.0   # a full fine-tune's coordinator: its imports + this times the model's fp32 size
IMPORTS = {"coordinator": "fedswarm.coordinator.main", "client": "fedswarm.client.daemon",
           "peer": "fedswarm.client.swarm.roles"}
TS = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?"


def _gpt2_124m():
    from transformers import GPT2Config

    return GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def _llama_135m():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, bos_token_id=0,
                       eos_token_id=0, pad_token_id=1, tie_word_embeddings=True)


SHAPES = {"gpt2-124m": _gpt2_124m, "llama-135m": _llama_135m}


# ---------------------------------------------------------------- models and data, built here

def write_corpus(path: Path, size: int) -> Path:
    """`size` bytes of real text: the standard library's sources, file after file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stdlib, written = Path(sysconfig.get_paths()["stdlib"]), 0
    with open(path, "w", encoding="utf-8") as fh:
        for source in sorted(stdlib.glob("*.py")):
            if written >= size:
                break
            text = source.read_text(encoding="utf-8", errors="replace")
            fh.write(text)
            written += len(text.encode("utf-8"))
    return path


def prepare_model(folder: Path, shape: str, corpus: Path, vocab: int, seed: int = 0) -> Path:
    """A random-init `shape` model and a BPE tokenizer trained on `corpus`, saved to `folder` (kept and
    reused when it is already there)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fedswarm.sim.tiny_hf import train_tokenizer

    marker = folder / "fedswarm-bench-scale.json"
    spec = {"shape": shape, "vocab": vocab, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec and (folder / "model.safetensors").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    text = corpus.read_text(encoding="utf-8")
    tokenizer = train_tokenizer([text[i:i + 4096] for i in range(0, len(text), 4096)], vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(SHAPES[shape]())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(spec))
    return folder


# ---------------------------------------------------------------- memory

class PeakSampler:
    """Every process's peak RSS (VmHWM, MiB), sampled from /proc until it exits or the sampler stops; with
    `trace`, each sample's VmRSS too (tab-separated: time, process, MiB), to line up with the logs."""

    def __init__(self, interval_s: float = 0.1, trace: Path | None = None):
        self.interval_s, self.peaks, self._pids = interval_s, {}, {}
        self._trace = open(trace, "w", encoding="utf-8") if trace else None
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="peak-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self._pids[name] = pid

    def sample(self) -> None:
        with self._lock:
            pids = dict(self._pids)
        for name, pid in pids.items():
            memory = proc_memory_mb(pid)
            if memory is not None:
                self.peaks[name] = max(self.peaks.get(name, 0.0), memory["peak_mb"])
                if self._trace:
                    self._trace.write(f"{time.time():.2f}\t{name}\t{memory['rss_mb']}\n")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._trace:
            self._trace.close()


def imports_mb(kind: str) -> float:
    """RSS (MiB) of a fresh interpreter that imported what a `kind` process imports."""
    code = (f"import {IMPORTS[kind]}, json; from fedswarm.sim.peer_memory import proc_memory_mb; "
            "print(json.dumps(proc_memory_mb()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the imports of a {kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["rss_mb"]


# ---------------------------------------------------------------- time split, from the logs

def _events(log: Path, pattern: str) -> list[tuple[float, tuple[str, ...]]]:
    """(time, groups) of each log line matching `pattern` (after the timestamp), in order."""
    regex = re.compile(TS + pattern)
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = regex.match(line)
        if m:
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m.groups()[1:]))
    return out


def _by_round(events, index: int = 0) -> dict[int, tuple[float, tuple[str, ...]]]:
    return {int(g[index]): (t, g) for t, g in events}


def client_times(log: Path) -> dict[int, dict[str, float]]:
    """Per round: when its download ended, its training seconds, its upload's end and seconds."""
    downloads = [t for t, _ in _events(log, r"downloaded model version \d+ as")]
    training = _by_round(_events(log, r"round (\d+): training on task"))
    trained = _by_round(_events(log, r"round (\d+): lr "))
    uploaded = _by_round(_events(log, r"round (\d+): loss [-\d.einf]+ in ([\d.]+) s, uploaded"))
    out = {}
    for rnd, (t_train, _) in training.items():
        if rnd not in uploaded or rnd not in trained:
            continue
        got = max((t for t in downloads if t <= t_train), default=t_train)
        out[rnd] = {"downloaded_at": got, "train_s": float(uploaded[rnd][1][1]),
                    "uploaded_at": uploaded[rnd][0], "upload_s": uploaded[rnd][0] - trained[rnd][0]}
    return out


def round_split(rounds: list[dict], client_logs: list[Path]) -> list[dict]:
    """Per round >= 1, in seconds: download (instructions out to the slowest client's model in hand), train
    and upload (the slowest client), aggregate (the last upload to the aggregate), evaluate (central), commit
    (evaluation and checkpoint, off the critical path: aggregate to committed row), and the round's critical
    path (its start to its aggregate), from the round records and the clients' logs."""
    clients = [client_times(p) for p in client_logs]
    rows = []
    for r in rounds:
        mine = [c[r["round"]] for c in clients if r["round"] in c]
        if r["round"] < 1 or not mine or not r.get("aggregated_at"):
            continue
        central = [e["seconds"] for e in r.get("evals") or () if e.get("source") == "central"]
        rows.append({
            "round": r["round"], "download_s": max(c["downloaded_at"] for c in mine) - r["configured_at"],
            "train_s": max(c["train_s"] for c in mine), "upload_s": max(c["upload_s"] for c in mine),
            "aggregate_s": r["aggregated_at"] - max(c["uploaded_at"] for c in mine),
            "evaluate_s": central[0] if central else None,
            "commit_s": r["committed_at"] - r["aggregated_at"] if r.get("committed_at") else None,
            "round_s": r["seconds"]})
    return rows


# ---------------------------------------------------------------- runs

def _run_settings(args: argparse.Namespace, model: Path, data: Path, state: Path) -> list[str]:
    flags = ["--state-dir", str(state), "--model", str(model), "--eval-data", str(data), "--rounds", str(args.rounds),
             "--local-steps", str(args.local_steps), "--seq-len", str(args.seq_len), "--batch-size",
             str(args.batch_size), "--eval-windows", str(args.eval_windows), "--seed", str(args.seed),
             "--upload-codec", args.upload_codec, "--download-codec", args.download_codec, "--lr", str(args.lr)]
    if getattr(args, "evaluate", None) not in (None, "central"):
        flags += ["--evaluate", args.evaluate]
    return flags


def _wait_done(address: str, timeout: float, watch: list[Proc]) -> dict:
    return wait_until("the run's end", lambda: (s := fetch_status(address))["state"] == RunState.DONE and s, timeout,
                      watch=watch, poll_s=1.0)


def run_to_end(coordinator: Proc, address: str, clients: list[Proc], peaks: PeakSampler, timeout: float) -> dict:
    """Watch the clients' memory, wait for the run's end and their exits: the status, with every round."""
    try:
        for c in clients:
            peaks.watch(c.name, c.pid)
        _wait_done(address, timeout, [coordinator, *clients])
        status = fetch_status(address, history=True)
        for c in clients:
            c.popen.wait(timeout=120)
        peaks.sample()
    finally:
        for c in clients:
            c.stop()
    return status


def run_federated(out: Path, model: Path, data: Path, setup: str, args: argparse.Namespace) -> dict:
    """A coordinator and --clients client processes: `setup` full (fine-tuning), lora, or lora-clients (the
    clients evaluate, the coordinator never does)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    coord = [*_run_settings(args, model, data, out / "state"), "--min-clients", str(args.clients), "--peft",
             "none" if setup == "full" else "lora", "--lora-r", str(args.lora_r), "--threads", "1"]
    if setup == "lora-clients":
        coord += ["--evaluate", "clients"]
    started = time.time()
    with PeakSampler(trace=out / "rss-trace.tsv") as peaks, \
            coordinator_process(out, coord, ready_timeout=args.scale_timeout) as (coordinator, address):
        peaks.watch("coordinator", coordinator.pid)
        clients = [Proc(f"client-{i}", fedswarm_cmd(
            "client", "--coordinator", address, "--data", str(data), "--partition", f"{i}/{args.clients}",
            "--name", f"client-{i}", "--threads", "1", "--device", "cpu", "--precision", args.precision,
            "--cache-dir", str(out / "cache")), out / f"client-{i}.log") for i in range(args.clients)]
        status = run_to_end(coordinator, address, clients, peaks, args.scale_timeout)
    return {"setup": setup, "rounds": status["rounds"],
            "split": round_split(status["rounds"], [c.log_path for c in clients]),
            "peak_mb": dict(peaks.peaks), "wall_s": round(time.time() - started, 1)}


def run_swarm(out: Path, model: Path, data: Path, args: argparse.Namespace) -> dict:
    """A swarm coordinator, --peers peer processes on --stages stages and one trainer (full fine-tuning). With
    --scale-swarm-seconds S the run has no round limit: it is read and stopped once the trainer has trained
    for S seconds (from its first micro-batch) and --rounds averages were made."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    seconds = args.scale_swarm_seconds
    run = argparse.Namespace(**{**vars(args), "rounds": SWARM_ROUNDS if seconds else args.rounds})
    coord = [*_run_settings(run, model, data, out / "state"), "--mode", "swarm", "--stages", str(args.stages),
             "--average-every", str(args.average_every), "--lease", "30", "--threads", "1"]
    started = time.time()
    with PeakSampler(trace=out / "rss-trace.tsv") as peaks, \
            coordinator_process(out, coord, ready_timeout=args.scale_timeout) as (coordinator, address):
        peaks.watch("coordinator", coordinator.pid)
        common = ["--coordinator", address, "--threads", "1", "--device", "cpu", "--precision", args.precision]
        procs = [Proc(f"peer{i}", fedswarm_cmd("client", "--role", "peer", "--name", f"peer{i}", *common),
                      out / f"peer{i}.log") for i in range(args.peers)]
        procs.append(Proc("trainer0", fedswarm_cmd("client", "--role", "trainer", "--name", "trainer0", "--data",
                                                   str(data), "--cache-dir", str(out / "cache"), *common),
                          out / "trainer0.log"))
        try:
            for p in procs:
                peaks.watch(p.name, p.pid)
            watch = [coordinator, *procs]
            first = None
            if seconds:
                wait_until("the first micro-batch", lambda: _swarm(address).get("microbatches_completed"),
                           args.scale_timeout, watch=watch, poll_s=1.0)
                first = time.time()
                wait_until(f"{seconds:.0f} s of training and {args.rounds} averages", lambda: time.time() - first >=
                           seconds and max((r["round"] for r in fetch_status(address)["rounds"]), default=0) >=
                           args.rounds, seconds + args.scale_timeout, watch=watch, poll_s=1.0)
                status = fetch_status(address, history=True)
            else:
                status = _wait_done(address, args.scale_timeout, watch)
            trained_s = time.time() - first if first else None
            peaks.sample()
            stages = {p["name"]: p.get("stage") for p in status.get("clients", []) if p.get("role") == "peer"}
        finally:
            for p in procs:
                p.stop()
    swarm = status.get("swarm", {})
    return {"setup": "swarm", "rounds": status["rounds"], "peer_stages": stages, "peak_mb": dict(peaks.peaks),
            "microbatches": swarm.get("microbatches_completed"), "replayed": swarm.get("microbatches_retried"),
            "lost": swarm.get("microbatches_lost"), "reassignments": list(swarm.get("reassignments", [])),
            "trained_s": round(trained_s, 1) if trained_s else None, "wall_s": round(time.time() - started, 1)}


def _swarm(address: str) -> dict:
    return fetch_status(address).get("swarm") or {}


# ---------------------------------------------------------------- what a peer holds

def peer_budgets(model: Path, args: argparse.Namespace) -> list[dict]:
    """Each stage measured in a fresh peer process (sim/peer_memory.py: one forward and backward step), its
    state (weights, gradients, AdamW moments, sync snapshot, upload residual, one micro-batch's activations)
    and its budget: imports + PEER_BUDGET x state."""
    from fedswarm.sim.peer_memory import measure_peer_memory

    precision = "bf16" if args.precision == "auto" else args.precision   # what a CPU peer's auto picks
    rows = measure_peer_memory(str(model), args.stages, args.seed, args.batch_size, args.seq_len, builds=("stage",),
                               precision=precision)
    lossy = args.upload_codec != "none"   # a lossless upload carries no residual (stage_sync.encode_progress)
    for r in rows:   # a peer of a run also holds its upload's error-feedback residual from its first sync on
        r["budget_mb"] = round(r["imports_mb"] + PEER_BUDGET * r["state_bytes"] / 2**20, 1)
        state = r["sync_state_bytes"] if lossy else r["state_bytes"]
        r["sync_budget_mb"] = round(r["imports_mb"] + PEER_BUDGET * state / 2**20, 1)
    return rows


def _served_stages(log: Path) -> list[int]:
    return [int(g[0]) for _, g in _events(log, r"now serving stage (\d+) \(was")]


# ---------------------------------------------------------------- the benchmark

def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def time_table(runs: list[dict]) -> str:
    keys = ("download_s", "train_s", "upload_s", "aggregate_s", "evaluate_s", "commit_s", "round_s")
    rows = []
    for r in runs:
        if r["setup"] == "swarm":
            rounds = [x for x in r["rounds"] if x["round"] > 0]
            moves = ", ".join(f"{m.get('peer')} {m.get('reason')}" for m in r["reassignments"]) or "none"
            trained = f" ({r['trained_s']:.0f} s training)" if r.get("trained_s") else ""
            rows.append(f"| {r['model']} | swarm | | | | | | | {_fmt(_mean(rounds, 'seconds'))} | "
                        f"{r['wall_s']:.0f} s{trained}, re-assignments: {moves}; {r['microbatches']} micro-batches, "
                        f"{r.get('replayed')} replayed, {r.get('lost')} lost |")
            continue
        split = r["split"]
        means = [_mean(split, k) for k in keys]
        ratio = means[-1] / means[1] if means[-1] and means[1] else None
        rows.append(f"| {r['model']} | {r['setup']} | " + " | ".join(_fmt(m) for m in means) + f" | {_fmt(ratio, '.2f')} |")
    return "\n".join(["| model | setup | download s | train s | upload s | aggregate s | evaluate s "
                      "| evaluate + checkpoint s (background) | round s (critical path) | round / train (swarm: wall, re-assignments) |",
                      "|---|---|---|---|---|---|---|---|---|---|", *rows])


def memory_table(runs: list[dict], models: dict, imports: dict) -> str:
    rows = []
    for r in runs:
        fp32 = models[r["model"]]["fp32_mb"]
        coord = r["peak_mb"].get("coordinator")
        above = (coord - imports["coordinator"]) / fp32 if coord else None
        others = {n: v for n, v in r["peak_mb"].items() if n != "coordinator"}
        verdict = ""
        if r["setup"] == "full" and above is not None:
            verdict = f"{'meets' if above <= COORDINATOR_BUDGET else 'MISSES'} (<= {COORDINATOR_BUDGET:.0f}x above imports)"
        elif r["setup"] in ("lora-clients", "chat-lora") and coord:
            verdict = f"{'meets' if coord < 1024 else 'MISSES'} (< 1 GiB, no base)"
        elif r["setup"] == "swarm":
            budgets = r.get("peer_budget_mb", {})
            fits = [r["peak_mb"][n] <= b for n, b in budgets.items()]
            verdict = (f"peers within imports + {PEER_BUDGET}x stage state: {sum(fits)} of {len(fits)} (peak / budget: "
                       + ", ".join(f"{n} {r['peak_mb'][n]:.0f} / {b:.0f}" for n, b in sorted(budgets.items())) + ")")
        rows.append(f"| {r['model']} | {r['setup']} | {fp32:.0f} | {_fmt(coord, '.0f')} | {_fmt(above, '.2f')} "
                    f"| {', '.join(f'{n} {v:.0f}' for n, v in sorted(others.items()))} | {verdict} |")
    return "\n".join(["| model | setup | fp32 MiB | coordinator peak MiB | (peak - imports) / fp32 "
                      "| other processes' peak MiB | verdict |", "|---|---|---|---|---|---|---|", *rows])


def peer_table(budgets: dict) -> str:
    rows = [f"| {m} | {b['stage']} | {b['params'] / 1e6:.1f}M | {b['state_bytes'] / 2**20:.0f} "
            f"| {b['activation_bytes'] / 2**20:.0f} | {b['imports_mb']:.0f} | {b['peak_mb']:.0f} | {b['budget_mb']:.0f} "
            f"| {(b['peak_mb'] - b['imports_mb']) * 2**20 / b['state_bytes']:.2f} |"
            for m, rows in budgets.items() for b in rows]
    return "\n".join(["| model | stage | params | state MiB | of which activations | imports MiB | peak MiB "
                      f"| budget MiB (imports + {PEER_BUDGET}x state) | (peak - imports) / state |",
                      "|---|---|---|---|---|---|---|---|---|", *rows])


def bench_scale(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in args.scale_models.split(",") if m.strip()]
    setups = [s.strip() for s in args.scale_setups.split(",") if s.strip()]
    unknown = [m for m in names if m not in SHAPES] + [s for s in setups if s not in SETUPS]
    if unknown:
        raise ValueError(f"unknown --scale-models / --scale-setups {unknown}: models {sorted(SHAPES)}, setups {SETUPS}")
    corpus = write_corpus(out / "data" / "corpus.txt", args.scale_corpus_mb << 20)
    print("imports of each kind of process ...", flush=True)
    imports = {kind: imports_mb(kind) for kind in IMPORTS}
    models, runs, budgets = {}, [], {}
    for name in names:
        print(f"{name}: building the model and its tokenizer ...", flush=True)
        folder = prepare_model(out / "models" / name, name, corpus, args.scale_vocab, args.seed)
        models[name] = _model_info(folder)
        if "swarm" in setups:
            print(f"{name}: one peer per stage, measured alone ...", flush=True)
            budgets[name] = peer_budgets(folder, args)
        for setup in setups:
            length = f"{args.scale_swarm_seconds:.0f}+ s" if setup == "swarm" and args.scale_swarm_seconds else \
                f"{args.rounds} rounds"
            print(f"{name}: {setup} ({length}) ...", flush=True)
            where = out / "runs" / f"{name}-{setup}"
            if setup == "swarm":
                run = run_swarm(where, folder, corpus, args)
            elif setup == "chat-lora":
                run = run_chat(where, folder, args)
            else:
                run = run_federated(where, folder, corpus, setup, args)
            run["model"] = name
            if setup == "swarm":
                by_stage = {b["stage"]: b for b in budgets[name]}
                run["peer_budget_mb"] = {p: max(by_stage[s]["sync_budget_mb"] for s in _served_stages(where / f"{p}.log"))
                                         for p in run["peak_mb"] if p.startswith("peer") and _served_stages(where / f"{p}.log")}
            runs.append(run)
    tables = {"time": time_table(runs), "memory": memory_table(runs, models, imports), "peers": peer_table(budgets),
              **{f"chat {r['model']}": chat_table(r) for r in runs if r["setup"] == "chat-lora"}}
    print(f"\n{args.rounds} rounds x {args.local_steps} local steps, batch {args.batch_size}x{args.seq_len}, "
          f"{args.clients} clients (swarm: {args.peers} peers on {args.stages} stages, 1 trainer), imports "
          + ", ".join(f"{k} {v:.0f} MiB" for k, v in imports.items()) + ":\n")
    print("\n\n".join(tables.values()))
    result = {"imports_mb": imports, "models": models, "runs": runs, "peer_budgets": budgets, "tables": tables}
    (out / "bench-scale.json").write_text(json.dumps(result, indent=2))
    return result


def _model_info(folder: Path) -> dict:
    """Parameters (tied weights once) and fp32 size, from a model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from fedswarm.models import model_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(str(folder)))
    params = sum(p.numel() for p in model.parameters())
    return {"folder": str(folder), "params": params, "fp32_mb": round(4 * params / 2**20, 1)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `fedswarm bench scale` (the shared bench parser supplies --rounds, --local-steps, --out ...)."""
    g = p.add_argument_group("bench scale")
    g.add_argument("--scale-models", default="gpt2-124m,llama-135m", help=f"scale: model shapes ({', '.join(SHAPES)})")
    g.add_argument("--scale-setups", default=",".join(DEFAULT_SETUPS),
                   help=f"scale: federated full / lora, and swarm (of {', '.join(SETUPS)})")
    g.add_argument("--scale-vocab", type=int, default=4096, help="scale: most tokens of the BPE tokenizer built here")
    g.add_argument("--scale-corpus-mb", type=int, default=2, help="scale: MiB of text the clients train on")
    g.add_argument("--scale-timeout", type=float, default=900.0, help="scale: seconds one run may take")
    g.add_argument("--scale-swarm-seconds", type=float, default=0.0,
                   help="scale: train the swarm for at least this many seconds (e.g. 300: re-assignments in 5 "
                        "minutes), then stop it; 0: until its --rounds averages are done")


SCALE_DEFAULTS = {"precision": "fp32",   # bf16 autocast (auto's choice on a CPU) is emulated, far slower, without bf16 units
                  "clients": 2, "rounds": 2, "local_steps": 2, "batch_size": 2, "seq_len": 64, "eval_windows": 8,
                  "stages": 3, "peers": 3, "average_every": 3}
