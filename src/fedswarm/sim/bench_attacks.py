"""The security review's attacks, re-run at their size against one coordinator with its default limits:

    python -m fedswarm.sim.bench_attacks [--seconds 60] [--out bench-attacks]

A real coordinator (gpt2-tiny, plaintext, default serving limits) trains with one honest `fedswarm client`
daemon. Each attack then runs for --seconds beside an honest probe (Status, Heartbeat, Challenge and a health
check in turn on its own connection, each required to succeed) and prints, per attack: the probe's Status
latency (p50 and max), whether any honest call failed, what the attacker saw, the refusals the coordinator
counted meanwhile, the rounds committed meanwhile (the honest daemon keeps training) and the daemon's re-joins
and retries. Then a member uploads a finite 1e36 update: refused and counted, the model stays finite. Last, on
a coordinator of its own with authorized and admin keys, one admin key floods signed Status proofs while
another key joins afresh and reads Status in turn."""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import socket
import statistics
import threading
import time
from pathlib import Path

import grpc

from fedswarm.app import keygen
from fedswarm.client.identity import Identity
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals
from fedswarm.sim import attacks as A
from fedswarm.sim.processes import READY, Proc, fedswarm_cmd, fetch_status, wait_until

ATTACKER = "127.0.0.2"   # an address of its own for the connection flood (loopback is all of 127/8)
NOFILE = 1024   # the common open-file limit the coordinator runs at (soft and hard: it cannot raise it)
RUN = ["--model", "gpt2-tiny", "--min-clients", "1", "--rounds", "100000", "--local-steps", "2", "--seq-len", "32",
       "--batch-size", "2", "--eval-windows", "2", "--round-timeout", "10", "--upload-codec", "int8"]


class Bench:
    """The coordinator, the honest daemon and what each attack window changed."""

    def __init__(self, proc: Proc, listening: str, honest_log: Path, key: Path | None = None):
        """`listening`: the coordinator's "[::]:PORT"; honest traffic goes to 127.0.0.1, the attackers' to [::1]
        (another address to the coordinator, so a ban of the attacker's is not the honest side's). `key`: a
        private key file that may read Status, for an authenticated coordinator."""
        port = listening.rsplit(":", 1)[1]
        self.address, self.stranger = f"127.0.0.1:{port}", f"[::1]:{port}"
        self.proc, self.honest_log, self.key = proc, honest_log, key

    def snapshot(self) -> dict:
        status = fetch_status(self.address, timeout=60, key=self.key)   # a flood may still be draining
        log = self.honest_log.read_text(errors="replace")   # the whole log (a Proc keeps only its tail)
        return {"rejections": collections.Counter(status["rejections"]), "round": status["round"],
                "joins": log.count("joined run"), "retries": log.count(" failed (")}

    def window(self, name: str, attack, seconds: float) -> dict:
        """Run `attack(seconds)` (a coroutine returning (attacker outcomes, probe latencies, extra)) and report it."""
        before, started = self.snapshot(), time.monotonic()
        try:
            seen, latencies, extra = asyncio.run(attack(seconds))
            failed = ""
        except grpc.aio.AioRpcError as err:   # an honest call failed: the attack got through
            seen, latencies, extra, failed = collections.Counter(), {}, None, f"{err.code().name}: {err.details()}"
        took = time.monotonic() - started
        after = self.snapshot()
        status_ms = sorted(1000 * v for v in latencies.get("Status", []))
        counted = {k: after["rejections"][k] - before["rejections"][k] for k in after["rejections"]
                   if after["rejections"][k] != before["rejections"][k]}
        row = {"attack": name, "seconds": round(took, 1), "status_calls": len(status_ms),
               "status_p50_ms": round(statistics.median(status_ms), 1) if status_ms else None,
               "status_max_ms": round(status_ms[-1], 1) if status_ms else None,
               "honest_calls": sum(len(v) for v in latencies.values()), "honest_failed": failed,
               "attacker_saw": {_outcome(k): n for k, n in seen.items()},
               "counted": counted, "rounds_committed": after["round"] - before["round"],
               "honest_rejoins": after["joins"] - before["joins"], "honest_retries": after["retries"] - before["retries"],
               "extra": extra}
        print(json.dumps(row), flush=True)
        wait_until("the attacker's ban to end (the next attack starts afresh)", self._stranger_served, 180, poll_s=2.0)
        return row

    def _stranger_served(self) -> bool:
        try:
            with grpc.insecure_channel(self.stranger, options=A.OWN_CONNECTION) as ch:
                pb_grpc.CoordinatorStub(ch).Challenge(pb.ChallengeRequest(), timeout=10)
            return True
        except grpc.RpcError as err:
            return refusals.reason(err) != refusals.Reason.BANNED


