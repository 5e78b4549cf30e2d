"""`fedswarm sim`: a real coordinator and N real client processes on 127.0.0.1, then a report."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import grpc

from fedswarm.run_config import RunConfig
from fedswarm import settings
from fedswarm.progress import Progress
from fedswarm.sim.hosts import HostNetwork, burst_bytes, probe, start_coordinator
from fedswarm.sim.processes import client_processes, coordinator_process, fedswarm_cmd, fetch_status
from fedswarm.sim.relay import CountingRelay
from fedswarm.sim.swarm_sim import add_swarm_arguments, run_swarm_sim
from fedswarm.sim.virtual_sim import (PROCESS_PER_CLIENT_MAX, add_virtual_arguments, check_virtual_args,
                                      run_virtual_sim, wants_virtual)
from fedswarm.sim.report import communication, plot_rounds, privacy_line, privacy_report, write_report
from fedswarm.proto.run_state import RunState

DEFAULT_CLIENTS = 3
DEFAULT_ROUNDS = 6
STATUS_TRIES = 6   # Status calls (10 s deadline each) the coordinator may leave unanswered in a row


SIM_SETS = ("min_clients", "eval_data")   # the sim derives these from --clients and --data


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="client processes to start")
    # every run setting the coordinator takes, with the same flag, help and default (but 6 rounds)
    settings.add_arguments(p, RunConfig, exclude=SIM_SETS, defaults={"rounds": DEFAULT_ROUNDS})
    p.add_argument("--data", default="stdlib", help="stdlib or a text file / folder (split across clients)")
    p.add_argument("--precision", default="auto", help="clients' precision (auto, fp32, bf16, fp16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per client (0: cores / clients)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="start every client (and swarm peer) with --gradient-checkpointing: less memory, more compute")
    p.add_argument("--out", default="sim-out", help="folder for report.json, plots, logs and state")
    p.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    p.add_argument("--lease", type=float, default=None,
                   help="the coordinator's --lease: seconds of silence before a client (a dropout too) is dropped")
    add_swarm_arguments(p)
    add_virtual_arguments(p)


def run_sim(args: argparse.Namespace, log=print, on_round=None) -> dict:
    """Run one simulation to completion; returns the report (also written to OUT/report.json).
    `on_round(n)` is called as round n commits (a progress bar)."""
    out = Path(args.out)
    if (out / "state").exists():
        shutil.rmtree(out / "state")  # a sim is a fresh run; the coordinator resumes only by design
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(args.clients, 1))
    coord_args = coordinator_argv(args, out)
    if wants_virtual(args):  # many sessions per worker process, locally or on Ray
        follow = lambda address, coordinator, failed: _follow(  # noqa: E731
            address, coordinator, failed, args.rounds, log if not args.quiet else None)
        return run_virtual_sim(args, coord_args, follow, log)
    started = time.time()
    client_args = ["--data", args.data, "--precision", args.precision, *checkpointing_flags(args)]
    hosts = []
    if getattr(args, "hosts", False):  # each process on its own network-namespace host
        with HostNetwork(args.clients + 1, args.host_bandwidth or None) as net:
            coordinator, address, status_address = start_coordinator(net, out, coord_args)
            log(f"coordinator on {address}; starting {args.clients} clients on hosts of their own")
            clients = [net.start(i + 1, f"client-{i}", fedswarm_cmd(
                "client", "--coordinator", address, "--partition", f"{i}/{args.clients}", "--name", f"client-{i}",
                "--threads", str(threads), *client_args), out / f"client-{i}.log") for i in range(args.clients)]
            failed = lambda: [c.name for c in clients if c.popen.poll() not in (None, 0)]  # noqa: E731
            status = _follow(status_address, coordinator, failed, args.rounds, log if not args.quiet else None, on_round,
                             counts=lambda: net.link_bytes(0))
            for client in clients:
                client.popen.wait(timeout=60)
            socket_up, socket_down = net.link_bytes(0)   # what the coordinator's host received / sent, at its link
            coordinator.stop()
            hosts = [{"name": n, "netns": h.netns, "ip": h.ip}
                     for n, h in zip(["coordinator"] + [f"client-{i}" for i in range(args.clients)], net.hosts)]
    else:
        with coordinator_process(out, coord_args) as (coordinator, address), CountingRelay(address) as relay:
            log(f"coordinator on {address}; starting {args.clients} clients ({threads} thread(s) each)")
            # Clients reach the coordinator through the relay, so every byte they send is counted at a socket.
            with client_processes(out, relay.address, args.clients, client_args, threads=threads) as clients:
                failed = lambda: [c.name for c in clients if c.popen.poll() not in (None, 0)]  # noqa: E731
                status = _follow(address, coordinator, failed, args.rounds, log if not args.quiet else None, on_round,
                                 counts=relay.counts)
                for client in clients:  # they exit by themselves on TASK_DONE
                    client.popen.wait(timeout=60)
            socket_up, socket_down = relay.counts()
    report = {
        "config": status["config"],
        "sim": {"clients": args.clients, "data": args.data, "precision": args.precision,
                "threads_per_client": threads, "address": address, "hosts": hosts,
                "host_bandwidth": (args.host_bandwidth or None) if hosts else None},
        "rounds": status["rounds"],
        "clients": status["clients"],
        "rejections": status.get("rejections", {}),
        "socket_bytes": {"up": socket_up, "down": socket_down, "measured_at": "coordinator host link" if hosts else "socket"},
        "communication": communication(status["rounds"], RunConfig.from_status(status), args.clients, socket_up, socket_down),
        "wall_seconds": round(time.time() - started, 2),
        **privacy_report(status),
    }
    write_report(out, report)
    plot_rounds(out, report["rounds"], f"{args.clients} clients, {args.strategy}, {args.upload_codec} upload")
    return report


def checkpointing_flags(args: argparse.Namespace) -> list[str]:
    """The client flag the sim passes on to the processes it starts."""
    return ["--gradient-checkpointing"] if getattr(args, "gradient_checkpointing", False) else []


def coordinator_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """The sim's coordinator flags: every run setting as given to the sim, evaluated on the held-out split of
    the data being trained on, waiting for all the sim's clients."""
    lease = [] if args.lease is None else ["--lease", str(args.lease)]
    return ["--state-dir", str(out / "state"), "--min-clients", str(args.clients), "--eval-data", args.data,
            *lease, *settings.to_argv(RunConfig, args, exclude=SIM_SETS)]


