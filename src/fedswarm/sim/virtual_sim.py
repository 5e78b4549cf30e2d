"""`fedswarm sim` with virtual clients: a real coordinator and W worker processes, each holding
many client sessions (sim/virtual.py), as local processes or as tasks on a Ray cluster."""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from fedswarm.sim.processes import Proc, coordinator_process
from fedswarm.sim.report import plot_rounds, write_report
from fedswarm.sim.virtual import RESULT_PREFIX, WorkerSpec

WORKER_EXIT_S = 120.0          # how long workers get to see TASK_DONE and exit after the last round
RAY_OBJECT_STORE_BYTES = 100 << 20   # a local Ray instance: the workers pass only small dicts
PROCESS_PER_CLIENT_MAX = 8     # beyond this many clients, `fedswarm sim` uses virtual clients


def add_virtual_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0,
                   help="virtual clients over W worker processes (0: auto: virtual when --clients > "
                        f"{PROCESS_PER_CLIENT_MAX} or with any option below, on min(2, cores) workers)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="where virtual-client workers run: local processes, or tasks on a Ray cluster")
    p.add_argument("--ray-address", default="", metavar="ADDR",
                   help="ray: an existing cluster (e.g. HOST:6379 or auto); default: start a local Ray instance")
    p.add_argument("--dropout-rate", type=float, default=0.0,
                   help="virtual: chance that a sampled client silently leaves the run instead of training (with "
                        "--secure-aggregation half of them leave after sending their masked update, and all rejoin "
                        "as new sessions once their lease ran out)")
    p.add_argument("--straggler-rate", type=float, default=0.0,
                   help="virtual: chance that a sampled client delays its upload by --straggler-delay")
    p.add_argument("--straggler-delay", type=float, default=5.0, help="virtual: seconds a straggler waits")
    p.add_argument("--virtual-version-cache", type=float, default=WorkerSpec.version_cache_mb, metavar="MIB",
                   help="virtual: MiB of model versions each worker keeps, so its clients download deltas from the "
                        "version they hold as daemons do (a client whose version was evicted gets a full copy)")


def wants_virtual(args: argparse.Namespace) -> bool:
    """Virtual clients when asked for (workers, Ray, dropouts, stragglers) or when there are many."""
    return (args.workers > 0 or args.backend == "ray" or args.dropout_rate > 0 or args.straggler_rate > 0
            or args.clients > PROCESS_PER_CLIENT_MAX)


def check_virtual_args(args: argparse.Namespace) -> str | None:
    """An error message for settings that cannot run, else None."""
    if args.workers < 0:
        return "--workers must be >= 0"
    if getattr(args, "mode", "federated") == "swarm" and (args.workers or args.backend != "local"
                                                          or args.dropout_rate or args.straggler_rate):
        return "--workers, --backend, --dropout-rate and --straggler-rate are for federated runs, not --mode swarm"
    if not 0 <= args.dropout_rate < 1 or not 0 <= args.straggler_rate <= 1:
        return "--dropout-rate must be in [0, 1) and --straggler-rate in [0, 1]"
    if args.straggler_delay < 0:
        return "--straggler-delay must be >= 0"
    if args.virtual_version_cache < 0:
        return "--virtual-version-cache must be >= 0 MiB (0: every download a full copy)"
    per_round = getattr(args, "clients_per_round", 0)
    if per_round > args.clients:
        return f"--clients-per-round {per_round} is more than --clients {args.clients}"
    return None


