"""`fedswarm bench lora`: bytes per round of full fine-tuning vs LoRA, codec none vs int8, side by side.

One run builds a small GPT-2 and its BPE tokenizer on the spot (nothing downloaded), gives two sites
their own JSON Lines file, and runs the same rounds four times (full / LoRA x none / int8): a real
coordinator and two client processes that reach it through a byte-counting relay, so the upload
bytes are counted at the socket.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status, wait_until
from fedswarm.sim.relay import CountingRelay
from fedswarm.sim.tiny_hf import fact_records, save_tiny_hf
from fedswarm.proto.run_state import RunState

SETUPS = (("none", "none"), ("none", "int8"), ("lora", "none"), ("lora", "int8"))   # (--peft, codec)


def _prepare(out: Path, args: argparse.Namespace) -> tuple[Path, list[Path], Path]:
    sites = []
    for i, kind in enumerate(("add", "color")):
        path = out / "data" / f"site-{kind}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in fact_records(kind, args.records, i + 1)))
        sites.append(path)
    corpus = [r["text"] for kind in ("add", "color") for r in fact_records(kind, 400, 9)]
    model = save_tiny_hf(out / "model", "gpt2", corpus, vocab_size=args.vocab, layers=args.layers, hidden=args.hidden)
    return model, sites, out / "data"


def _one_run(out: Path, model: Path, sites: list[Path], eval_data: Path, peft: str, codec: str,
             args: argparse.Namespace) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    coord = ["--state-dir", str(out / "state"), "--model", str(model), "--eval-data", str(eval_data),
             "--rounds", str(args.rounds), "--min-clients", str(len(sites)), "--upload-codec", codec,
             "--local-steps", str(args.local_steps), "--seq-len", str(args.seq_len), "--batch-size",
             str(args.batch_size), "--lr", str(args.lora_lr if peft == "lora" else args.lr), "--peft", peft,
             "--lora-r", str(args.lora_r)]
    started = time.time()
    with coordinator_process(out, coord) as (coordinator, address), CountingRelay(address) as relay:
        clients = [Proc(f"site-{i}", fedswarm_cmd("client", "--coordinator", relay.address, "--data", str(site),
                                                   "--name", f"site-{i}", "--threads", "1", "--device", "cpu"),
                        out / f"site-{i}.log") for i, site in enumerate(sites)]
        try:
            wait_until("the run's end", lambda: fetch_status(address)["state"] == RunState.DONE, args.timeout,
                       watch=[coordinator, *clients])
            status = fetch_status(address, history=True)   # every round (a Status lists the last ones)
            for c in clients:
                c.popen.wait(timeout=60)
        finally:
            for c in clients:
                c.stop()
        socket_up, _ = relay.counts()
    rounds = [r for r in status["rounds"] if r["round"] > 0]
    return {"peft": peft, "codec": codec, "socket_bytes_up_per_round": socket_up / len(rounds),
            "update_bytes_per_round": sum(r["bytes_up"] for r in rounds) / len(rounds),
            "fp32_update_bytes_per_client": rounds[0]["bytes_up_raw"] / len(rounds[0]["clients"]),
            "initial_eval_loss": status["rounds"][0]["eval_loss"], "final_eval_loss": rounds[-1]["eval_loss"],
            "wall_seconds": round(time.time() - started, 1)}


def bench_lora(args: argparse.Namespace) -> dict:
    from fedswarm.models import build_model, num_parameters

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, sites, eval_data = _prepare(out, args)
    base = build_model(str(model))
    full_fp32, vocab = 4 * num_parameters(base), base.config.vocab_size
    runs = []
    for peft, codec in SETUPS:
        print(f"running --peft {peft} / {codec} ({len(sites)} sites, {args.rounds} rounds) ...", flush=True)
        runs.append(_one_run(out / f"{peft}-{codec}", model, sites, eval_data, peft, codec, args))
    full_none = runs[0]["socket_bytes_up_per_round"]
    rows = [f"| {'LoRA r=' + str(args.lora_r) if r['peft'] == 'lora' else 'full model'} | {r['codec']} "
            f"| {r['fp32_update_bytes_per_client'] / 1e3:.1f} "
            f"| {r['socket_bytes_up_per_round'] / 1e3:.1f} | {r['socket_bytes_up_per_round'] / full_none:.4f} "
            f"| {r['initial_eval_loss']:.3f} -> {r['final_eval_loss']:.3f} |" for r in runs]
    table = "\n".join(["| trained | codec | fp32 update per client (kB) | socket kB up per round (2 clients) "
                       "| vs full, none | eval loss |", "|---|---|---|---|---|---|", *rows])
    print(f"\nGPT-2 {args.layers} layers x {args.hidden}, vocab {vocab}: {full_fp32 / 1e6:.2f} MB fp32; "
          f"LoRA r={args.lora_r} on c_attn; {args.rounds} rounds x {args.local_steps} steps, same data:\n")
    print(table)
    result = {"full_model_fp32_bytes": full_fp32, "runs": runs, "table": table}
    (out / "bench-lora.json").write_text(json.dumps(result, indent=2))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `fedswarm bench lora` (the shared bench parser supplies --out, --rounds, --seed ...)."""
    g = p.add_argument_group("bench lora")
    g.add_argument("--records", type=int, default=600, help="lora: records per site")
    g.add_argument("--vocab", type=int, default=1024, help="lora: most tokens in the BPE vocabulary of the built model")
    g.add_argument("--layers", type=int, default=4, help="lora: GPT-2 layers of the built model")
    g.add_argument("--hidden", type=int, default=128, help="lora: GPT-2 width of the built model")
    g.add_argument("--lora-lr", type=float, default=1e-2, help="lora: learning rate of the LoRA runs")
    g.add_argument("--timeout", type=float, default=600.0, help="lora: seconds one run may take")
