"""`fedswarm status`: the coordinator's status as a table (or JSON), optionally refreshed.

Imports only grpc, the proto stubs and the client's channel helper: no torch, transformers or Flower."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from fedswarm.run_config import RunConfig


def fetch(args: argparse.Namespace) -> dict:
    """One Status call (signed with --key when given: an authenticated run requires it), with every committed
    round paged in when --history; raises grpc.RpcError or IdentityError."""
    from fedswarm.client.identity import Identity, open_channel, status_request
    from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc

    identity = Identity.load(args.key) if getattr(args, "key", None) else None
    with open_channel(args.coordinator, args.tls_ca) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        request = lambda: status_request(stub, identity, args.timeout)  # noqa: E731 - a fresh proof per call
        status = json.loads(stub.Status(request(), timeout=args.timeout).json)
        if getattr(args, "history", False):
            status["rounds"] = fetch_history(stub, request, args.timeout, through=status["round"])
        return status


def fetch_history(stub, request, timeout: float, through: int | None = None) -> list[dict]:
    """Every committed round (up to round `through`), page by page; `request()` makes a (signed) StatusRequest."""
    rounds: list[dict] = []
    start: int | None = 0
    while start is not None and (through is None or start <= through):
        req = request()
        req.history, req.from_round = True, start
        page = json.loads(stub.Status(req, timeout=timeout).json)
        if "next_round" not in page:   # a coordinator without pages lists every round in its status
            return [r for r in page["rounds"] if through is None or r["round"] <= through]
        if not page["rounds"]:
            break
        rounds += page["rounds"]
        start = page["next_round"]
    return [r for r in rounds if through is None or r["round"] <= through]


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(status: dict, address: str, all_rounds: bool = False) -> str:
    """The status as readable text: a header line and totals, then rounds (the last 10, or all of those in
    `status`), clients and (swarm) stages tables."""
    cfg = RunConfig.from_status(status)
    out = [f"coordinator {address}  run {status.get('run_id', '?')}  {cfg.mode} {cfg.model} {cfg.strategy}  "
           f"state {status['state']}  "
           f"round {status['round']}/{status['rounds_total']}"
           + (f" (round {status['current_round']} in flight)" if status.get("current_round") else "")
           + (f"  resumed after round {status['resumed_from']}" if status.get("resumed_from") else "")]
    rejections = status.get("rejections") or {}
    if rejections:
        out.append("rejections: " + ", ".join(f"{k} {v}" for k, v in sorted(rejections.items())))
    t = status.get("totals")
    if t:
        out.append(f"totals: {t['rounds_committed']} rounds, {t['updates']} updates, {t['bytes_up'] / 1e6:.2f} MB up, "
                   f"{t['bytes_down'] / 1e6:.2f} MB down, {t['tokens']} tokens, {t['failures']} failed replies")
    rounds = status["rounds"] if all_rounds else status["rounds"][-10:]
    listed = max(status.get("history", {}).get("rounds", 0), len(status["rounds"]))   # committed, round 0 too
    out += ["", f"rounds ({listed}, last {len(rounds)} shown)" if listed > len(rounds) else "rounds"]
    out += _table(["round", "eval loss", "train loss", "clients", "MB up", "seconds"],
                  [[str(r["round"]), _num(r["eval_loss"], ".4f"), _num(r.get("train_loss"), ".4f"),
                    str(len(r["clients"])), f"{r['bytes_up'] / 1e6:.2f}", f"{r['seconds']:.1f}"] for r in rounds])
    total = status.get("clients_total", len(status["clients"]))
    out += ["", f"clients ({total}" + (f", first {len(status['clients'])} shown)" if total > len(status["clients"])
                                       else ")")]
    out += _table(["name", "role", "device", "precision", "rounds", "seen s ago"],
                  [[c["name"], c.get("role", ""), c.get("device", ""), c.get("precision", ""),
                    str(c.get("rounds_done", "")), _num(c.get("seen_s_ago"), ".1f")] for c in status["clients"]])
    sw = status.get("swarm")
    if sw:
        out += ["", f"swarm: {sw['microbatches_completed']} micro-batches ({sw['microbatches_retried']} replayed, "
                    f"{sw['microbatches_lost']} lost), {sw['tokens_per_s']:.0f} tokens/s, "
                    f"{len(sw['reassignments'])} re-assignments"]
        out += _table(["stage", "peers", "throughput", "peer names"],
                      [[str(s["stage"]), str(s.get("peer_count", len(s["peers"]))), f"{s['throughput']:.0f}",
                        ", ".join(s["peers"]) or "-"] for s in sw["stages"]])
    return "\n".join(out)


def run_status(args: argparse.Namespace) -> int:
    import grpc

    from fedswarm.client.identity import IdentityError

    tick = threading.Event()
    while True:
        try:
            status = fetch(args)
        except IdentityError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except grpc.RpcError as err:
            from fedswarm.proto import refusals

            why = refusals.reason(err)
            if why:
                hint = "" if getattr(args, "key", None) else " (pass --key FILE: an authorized or admin key)"
                print(f"error: the coordinator refused status ({why}): {err.details()}{hint}", file=sys.stderr)
            else:
                print(f"error: cannot reach the coordinator at {args.coordinator}: {err.code().name} {err.details()}",
                      file=sys.stderr)
            if not args.watch:
                return 1
            status = None
        if status is not None:
            if args.json:
                print(json.dumps(status), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[2J\033[H", end="")   # clear the screen: the table refreshes in place
                print(render(status, args.coordinator, getattr(args, "history", False)), flush=True)
                if args.watch:
                    print(f"\n(refreshed {time.strftime('%H:%M:%S')}; every {args.watch:g} s; Ctrl-C to stop)",
                          flush=True)
        if not args.watch:
            return 0
        try:
            tick.wait(args.watch)
        except KeyboardInterrupt:
            return 0


def run_health(args: argparse.Namespace) -> int:
    """The standard gRPC health check (grpc.health.v1): exit 0 if SERVING, 1 otherwise (for probes)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedswarm.client.identity import IdentityError, open_channel

    try:
        channel = open_channel(args.coordinator, args.tls_ca)
    except IdentityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                              timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"error: health check of {args.coordinator} failed: {err.code().name} {err.details()}",
                  file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
