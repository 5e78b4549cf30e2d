"""`fedswarm sim --mode swarm`: a swarm coordinator, stage peers and trainers on loopback, peers
SIGKILLed on a schedule (and rejoining later), a timeline of throughput and stage occupancy."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

from fedswarm.client.swarm.lies import parse_lies
from fedswarm.sim.forkstart import warm_up
from fedswarm import settings
from fedswarm.run_config import RunConfig
from fedswarm.sim.hosts import HostNetwork, start_coordinator
from fedswarm.sim.peer_memory import proc_memory_mb
from fedswarm.sim.processes import READY, Proc, fedswarm_cmd, fetch_status, free_port, stop_all, wait_until
from fedswarm.sim.report import write_report
from fedswarm.proto.run_state import RunState


FIRST_TOKENS_TIMEOUT_S = 600.0   # with duration_from_first_tokens: start-up (imports, DHT, joins) may take this long


def add_swarm_arguments(p) -> None:
    p.add_argument("--peers", type=int, default=5, help="swarm: stage server processes")
    p.add_argument("--trainers", type=int, default=1, help="swarm: trainer processes")
    p.add_argument("--kill-every", type=float, default=0.0, help="swarm: SIGKILL a random peer every N seconds (0: never)")
    p.add_argument("--rejoin-after", type=float, default=10.0, help="swarm: a killed peer restarts after N seconds")
    p.add_argument("--duration", type=float, default=0.0, help="swarm: stop after N seconds even if rounds remain")
    p.add_argument("--inflight", type=int, default=2, help="swarm: micro-batches in flight per trainer")
    p.add_argument("--liars", type=int, default=0,
                   help="swarm: this many of the --peers peers lie (--lies; by default they corrupt every forward "
                        "output they send) and join after the honest ones (spot checks should catch them: status "
                        "shows lying_peer)")
    p.add_argument("--lie-scale", type=float, default=1.0,
                   help="swarm: a liar adds Gaussian noise of this many times its output's standard deviation")
    p.add_argument("--lies", default="corrupt", metavar="KINDS",
                   help="swarm: what the liars do, comma-separated, told in turn as a chain's first stage: corrupt "
                        "(at --lie-scale), blame_next, blame_replica, fabricate:LOSS, nan_loss (client/swarm/lies.py)")
    p.add_argument("--verify-fraction", type=float, default=None,
                   help="swarm: the trainers' --verify-fraction (default: theirs, 0.02)")
    p.add_argument("--hosts", action="store_true",
                   help="each process on its own network-namespace host with its own IP (needs root)")
    p.add_argument("--host-bandwidth", default="", metavar="RATE",
                   help="with --hosts: cap every host's link with tbf, e.g. 50mbit")
    p.add_argument("--no-fork", action="store_true",
                   help="swarm: start the coordinator, peers and trainers as fresh interpreters instead of forking "
                        "them from one process that imported torch and transformers once (slower start-up)")


class Swarm:
    """The peer and trainer processes of one sim; kills and restarts peers by name. With a HostNetwork each
    process runs on a host of its own (peer i on host 1 + i, trainers after the peers; host 0: coordinator)."""

    def __init__(self, out: Path, address: str, precision: str, data: str, inflight: int, net=None, peers: int = 0,
                 fork: bool = True):
        self.out, self.address, self.precision, self.data, self.inflight = out, address, precision, data, inflight
        self.net, self.num_peers = net, peers
        self.fork = fork   # forked from the pre-imported fork server (sim/forkstart.py), not a fresh interpreter
        self.procs: dict[str, Proc] = {}
        self.restarts: dict[str, int] = {}
        self.peer_flags: list[str] = []   # more `fedswarm client` flags for peers (--gradient-checkpointing)
        self.trainer_flags: list[str] = []
        self.liars: dict[str, dict] = {}   # peer name -> the FEDSWARM_LIE it is started with

    def _start(self, name: str, host: int, argv: list[str], log: Path) -> None:
        env = self.liars.get(name)
        if self.net is None:
            self.procs[name] = Proc(name, argv, log, env=env, fork=self.fork)
        else:
            argv += ["--p2p-host", self.net.hosts[host].ip]
            self.procs[name] = self.net.start(host, name, argv, log, env=env)

    def start_peer(self, name: str) -> None:
        n = self.restarts.get(name, 0)
        argv = fedswarm_cmd("client", "--role", "peer", "--coordinator", self.address, "--name", name,
                            "--threads", "1", "--precision", self.precision, *self.peer_flags)
        self._start(name, 1 + int(name[len("peer"):]), argv, self.out / f"{name}{'.' + str(n) if n else ''}.log")
        self.restarts[name] = n + 1

    def start_trainer(self, name: str, index: int, count: int) -> None:
        argv = fedswarm_cmd("client", "--role", "trainer", "--coordinator", self.address, "--name", name,
                            "--threads", "1", "--precision", self.precision, "--data", self.data,
                            "--partition", f"{index}/{count}", "--inflight", str(self.inflight), *self.trainer_flags)
        self._start(name, 1 + self.num_peers + index, argv, self.out / f"{name}.log")

    def kill(self, name: str) -> None:
        self.procs[name].signal(signal.SIGKILL)   # the whole process group: its p2pd dies too
        self.procs[name].stop()

    def live_peers(self) -> list[str]:
        return [n for n, p in self.procs.items() if n.startswith("peer") and p.popen.poll() is None]

    def stop(self) -> None:
        """The trainers first (no peer they call is gone yet: no bans logged at teardown), then every peer."""
        stop_all([p for n, p in self.procs.items() if not n.startswith("peer")])
        stop_all([p for n, p in self.procs.items() if n.startswith("peer")])


def run_swarm_sim(args, log=print, on_round=None) -> dict:
    out = Path(args.out)
    if (out / "state").exists():
        shutil.rmtree(out / "state")
    out.mkdir(parents=True, exist_ok=True)
    # every run setting as given to the sim (--mode swarm among them), evaluated on the data being trained on
    coord_args = ["--state-dir", str(out / "state"), "--eval-data", args.data,
                  *settings.to_argv(RunConfig, args, exclude=("min_clients", "eval_data"))]
    if args.lease is not None:   # benchmarks on a loaded machine: starting peers may miss the 3 s swarm lease
        coord_args += ["--lease", str(args.lease)]
    rng = random.Random(args.seed)
    timeline, faults = [], []
    started = time.time()
    # Processes are forked from a fork server that imported torch and transformers once, except on --hosts
    # (each starts inside its own namespace through `ip netns exec`) and with --no-fork.
    fork = not getattr(args, "no_fork", False) and not args.hosts
    with contextlib.ExitStack() as stack:
        net = None
        if args.hosts:
            net = stack.enter_context(HostNetwork(1 + args.peers + args.trainers, args.host_bandwidth or None))
            coordinator, address, status_address = start_coordinator(net, out, coord_args)
            stack.callback(coordinator.stop)
        else:   # the address is known before the coordinator listens, so every process starts at once
            address = status_address = f"127.0.0.1:{free_port()}"
            # a fresh interpreter: its imports run on one core while the fork server imports on the other
            coordinator = Proc("coordinator", fedswarm_cmd("coordinator", "--listen", address, *coord_args),
                               out / "coordinator.log")
            stack.callback(coordinator.stop)
            if fork:
                warm_up()
        swarm = Swarm(out, address, args.precision, args.data, args.inflight, net=net, peers=args.peers, fork=fork)
        stack.callback(swarm.stop)
        swarm.peer_flags = ["--gradient-checkpointing"] if getattr(args, "gradient_checkpointing", False) else []
        if getattr(args, "verify_fraction", None) is not None:
            swarm.trainer_flags = ["--verify-fraction", str(args.verify_fraction)]
        liars = min(getattr(args, "liars", 0), args.peers)   # the last --liars peers lie (sim/swarm_sim.py)
        lies = ",".join(f"corrupt:{args.lie_scale}" if k == "corrupt" else k
                        for k in getattr(args, "lies", "corrupt").split(","))
        parse_lies(lies)   # ValueError naming the kinds, before any process starts
        swarm.liars = {f"peer{i}": {"FEDSWARM_LIE": lies} for i in range(args.peers - liars, args.peers)}
        for i in range(args.peers - liars):
            swarm.start_peer(f"peer{i}")
        for i in range(args.trainers):
            swarm.start_trainer(f"trainer{i}", i, args.trainers)
        coordinator.wait_for_line(READY, 120)   # the clients retry until it listens
        if liars:   # after the honest peers joined: a liar takes the first stage of fewest peers, beside honest ones
            _wait_joined(status_address, args.peers - liars, coordinator)
            for i in range(args.peers - liars, args.peers):
                swarm.start_peer(f"peer{i}")
        log(f"t={time.time() - started:6.1f}s  coordinator on {address}")
        log(f"t={time.time() - started:6.1f}s  started {args.peers} peers on {args.stages} stages, "
            f"{args.trainers} trainer(s)" + (f", each on its own host ({args.host_bandwidth or 'uncapped'} links)"
                                             if net else " (forked from the pre-imported fork server)" if fork else ""))
        status = _follow(args, status_address, coordinator, swarm, rng, timeline, faults, started, log, on_round)
        peer_memory = {n: m for n, p in swarm.procs.items()   # the peers' python processes still running
                       if n.startswith("peer") and (m := proc_memory_mb(p.pid)) is not None}
        placed = [("coordinator", 0)] + [(name, _host_of(swarm, name)) for name in swarm.procs]
        hosts = [{"name": n, "netns": net.hosts[h].netns, "ip": net.hosts[h].ip} for n, h in placed] if net else []
    report = {
        "config": status["config"],
        "sim": {"mode": "swarm", "peers": args.peers, "trainers": args.trainers, "kill_every": args.kill_every,
                "rejoin_after": args.rejoin_after, "duration": args.duration, "cpu_count": os.cpu_count(),
                "liars": sorted(swarm.liars), "lie_scale": getattr(args, "lie_scale", 1.0),
                "hosts": hosts, "host_bandwidth": args.host_bandwidth if args.hosts else None},
        "rounds": status["rounds"], "swarm": status["swarm"], "clients": status["clients"], "peer_memory": peer_memory,
        "timeline": timeline, "faults": faults, "wall_seconds": round(time.time() - started, 2),
        "first_microbatch_s": next((p["t"] for p in timeline if p["completed"] > 0), None),
        "started_at": started,
    }
    write_report(out, report)
    plot_swarm(out, report)
    return report


def _wait_joined(address: str, peers: int, coordinator: Proc) -> None:
    wait_until(f"{peers} honest peers joined", lambda: sum(len(s["peers"]) for s in fetch_status(address)["swarm"][
        "stages"]) >= peers, 180, [coordinator], poll_s=0.2)


def _host_of(swarm: Swarm, name: str) -> int:
    if name.startswith("peer"):
        return 1 + int(name[len("peer"):])
    return 1 + swarm.num_peers + int(name[len("trainer"):])


def _follow(args, address, coordinator, swarm: Swarm, rng, timeline, faults, started, log, on_round=None) -> dict:
    tick, shown = threading.Event(), -1   # the last round logged
    next_kill = started + args.kill_every if args.kill_every else float("inf")
    # benchmarks time --duration from the first tokens, so a slow start-up does not eat the measured window
    clock_from_tokens, clock = getattr(args, "duration_from_first_tokens", False), started
    rejoin_at: list[tuple[float, str]] = []
    status = fetch_status(address)
    while True:
        if coordinator.popen.poll() is not None:
            raise RuntimeError(f"the coordinator exited with {coordinator.popen.returncode}; see {coordinator.log_path}")
        dead = [n for n, p in swarm.procs.items() if n.startswith("trainer") and p.popen.poll() not in (None, 0)]
        if dead:
            raise RuntimeError(f"trainer(s) {dead} failed; see {swarm.procs[dead[0]].log_path}")
        now = time.time()
        if now >= next_kill and swarm.live_peers():
            victim = rng.choice(swarm.live_peers())
            stage = next((s["stage"] for s in status["swarm"]["stages"] if victim in s["peers"]), None)
            swarm.kill(victim)
            faults.append({"at": round(now - started, 2), "peer": victim, "stage": stage, "kind": "SIGKILL"})
            rejoin_at.append((now + args.rejoin_after, victim))
            log(f"t={now - started:6.1f}s  SIGKILL {victim} (stage {stage})")
            next_kill = now + args.kill_every
        for due, name in [r for r in rejoin_at if r[0] <= now]:
            rejoin_at.remove((due, name))
            swarm.start_peer(name)
            faults.append({"at": round(now - started, 2), "peer": name, "stage": None, "kind": "rejoin"})
        status = fetch_status(address)
        sw = status["swarm"]
        timeline.append({"t": round(now - started, 2), "tokens_per_s": sw["tokens_per_s"],
                         "completed": sw["microbatches_completed"], "tokens": sw["tokens"],
                         "peers_per_stage": [len(s["peers"]) for s in sw["stages"]]})
        if sw["microbatches_completed"] and not any(p["completed"] for p in timeline[:-1]):
            log(f"t={now - started:6.1f}s  first micro-batch through all {len(sw['stages'])} stages")
        fresh = [r for r in status["rounds"] if r["round"] > shown]
        for r in fresh:
            if log:
                log(f"round {r['round']:>3}/{args.rounds}  eval loss {r['eval_loss']:.4f}  "
                    f"{sw['microbatches_completed']} micro-batches, {sw['tokens_per_s']:.0f} tokens/s, "
                    f"lost {sw['microbatches_lost']}")
            if on_round:
                on_round(r["round"])
        shown = fresh[-1]["round"] if fresh else shown
        if clock_from_tokens and clock == started:
            if sw["tokens"] > 0:
                clock = now
            elif now - started > FIRST_TOKENS_TIMEOUT_S:
                raise RuntimeError(f"no micro-batch completed in {FIRST_TOKENS_TIMEOUT_S:.0f} s; see the logs in {args.out}")
        counting = not clock_from_tokens or clock != started
        if status["state"] == RunState.DONE or (args.duration and counting and now - clock >= args.duration):
            rounds = fetch_status(address, history=True)["rounds"]   # every committed round, paged in
            return {**status, "rounds": [r for r in rounds if r["round"] <= status["round"]]}
        tick.wait(0.5)


def plot_swarm(out: Path, report: dict) -> None:
    """tokens_per_s.png and stage_occupancy.png, with fault events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    if not tl:
        return
    ts = [p["t"] for p in tl]
    kills = [f["at"] for f in report["faults"] if f["kind"] == "SIGKILL"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ts, [p["tokens_per_s"] for p in tl], label="tokens/s (trainers, 10 s window)")
    for i, k in enumerate(kills):
        ax.axvline(k, color="red", alpha=0.5, linestyle="--", label="peer SIGKILLed" if i == 0 else None)
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"swarm: {report['sim']['peers']} peers, {report['config']['stages']} stages")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tokens_per_s.png", dpi=100)
    plt.close(fig)

    plot_occupancy(out, report, plt)