def worker_specs(args: argparse.Namespace, address: str) -> list[WorkerSpec]:
    workers = args.workers or min(2, os.cpu_count() or 1)
    workers = max(1, min(workers, args.clients))
    threads = max(1, (os.cpu_count() or 2) // workers)
    bounds = [args.clients * w // workers for w in range(workers + 1)]
    return [WorkerSpec(coordinator=address, first=lo, count=hi - lo, total=args.clients, data=args.data,
                       precision=args.precision, threads=threads, seed=args.seed, dropout_rate=args.dropout_rate,
                       straggler_rate=args.straggler_rate, straggler_delay_s=args.straggler_delay,
                       version_cache_mb=args.virtual_version_cache)
            for lo, hi in zip(bounds, bounds[1:])]


class LocalWorkers:
    """Workers as child processes of this one (`python -m fedswarm.sim.virtual SPEC`)."""

    def __init__(self, out: Path):
        self.out, self.procs = out, []

    def host_ip(self) -> str:
        return "127.0.0.1"

    def start(self, specs: list[WorkerSpec]) -> None:
        import sys

        self.procs = [Proc(f"worker-{w}", [sys.executable, "-m", "fedswarm.sim.virtual", spec.to_json()],
                           self.out / f"worker-{w}.log") for w, spec in enumerate(specs)]

    def failed(self) -> list[str]:
        return [f"{p.name} (exit {p.popen.returncode}, log {p.log_path})" for p in self.procs
                if p.popen.poll() not in (None, 0)]

    def results(self, timeout: float) -> list[dict]:
        out = []
        for proc in self.procs:
            proc.popen.wait(timeout=timeout)
            proc.stop()  # joins the log reader, so the whole output is in
            lines = [ln for ln in proc.output().splitlines() if ln.startswith(RESULT_PREFIX)]
            if proc.popen.returncode != 0 or not lines:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
            out.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
        return out

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


class RayWorkers:
    """Workers as Ray tasks (one CPU each, or `threads`), on a cluster or a local Ray instance."""

    def __init__(self, address: str, local_cpus: int):
        try:
            import ray
        except ImportError:
            raise RuntimeError("--backend ray needs Ray: pip install 'fedswarm[ray]'") from None
        self.ray, self.refs = ray, []
        self.started_ray = not ray.is_initialized()
        if self.started_ray and address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        elif self.started_ray:  # a private local instance on loopback, reporting nothing anywhere
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(num_cpus=local_cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=RAY_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1")

    def host_ip(self) -> str:
        """This host's address as the cluster's nodes see it."""
        return self.ray.util.get_node_ip_address()

    def start(self, specs: list[WorkerSpec]) -> None:
        from fedswarm.sim.virtual import run_worker

        needed, available = sum(s.threads for s in specs), self.ray.cluster_resources().get("CPU", 0)
        if needed > available:
            raise RuntimeError(f"the Ray cluster has {available:.0f} CPUs but {len(specs)} workers need {needed}; "
                               f"use fewer --workers")
        remote = self.ray.remote(run_worker)
        self.names = [f"worker-{w}" for w in range(len(specs))]
        self.refs = [remote.options(num_cpus=s.threads, name=n).remote(s.__dict__) for n, s in zip(self.names, specs)]

    def failed(self) -> list[str]:
        done, _ = self.ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        bad = []
        for name, ref in zip(self.names, self.refs):
            if ref in done:
                try:
                    self.ray.get(ref)
                except Exception as err:  # noqa: BLE001 - Ray wraps the worker's exception: report it
                    bad.append(f"{name} ({err})")
        return bad

    def results(self, timeout: float) -> list[dict]:
        return self.ray.get(self.refs, timeout=timeout)

    def stop(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        if self.started_ray:
            self.ray.shutdown()


def _raise_fd_limit() -> None:
    """Each virtual client holds a connection: let this process and its children open that many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_virtual_sim(args: argparse.Namespace, coord_args: list[str], follow, log=print) -> dict:
    """Run a virtual-client simulation to completion (the caller made OUT and cleared its state);
    `follow(address, coordinator, failed)` returns the final status. Returns the report (also
    written to OUT/report.json). Flags at the end of `coord_args` override earlier ones."""
    out = Path(args.out)
    _raise_fd_limit()
    per_round = getattr(args, "clients_per_round", 0)
    # Clients that drop out never come back (with --secure-aggregation they do): let rounds go on without them.
    gone = args.dropout_rate > 0 and not getattr(args, "secure_aggregation", False)
    left_at_most = args.rounds * (per_round or args.clients) if gone else 0
    min_clients = max(per_round or 1, args.clients - left_at_most)
    coord_args = ["--max-connections-per-address", str(max(1024, args.clients + 64)),   # each session dials
                  *coord_args, "--min-clients", str(min_clients)]
    remote = args.backend == "ray" and bool(args.ray_address)
    if remote:  # workers on other hosts dial this one
        coord_args = [*coord_args, "--listen", "0.0.0.0:0"]
    started = time.time()
    workers = RayWorkers(args.ray_address, sum(s.threads for s in worker_specs(args, ""))) if args.backend == "ray" else LocalWorkers(out)
    try:
        with coordinator_process(out, coord_args) as (coordinator, address):
            specs = worker_specs(args, f"{workers.host_ip()}:{address.rpartition(':')[2]}" if remote else address)
            log(f"coordinator on {address}; {args.clients} virtual clients on {len(specs)} {args.backend} "
                f"worker(s), {per_round or 'all'} per round")
            workers.start(specs)
            status = follow(address, coordinator, workers.failed)
            results = workers.results(WORKER_EXIT_S)
    finally:
        workers.stop()
    report = {
        "config": status["config"],
        "sim": {"clients": args.clients, "virtual": True, "backend": args.backend, "workers": len(specs),
                "data": args.data, "precision": args.precision, "threads_per_worker": specs[0].threads,
                "address": address, "dropout_rate": args.dropout_rate, "straggler_rate": args.straggler_rate,
                "version_cache_mb": args.virtual_version_cache,
                "downloads": "deltas from the version a client holds while its worker keeps that version "
                             "(--virtual-version-cache), else full float32 copies"},
        "rounds": status["rounds"],
        "clients": status["clients"],
        "rejections": status.get("rejections", {}),
        "virtual": {key: sum(r[key] for r in results) for key in
                    ("trained", "refused", "stragglers", "lost_leases", "finished", "train_seconds",
                     "downloads_delta", "downloads_full", "versions_evicted")}
                   | {"dropped": sorted(n for r in results for n in r["dropped"])},
        "wall_seconds": round(time.time() - started, 2),
    }
    write_report(out, report)
    plot_rounds(out, report["rounds"], f"{args.clients} virtual clients ({per_round or 'all'} per round), "
                                       f"{args.strategy}, {args.upload_codec} upload")
    return report

