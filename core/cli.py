"""The `fedswarm` command: coordinator, client, status, keygen, sim, bench."""
from __future__ import annotations

import argparse
import json
import sys


def _status(args: argparse.Namespace) -> int:
    import grpc

    from fedswarm.client.identity import IdentityError, open_channel
    from fedswarm.proto import fedswarm_pb2 as pb
    from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc

    try:
        channel = open_channel(args.coordinator, args.tls_ca)
    except IdentityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"error: cannot reach the coordinator at {args.coordinator}: {err.code().name} {err.details()}",
                  file=sys.stderr)
            return 1
    status = json.loads(reply.json)
    if args.json:
        print(json.dumps(status))
        return 0
    print(f"state {status['state']}  round {status['round']}/{status['rounds_total']}  "
          f"clients {len(status['clients'])}: {', '.join(c['name'] for c in status['clients'])}")
    for r in status["rounds"]:
        loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        print(f"  round {r['round']:>3}  eval loss {loss}  clients {len(r['clients'])}  "
              f"up {r['bytes_up'] / 1e6:.2f} MB  down {(r.get('bytes_down') or 0) / 1e6:.2f} MB  {r['seconds']:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fedswarm import keygen
    from fedswarm.client import daemon
    from fedswarm.coordinator import main as coordinator
    from fedswarm.sim import bench, launcher

    parser = argparse.ArgumentParser(prog="fedswarm", description="Federated rounds and swarm pipelines for transformer LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("coordinator", help="run the coordinator service")
    coordinator.add_arguments(p)
    p.set_defaults(func=coordinator.serve)

    p = sub.add_parser("client", help="run a client daemon")
    daemon.add_arguments(p)
    p.set_defaults(func=daemon.main)

    p = sub.add_parser("status", help="print the coordinator's status")
    p.add_argument("--coordinator", required=True, help="HOST:PORT")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--tls-ca", default=None, metavar="FILE", help="CA certificate (PEM) to verify a TLS coordinator")
    p.set_defaults(func=_status)

    p = sub.add_parser("keygen", help="write a development CA, server certificate, client keys, authorized_keys")
    keygen.add_arguments(p)
    p.set_defaults(func=keygen.main)

    p = sub.add_parser("sim", help="coordinator + N clients as local processes")
    launcher.add_arguments(p)
    p.set_defaults(func=launcher.main)

    p = sub.add_parser("bench", help="benchmarks whose ratios go in the README")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