def plot_occupancy(out: Path, report: dict, plt) -> None:
    """stage_occupancy.png: one panel per stage (its live peers over time), with the SIGKILLs, joins and
    re-assignments that touched that stage marked on its own panel."""
    tl, started = report["timeline"], report["started_at"]
    ts = [p["t"] for p in tl]
    stages = max(len(p["peers_per_stage"]) for p in tl)
    counts = [[p["peers_per_stage"][s] if s < len(p["peers_per_stage"]) else 0 for p in tl] for s in range(stages)]
    top = max(max(c) for c in counts) + 1
    marks = {  # kind -> (style, label)
        "kill": (dict(color="red", linestyle="--", alpha=0.8), "peer SIGKILLed"),
        "join": (dict(color="tab:blue", linestyle=":", alpha=0.8), "peer joined"),
        "move": (dict(color="green", linestyle="-", alpha=0.8, linewidth=2), "peer re-assigned here"),
    }
    placed = sorted((e["at"] - started, e["peer"], e["stage"]) for e in report["swarm"]["events"]
                    if e["kind"] == "joined" or e in report["swarm"]["reassignments"])

    def stage_at(peer: str, at: float):   # where the registry last put `peer` (the sim's status may lag it)
        return next((st for t, p, st in reversed(placed) if p == peer and t <= at + 0.5), None)

    events = [("kill", f["at"], f["stage"] if f["stage"] is not None else stage_at(f["peer"], f["at"]), f["peer"])
              for f in report["faults"] if f["kind"] == "SIGKILL"]
    events += [("join", e["at"] - started, e["stage"], e["peer"]) for e in report["swarm"]["events"]
               if e["kind"] == "joined" and e["at"] - started > (ts[0] if ts else 0)]
    events += [("move", e["at"] - started, e["stage"], e["peer"]) for e in report["swarm"]["reassignments"]]
    fig, axes = plt.subplots(stages, 1, figsize=(8, 1.6 + 1.5 * stages), sharex=True, squeeze=False)
    used = set()
    for s, ax in enumerate(axes[:, 0]):
        ax.fill_between(ts, counts[s], step="post", color="tab:gray", alpha=0.3)
        ax.step(ts, counts[s], where="post", color="black", linewidth=1.2)
        for kind, at, stage, peer in events:
            if stage != s:
                continue
            style, label = marks[kind]
            ax.axvline(at, label=label if kind not in used else None, **style)
            used.add(kind)
            ax.annotate(peer, (at, top - 0.4), fontsize=7, rotation=90, ha="right", va="top", color=style["color"])
        ax.set_ylim(0, top)
        ax.set_yticks(range(top))
        ax.set_ylabel(f"stage {s}\npeers")
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the sim started")
    fig.suptitle(f"stage occupancy: {report['sim']['peers']} peers on {stages} stages")
    handles = [h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]]
    labels = [lb for ax in axes[:, 0] for lb in ax.get_legend_handles_labels()[1]]
    if handles:
        fig.legend(handles, labels, loc="lower center", fontsize=8, ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.04 if handles else 0, 1, 0.96))
    fig.savefig(out / "stage_occupancy.png", dpi=100)
    plt.close(fig)