def _outcome(key) -> str:
    """An attacker's outcome as text: (code, reason) pairs or plain strings."""
    if isinstance(key, tuple):
        return " ".join(str(getattr(k, "name", k)) for k in key if k).strip()
    return str(key)


# ---------------------------------------------------------------- the attacks

def baseline(b: Bench):
    async def run(seconds):
        stop = asyncio.Event()
        prober = asyncio.create_task(A.probe(b.address, None, stop))
        await asyncio.sleep(seconds)
        stop.set()
        return collections.Counter(), await prober, None
    return run


def silent_unary(b: Bench, connections: int, per_connection: int):
    """Status calls that never send their request (the review: 12,500, past gRPC's 12,000-call limit)."""
    return lambda seconds: A.flood(b.stranger, "/fedswarm.Coordinator/Status", connections, per_connection,
                                   seconds, None, probe_address=b.address)


def headerless_uploads(b: Bench, streams: int):
    """Header-less upload streams, each re-opened as soon as it is cut; an honest session uploads meanwhile."""
    bystander = A.join(b.address, ("bystander",))[0]

    async def honest_upload():
        accepted, took = await A.upload(b.address, bystander)
        return {"honest_upload_accepted": accepted, "honest_upload_s": round(took, 2)}
    return lambda seconds: A.flood(b.stranger, "/fedswarm.Coordinator/PushUpdate", max(1, streams // 100),
                                   min(streams, 100), seconds, None, during=honest_upload, settle_s=12.0,
                                   probe_address=b.address)


def silent_connections(b: Bench, count: int, source: str = ATTACKER):
    """`count` TCP connections from `source` that never speak, each re-opened as soon as the coordinator closes
    it (the coordinator runs at an open-file limit of NOFILE, soft and hard); the probe's connection is made
    before. A new honest connection (from 127.0.0.1) is also tried every second (its Status waits at most
    15 s): how many got in."""
    host, port = b.address.rsplit(":", 1)
    fresh = collections.Counter()

    def hold(stop: threading.Event) -> int:
        socks, opened = [], 0
        try:
            while not stop.is_set():
                socks = [s for s in socks if not A.closed(s)]
                while len(socks) < count and not stop.is_set():
                    try:
                        socks.append(socket.create_connection((host, int(port)), timeout=2,
                                                              source_address=(source, 0)))
                        opened += 1
                    except OSError:
                        break
                stop.wait(0.2)
        finally:
            for s in socks:
                s.close()
        return opened

    async def new_connections(stop: asyncio.Event):
        while not stop.is_set():
            try:
                async with A.channel(b.address) as ch:   # a new connection each time
                    await pb_grpc.CoordinatorStub(ch).Status(pb.StatusRequest(), timeout=15)
                fresh["new connection served"] += 1
            except grpc.aio.AioRpcError as err:
                fresh[f"new connection {err.code().name}"] += 1
            await asyncio.sleep(1.0)

    async def run(seconds):
        stop, halt = asyncio.Event(), threading.Event()
        prober = asyncio.create_task(A.probe(b.address, None, stop))
        await asyncio.sleep(0.5)   # the probe's connection is up before the silent ones come
        holder = asyncio.create_task(asyncio.to_thread(hold, halt))
        await asyncio.sleep(2.0)
        newer = asyncio.create_task(new_connections(stop))
        await asyncio.sleep(seconds)
        halt.set()
        stop.set()
        opened = await holder
        await newer
        return collections.Counter({"connections opened": opened}), await prober, dict(fresh)
    return run


def drip_uploads(b: Bench, streams: int, every_s: float):
    """One member's `streams` uploads of its one task, each sending a valid part every `every_s`; an honest
    session's upload is timed meanwhile."""
    mallory, bystander = A.join(b.stranger, ("mallory",))[0], A.join(b.address, ("bystander2",))[0]

    async def run(seconds):
        stop = asyncio.Event()
        prober = asyncio.create_task(A.probe(b.address, None, stop))
        async with A.channel(b.stranger) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            task = await A.open_task(stub, mallory)
            parts = await A.model_parts(stub, mallory, task, C.codec_by_name("int8"))
            push, head = A.pusher(ch), A.header(mallory, task, parts)
            seen, hurry = collections.Counter(), asyncio.Event()
            drips = [asyncio.create_task(A.drip(push, head, parts, every_s, hurry, seen)) for _ in range(streams)]
            accepted, took = await A.upload(b.address, bystander)
            await asyncio.sleep(max(0.0, seconds - took))
            hurry.set()
            await asyncio.gather(*drips)
        stop.set()
        return seen, await prober, {"honest_upload_accepted": accepted, "honest_upload_s": round(took, 2)}
    return run


def long_poll_flood(b: Bench, polls: int):
    """One session's `polls` concurrent PullTask long-polls."""
    mallory = A.join(b.stranger, ("mallory2",))[0]

    async def run(seconds):
        stop = asyncio.Event()
        prober = asyncio.create_task(A.probe(b.address, None, stop))
        async with A.channel(b.stranger) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            req = pb.PullTaskRequest(client_id=mallory.client_id, session_token=mallory.token, wait_s=seconds)

            async def poll():
                try:
                    task = await stub.PullTask(req, timeout=seconds + 30)
                    return "task" if task.kind == pb.TASK_TRAIN else "answered"
                except grpc.aio.AioRpcError as err:
                    return refusals.reason(err) or err.code().name
            seen = collections.Counter(await asyncio.gather(*[poll() for _ in range(polls)]))
        stop.set()
        return seen, await prober, None
    return run


def poisoned_update(b: Bench):
    """A member answers its task with a finite 1e36 on every weight."""
    mallory = A.join(b.stranger, ("poisoner",))[0]

    async def run(seconds):
        stop = asyncio.Event()
        prober = asyncio.create_task(A.probe(b.address, None, stop))
        outcome = collections.Counter()
        try:
            accepted, _ = await A.upload(b.stranger, mallory, value=1e36)
            outcome["accepted" if accepted else "refused"] += 1
        except grpc.aio.AioRpcError as err:
            outcome[refusals.reason(err) or err.code().name] += 1
        committed = fetch_status(b.address)["round"]
        await asyncio.to_thread(wait_until, "a round after the poisoned update",
                                lambda: fetch_status(b.address)["round"] > committed, 120)
        stop.set()
        losses = [r["eval_loss"] for r in fetch_status(b.address)["rounds"] if r.get("eval_loss") is not None]
        return outcome, await prober, {"eval_losses_finite": all(math.isfinite(v) for v in losses),
                                       "last_eval_loss": losses[-1] if losses else None}
    return run


def proof_flood(b: Bench, admin_key: Path, prober_key: Path, callers: int):
    """`callers` concurrent callers sign Status proofs with one admin key as fast as they can, many fresh
    nonces per challenge (the review filled the 200,000-entry nonce cache so in-process, and the next honest
    join read as replayed). Meanwhile another authorized key joins afresh and reads a signed Status in turn,
    each required to succeed."""
    admin, prober = Identity.load(admin_key), Identity.load(prober_key)

    async def flood_one(stop: asyncio.Event, seen: collections.Counter):
        async with A.channel(b.stranger) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            while not stop.is_set():
                reply = await stub.Challenge(pb.ChallengeRequest(), timeout=10)
                for _ in range(100):
                    try:
                        await stub.Status(pb.StatusRequest(**admin.status_proof(reply.run_id, reply.challenge)),
                                          timeout=10)
                        seen["proof accepted"] += 1
                    except grpc.aio.AioRpcError as err:
                        seen[(err.code(), refusals.reason(err))] += 1

    async def honest(stop: asyncio.Event, joins: collections.Counter) -> dict[str, list[float]]:
        latencies: dict[str, list[float]] = collections.defaultdict(list)
        async with A.channel(b.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            while not stop.is_set():
                reply = await stub.Challenge(pb.ChallengeRequest(), timeout=10)
                started = time.monotonic()
                await stub.Status(pb.StatusRequest(**prober.status_proof(reply.run_id, reply.challenge)), timeout=10)
                latencies["Status"].append(time.monotonic() - started)
                reply = await stub.Challenge(pb.ChallengeRequest(), timeout=10)
                started = time.monotonic()
                await stub.Join(pb.JoinRequest(name="prober", device="cpu", precision="fp32",
                                               **prober.join_proof("prober", "client", reply.run_id, reply.challenge)),
                                timeout=10)
                latencies["Join"].append(time.monotonic() - started)
                joins["fresh joins served"] += 1
                await asyncio.sleep(0.5)
        return latencies

    async def run(seconds):
        stop, seen, joins = asyncio.Event(), collections.Counter(), collections.Counter()
        prober_task = asyncio.create_task(honest(stop, joins))
        flooders = [asyncio.create_task(flood_one(stop, seen)) for _ in range(callers)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*flooders)
        return seen, await prober_task, dict(joins)
    return run


# ---------------------------------------------------------------- the run

def bench_attacks(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "honest.log").unlink(missing_ok=True)
    proc = Proc("coordinator", ["prlimit", f"--nofile={NOFILE}:{NOFILE}", *fedswarm_cmd(
        "coordinator", "--listen", "[::]:0", "--state-dir", str(out / "state"), *RUN)], out / "coordinator.log")
    try:
        b = Bench(proc, proc.wait_for_line(READY, 120).group(1), out / "honest.log")
        address = b.address
        honest = Proc("honest", fedswarm_cmd("client", "--coordinator", address, "--name", "honest", "--threads", "1"),
                      out / "honest.log")
        try:
            wait_until("the honest client's first round", lambda: fetch_status(address)["round"] >= 1, 300,
                       watch=(proc, honest))
            s = args.seconds
            rows = [b.window("none (baseline)", baseline(b), min(s, 10)),
                    b.window("12,500 unary calls that never send their request", silent_unary(b, 125, 100), s),
                    b.window("300 header-less uploads re-opened at once", headerless_uploads(b, 300), s),
                    b.window(f"1,100 silent TCP connections from one address, re-opened, at nofile {NOFILE}",
                             silent_connections(b, 1100), s),
                    b.window("16 uploads of one task dripping a part every 25 s", drip_uploads(b, 16, 25.0), s),
                    b.window("12,100 long-polls of one session", long_poll_flood(b, 12100), min(s, 30)),
                    b.window("a finite 1e36 update from a member", poisoned_update(b), s)]
        finally:
            honest.stop()
    finally:
        proc.stop()
    rows.append(authenticated_window(out, args.seconds))
    (out / "bench-attacks.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return rows


def authenticated_window(out: Path, seconds: float) -> dict:
    """The nonce-cache flood, on a coordinator of its own with --authorized-keys and --admin-keys (`fedswarm
    keygen` keys: client-0 trains, client-1 probes, client-2 is the admin key that floods)."""
    keys = out / "keys"
    keygen.keygen(keys, 3, ["127.0.0.1"], force=True)
    lines = (keys / "authorized_keys").read_text().splitlines()
    (keys / "members").write_text("\n".join(line for line in lines if not line.endswith("client-2")) + "\n")
    (keys / "admins").write_text("\n".join(line for line in lines if line.endswith("client-2")) + "\n")
    (out / "honest-auth.log").unlink(missing_ok=True)
    proc = Proc("coordinator-auth", ["prlimit", f"--nofile={NOFILE}:{NOFILE}", *fedswarm_cmd(
        "coordinator", "--listen", "[::]:0", "--state-dir", str(out / "state-auth"), *RUN,
        "--authorized-keys", str(keys / "members"), "--admin-keys", str(keys / "admins"))], out / "coordinator-auth.log")
    try:
        b = Bench(proc, proc.wait_for_line(READY, 120).group(1), out / "honest-auth.log", key=keys / "client-1.key")
        address = b.address
        honest = Proc("honest-auth", fedswarm_cmd("client", "--coordinator", address, "--name", "honest",
                                                  "--threads", "1", "--key", str(keys / "client-0.key")),
                      out / "honest-auth.log")
        try:
            key = keys / "client-1.key"
            wait_until("the honest client's first round", lambda: fetch_status(address, key=key)["round"] >= 1, 300,
                       watch=(proc, honest))
            return b.window("Status proofs of one admin key, 16 callers, fresh nonces",
                            proof_flood(b, keys / "client-2.key", key, 16), seconds)
        finally:
            honest.stop()
    finally:
        proc.stop()


def table(rows: list[dict]) -> str:
    lines = ["| attack | Status p50 / max ms | honest calls failed | counted | rounds committed | honest re-joins |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        counted = ", ".join(f"{k} {v}" for k, v in sorted(r["counted"].items())) or "none"
        lines.append(f"| {r['attack']} | {r['status_p50_ms']} / {r['status_max_ms']} | "
                     f"{r['honest_failed'] or '0 of ' + str(r['honest_calls'])} | {counted} | {r['rounds_committed']} "
                     f"| {r['honest_rejoins']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedswarm.sim.bench_attacks", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long each attack runs")
    p.add_argument("--out", default="bench-attacks", help="folder for the logs, state and bench-attacks.json")
    bench_attacks(p.parse_args(argv))


if __name__ == "__main__":
    main()
