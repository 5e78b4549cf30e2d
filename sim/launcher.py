"""`fedswarm sim`: a real coordinator and N real client processes on 127.0.0.1, then a report."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from fedswarm.coordinator.config import RunConfig
from fedswarm.proto.codec import CODEC_NAMES
from fedswarm.sim.processes import client_processes, coordinator_process, fetch_status
from fedswarm.sim.relay import CountingRelay
from fedswarm.sim.swarm_sim import add_swarm_arguments, run_swarm_sim
from fedswarm.sim.report import plot_rounds, write_report

DEFAULT_CLIENTS = 3
DEFAULT_ROUNDS = 6


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    p.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--upload-codec", default=d.upload_codec, choices=list(CODEC_NAMES))
    p.add_argument("--strategy", default=d.strategy)
    p.add_argument("--model", default=d.model)
    p.add_argument("--local-steps", type=int, default=d.local_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--clients-per-round", type=int, default=d.clients_per_round, metavar="K",
                   help="clients sampled per round (0: all of them)")
    p.add_argument("--fraction", type=float, default=d.fraction, metavar="F",
                   help="fraction of the clients sampled per round, at least K (0: not set)")
    p.add_argument("--server-lr", type=float, default=d.server_lr, help="the coordinator's outer learning rate")
    p.add_argument("--server-momentum", type=float, default=d.server_momentum, help="the coordinator's outer momentum")
    p.add_argument("--data", default="stdlib", help="stdlib or a text file / folder (split across clients)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default="sim-out", help="folder for report.json, plots, logs and state")
    p.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    add_swarm_arguments(p)


def run_sim(args: argparse.Namespace, log=print) -> dict:
    """Run one simulation to completion; returns the report (also written to OUT/report.json)."""
    out = Path(args.out)
    if (out / "state").exists():
        shutil.rmtree(out / "state")  # a sim is a fresh run; the coordinator resumes only by design
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // max(args.clients, 1))
    coord_args = ["--state-dir", str(out / "state"), "--rounds", str(args.rounds), "--min-clients", str(args.clients),
                  "--strategy", args.strategy, "--upload-codec", args.upload_codec, "--model", args.model,
                  "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
                  "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--seed", str(args.seed),
                  "--clients-per-round", str(args.clients_per_round), "--fraction", str(args.fraction),
                  *(["--server-lr", str(args.server_lr)] if args.server_lr is not None else []),
                  *(["--server-momentum", str(args.server_momentum)] if args.server_momentum is not None else [])]
    started = time.time()
    with coordinator_process(out, coord_args) as (coordinator, address), CountingRelay(address) as relay:
        log(f"coordinator on {address}; starting {args.clients} clients ({threads} thread(s) each)")
        client_args = ["--data", args.data, "--precision", args.precision]
        # Clients reach the coordinator through the relay, so every byte they send is counted at a socket.
        with client_processes(out, relay.address, args.clients, client_args, threads=threads) as clients:
            status = _follow(address, coordinator, clients, args.rounds, log if not args.quiet else None)
            for client in clients:  # they exit by themselves on TASK_DONE
                client.popen.wait(timeout=60)
        socket_up, socket_down = relay.counts()
    report = {
        "config": status["config"],
        "sim": {"clients": args.clients, "data": args.data, "precision": args.precision,
                "threads_per_client": threads, "address": address},
        "rounds": status["rounds"],
        "clients": status["clients"],
        "rejections": status.get("rejections", {}),
        "socket_bytes": {"up": socket_up, "down": socket_down},
        "wall_seconds": round(time.time() - started, 2),
    }
    write_report(out, report)
    plot_rounds(out, report["rounds"], f"{args.clients} clients, {args.strategy}, {args.upload_codec} upload")
    return report


def _follow(address: str, coordinator, clients, rounds: int, log) -> dict:
    """Print a line per committed round; return the final status once the run is done."""
    shown, tick = 0, threading.Event()
    while True:
        if coordinator.popen.poll() is not None:
            raise RuntimeError(f"the coordinator exited with {coordinator.popen.returncode}; see {coordinator.log_path}")
        dead = [c.name for c in clients if c.popen.poll() not in (None, 0)]
        if dead:
            raise RuntimeError(f"client(s) {dead} failed; see their logs in {clients[0].log_path.parent}")
        status = fetch_status(address)
        for r in status["rounds"][shown:]:
            if log:
                up = f"{r['bytes_up'] / 1e6:6.2f} MB up" if r["round"] else "initial model"
                log(f"round {r['round']:>3}/{rounds}  eval loss {r['eval_loss']:.4f}  {up}  {r['seconds']:5.1f} s")
        shown = len(status["rounds"])
        if status["state"] == "done":
            return status
        tick.wait(0.5)


def main(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.rounds < 1:
        print("error: --clients and --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.mode == "swarm":
        report = run_swarm_sim(args)
        sw = report["swarm"]
        first, last = report["rounds"][0]["eval_loss"], report["rounds"][-1]["eval_loss"]
        print(f"done in {report['wall_seconds']:.0f} s: eval loss {first:.4f} -> {last:.4f}; "
              f"{sw['microbatches_completed']} micro-batches ({sw['microbatches_retried']} replayed, "
              f"{sw['microbatches_lost']} lost), {len(sw['reassignments'])} re-assignments; "
              f"report in {Path(args.out) / 'report.json'}")
        return 0
    report = run_sim(args)
    first, last = report["rounds"][0]["eval_loss"], report["rounds"][-1]["eval_loss"]
    print(f"done in {report['wall_seconds']:.0f} s: eval loss {first:.4f} -> {last:.4f} "
          f"({last / first:.2f}x); report in {Path(args.out) / 'report.json'}")
    return 0
