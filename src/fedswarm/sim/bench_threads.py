"""`fedswarm bench threads`: a coordinator and two clients started as a user would by hand (no thread flags)
vs the same with `--threads 1` on each client, side by side; seconds per round and their ratio."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status, wait_until
from fedswarm.proto.run_state import RunState

TARGET_RATIO = 1.5            # default round time / --threads 1 round time
CONFIGS = {"no thread flags": [], "--threads 1": ["--threads", "1"]}


def hand_started_round_seconds(out: Path, args: argparse.Namespace, client_flags: list[str],
                               env: dict | None = None, deadline_s: float = 3600.0) -> list[float]:
    """Seconds of each round after the first (which includes start-up), coordinator + 2 clients."""
    if out.exists():
        shutil.rmtree(out)
    coord_args = ["--state-dir", str(out / "state"), "--rounds", str(args.rounds), "--min-clients", "2",
                  "--model", args.model, "--local-steps", str(args.local_steps), "--seed", str(args.seed)]
    with coordinator_process(out, coord_args) as (coordinator, address):
        clients = [Proc(f"client-{i}", fedswarm_cmd("client", "--coordinator", address, "--partition", f"{i}/2",
                                                    "--name", f"client-{i}", *client_flags),
                        out / f"client-{i}.log", env=env) for i in range(2)]
        try:
            def finished():
                done = fetch_status(address)["state"] == RunState.DONE
                return fetch_status(address, history=True) if done else None   # every round, paged in
            status = wait_until("the last round", finished, deadline_s, watch=[coordinator, *clients], poll_s=1.0)
        finally:
            for client in clients:
                client.stop()
    return [r["seconds"] for r in status["rounds"] if r["round"] >= 2]


def bench_threads(args: argparse.Namespace) -> dict:
    if args.rounds < 2:
        raise SystemExit("error: bench threads needs --rounds >= 2 (round 1 includes start-up and is not counted)")
    runs = {}
    for name, flags in CONFIGS.items():
        print(f"coordinator + 2 clients, {name}, {args.rounds} rounds of {args.local_steps} steps ...", flush=True)
        seconds = hand_started_round_seconds(Path(args.out) / ("default" if not flags else "threads1"), args, flags)
        runs[name] = {"round_seconds": seconds, "mean_s": sum(seconds) / len(seconds)}
    default, one = runs["no thread flags"]["mean_s"], runs["--threads 1"]["mean_s"]
    ratio = default / one
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    table = "\n".join([
        "| clients started with | seconds per round | ratio |", "|---|---|---|",
        f"| --threads 1 | {one:.1f} | 1.00 |",
        f"| no thread flags (defaults) | {default:.1f} | {ratio:.2f} ({verdict} <= {TARGET_RATIO}) |"])
    print(f"\n{args.model}, {args.local_steps} local steps, rounds 2..{args.rounds} averaged, one run:\n")
    print(table)
    result = {"runs": runs, "ratio": ratio, "table": table}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench-threads.json").write_text(json.dumps(result, indent=2))
    return result