def _follow(address: str, coordinator, failed, rounds: int, log, on_round=None, counts=None) -> dict:
    """Print a line per committed round; return the final status once the run is done.
    `failed()` names the client processes (or workers) that died. With `counts()` (socket bytes up, down so far),
    each round gets the counts as it was seen committed (socket_up, socket_down: cumulative). The final status
    holds every committed round (paged in), not only the last ones a Status lists."""
    seen: dict[int, tuple[int, int]] = {}   # round -> socket counts when it was first seen committed
    shown, unanswered, tick = -1, 0, threading.Event()
    while True:
        if coordinator.popen.poll() is not None:
            raise RuntimeError(f"the coordinator exited with {coordinator.popen.returncode}; see {coordinator.log_path}")
        dead = failed()
        if dead:
            raise RuntimeError(f"client(s) {dead} failed; see their logs in {coordinator.log_path.parent}")
        try:
            status = fetch_status(address)
        except grpc.RpcError as err:
            unanswered += 1
            if unanswered >= STATUS_TRIES:
                raise RuntimeError(f"the coordinator did not answer Status {unanswered} times in a row "
                                   f"({err.code().name}); see {coordinator.log_path}") from None
            tick.wait(0.5)
            continue
        unanswered = 0
        fresh = [r for r in status["rounds"] if r["round"] > shown]
        if counts is not None and fresh:
            now = counts()
            seen.update((r["round"], now) for r in fresh)
        for r in fresh:
            if log:
                traffic = (f"{r['bytes_up'] / 1e6:6.2f} MB up {(r.get('bytes_down') or 0) / 1e6:6.2f} MB down"
                           if r["round"] else "initial model")
                log(f"round {r['round']:>3}/{rounds}  eval loss {_loss(r)}  {traffic}  {r['seconds']:5.1f} s")
            if on_round:
                on_round(r["round"])
        shown = fresh[-1]["round"] if fresh else shown
        if status["state"] == RunState.DONE:
            final = fetch_status(address, history=True)
            if counts is not None:
                last = counts()
                for r in final["rounds"]:
                    r["socket_up"], r["socket_down"] = seen.get(r["round"], last)
            return final
        tick.wait(0.5)


def _loss(r: dict) -> str:
    """A round's eval loss for a progress line, and where it was evaluated when not on the coordinator."""
    if r.get("eval_loss") is None:
        return "  -   "
    return f"{r['eval_loss']:.4f}" + (f" ({r['eval_source']})" if r.get("eval_source") == "clients" else "")


def main(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.rounds < 1:
        print("error: --clients and --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.host_bandwidth and not args.hosts:
        print("error: --host-bandwidth caps the links of --hosts: add --hosts", file=sys.stderr)
        return 2
    if args.host_bandwidth:
        try:
            burst_bytes(args.host_bandwidth)
        except ValueError as err:
            print(f"error: --host-bandwidth {err}", file=sys.stderr)
            return 2
    if args.hosts and (reason := probe()):
        print(f"error: --hosts cannot make network namespaces here: {reason}", file=sys.stderr)
        return 2
    problem = check_virtual_args(args)
    if not problem and args.gradient_checkpointing and args.mode != "swarm" and wants_virtual(args):
        problem = ("--gradient-checkpointing is passed to client processes, and this sim runs virtual clients: "
                   f"drop it, or use at most {PROCESS_PER_CLIENT_MAX} --clients and none of --workers, "
                   "--backend ray, --dropout-rate, --straggler-rate")
    if not problem and args.evaluate != "central" and args.mode != "swarm" and wants_virtual(args):
        problem = (f"--evaluate {args.evaluate} asks client processes to evaluate, and this sim runs virtual clients "
                   f"(they only train): use --evaluate central, or at most {PROCESS_PER_CLIENT_MAX} --clients and none "
                   "of --workers, --backend ray, --dropout-rate, --straggler-rate")
    if not problem and args.secure_aggregation:   # what the coordinator would refuse, said before it starts
        problem = settings.from_args(RunConfig, args, min_clients=args.clients).secure_aggregation_conflict()
        problem = problem and f"--secure-aggregation: {problem}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.mode == "swarm":
        with Progress("swarm sim: rounds", args.rounds) as progress:
            report = run_swarm_sim(args, log=progress.line, on_round=progress.update)
        sw = report["swarm"]
        first, last = report["rounds"][0]["eval_loss"], report["rounds"][-1]["eval_loss"]
        print(f"done in {report['wall_seconds']:.0f} s: eval loss {first:.4f} -> {last:.4f}; "
              f"{sw['microbatches_completed']} micro-batches ({sw['microbatches_retried']} replayed, "
              f"{sw['microbatches_lost']} lost), {len(sw['reassignments'])} re-assignments; "
              f"report in {Path(args.out) / 'report.json'}")
        return 0
    with Progress("sim: rounds", args.rounds) as progress:
        report = run_sim(args, log=progress.line, on_round=progress.update)
    first, last = report["rounds"][0]["eval_loss"], report["rounds"][-1]["eval_loss"]
    if first is None or last is None:   # --evaluate clients, and a round's evaluation brought no answer
        first = last = float("nan")
    comm = report.get("communication")   # virtual clients have no socket relay, so no socket figures
    traffic = ""
    if comm:
        vs = f", {comm['allreduce_over_socket']}x less than fp32 all-reduce" if comm["allreduce_over_socket"] else ""
        traffic = (f"; {(comm['socket_bytes_up'] + comm['socket_bytes_down']) / 1e6:.1f} MB at the socket for "
                   f"{comm['tokens']} tokens{vs}")
    print(f"done in {report['wall_seconds']:.0f} s: eval loss {first:.4f} -> {last:.4f} ({last / first:.2f}x)"
          f"{traffic}{privacy_line(report)}; report in {Path(args.out) / 'report.json'}")
    return 0
