"""The `fedswarm` command: coordinator, client, status, health, keygen, sim, bench, config, export, generate.

Each subcommand's module is imported only when that subcommand runs (or for the full `fedswarm --help`),
so `fedswarm status` loads grpc and the proto stubs, never torch, transformers or Flower."""
from __future__ import annotations

import argparse
import sys

from fedswarm.app import config_file
from fedswarm.app.config_file import READS
from fedswarm.errors import BadInput, one_line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, unless its help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def _status(args: argparse.Namespace) -> int:
    from fedswarm.app.status_view import run_status

    try:
        return run_status(args)
    except KeyboardInterrupt:   # --watch ends with Ctrl-C
        return 0


def _health(args: argparse.Namespace) -> int:
    from fedswarm.app.status_view import run_health

    return run_health(args)


def _config(args: argparse.Namespace) -> int:
    if args.action == "doc":
        parsers = {name: build_parser(only=name).commands[name] for name in READS}
        print(config_file.doc(parsers), end="")
        return 0
    if args.target is None:
        print("error: fedswarm config show COMMAND: name the command (" + ", ".join(READS) + ")", file=sys.stderr)
        return 2
    target = build_parser(only=args.target).commands[args.target]
    for action in target._actions:
        action.required = False   # show what is set, even without --state-dir or --coordinator
    try:
        path = config_file.config_path(args.rest)
        if path:
            config_file.apply(target, args.target, path)
    except config_file.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(config_file.show(args.target, target, target.parse_args(args.rest)), end="")
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (`only`) one whose other subcommands are listed but not loaded."""
    parser = argparse.ArgumentParser(prog="fedswarm", description="Federated rounds and swarm pipelines for transformer LMs.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    parser.commands = {}   # name -> its parser (those `only` built)

    def add(name: str, help: str) -> argparse.ArgumentParser | None:  # noqa: A002 - argparse's own keyword
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        if only not in (None, name):
            return None
        parser.commands[name] = p
        if name in READS:
            tables = " and ".join(f"[{t}]" for t in READS[name])
            p.add_argument("--config", metavar="FILE.toml",
                           help=f"read this command's settings from the {tables} table(s) of a TOML file; "
                                f"flags given here override it (`fedswarm config show {name}` prints the result)")
        return p

    if p := add("coordinator", "run the coordinator service"):
        from fedswarm.coordinator import main as coordinator
        coordinator.add_arguments(p)
        p.set_defaults(func=coordinator.serve)

    if p := add("client", "run a client daemon"):
        from fedswarm.client import daemon
        daemon.add_arguments(p)
        p.set_defaults(func=daemon.main)

    if p := add("status", "print the coordinator's status"):
        p.add_argument("--coordinator", required=True, help="HOST:PORT")
        p.add_argument("--json", action="store_true", help="one JSON object (the full status)")
        p.add_argument("--history", action="store_true",
                       help="every committed round, fetched page by page (a Status lists the last --status-rounds)")
        p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                       help="refresh the table every SECONDS (2 if not given) until interrupted")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator's answer")
        p.add_argument("--tls-ca", default=None, metavar="FILE", help="CA certificate (PEM) to verify a TLS coordinator")
        p.add_argument("--key", default=None, metavar="FILE",
                       help="Ed25519 private key (PEM) to sign the request: required by an authenticated coordinator")
        p.set_defaults(func=_status)

    if p := add("health", "ask the coordinator's standard gRPC health service; exit 0 if SERVING (for probes)"):
        p.add_argument("--coordinator", required=True, help="HOST:PORT")
        p.add_argument("--service", default="", help="service name to check ('': the server as a whole)")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
        p.add_argument("--tls-ca", default=None, metavar="FILE", help="CA certificate (PEM) to verify a TLS coordinator")
        p.set_defaults(func=_health)

    if p := add("keygen", "write a development CA, server certificate, client keys, authorized_keys"):
        from fedswarm.app import keygen
        keygen.add_arguments(p)
        p.set_defaults(func=keygen.main)

    if p := add("sim", "coordinator + N clients as local processes"):
        from fedswarm.sim import launcher
        launcher.add_arguments(p)
        p.set_defaults(func=launcher.main)

    if p := add("bench", "benchmarks whose ratios go in the README"):
        from fedswarm.sim import bench, bench_load
        kinds = p.add_subparsers(dest="which", required=True)
        for which, text in bench.KINDS.items():
            q = kinds.add_parser(which, help=text, description=text, formatter_class=HelpFormatter)
            bench.add_arguments(q)
            q.set_defaults(func=bench.main)
        q = kinds.add_parser("load", help="sessions one coordinator holds", description=bench_load.__doc__,
                             formatter_class=HelpFormatter)
        bench_load.add_arguments(q)
        q.set_defaults(func=bench_load.main)

    if p := add("config", "print the effective settings of a command (show) or the settings reference (doc)"):
        p.add_argument("action", choices=["show", "doc"],
                       help="show: COMMAND's settings as TOML (--config and flags applied); doc: docs/SETTINGS.md")
        p.add_argument("target", nargs="?", choices=list(READS), help="show: the command whose settings to print")
        p.add_argument("rest", nargs=argparse.REMAINDER, help="show: that command's --config FILE and flags")
        p.set_defaults(func=_config)

    if p := add("export", "write a run's model (or LoRA adapters) as a Hugging Face folder"):
        from fedswarm.app import export
        export.add_export_arguments(p)
        p.set_defaults(func=export.export_main)

    if p := add("generate", "answer a prompt with a Hugging Face folder (e.g. one export wrote), through its "
                            "chat template when it has one, or continue plain text (--raw)"):
        from fedswarm.app import generate
        generate.add_generate_arguments(p)
        p.set_defaults(func=generate.generate_main)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named first on the command line (None: none yet, e.g. `fedswarm --help`)."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def main(argv: list[str] | None = None) -> int:
    from fedswarm.threads import set_wait_policy

    set_wait_policy()   # before torch is imported: idle OpenMP threads sleep instead of spinning
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    parser = build_parser(only=command)
    if command in READS and (path := config_file.config_path(argv[1:])):
        try:
            config_file.apply(parser.commands[command], command, path)
        except config_file.ConfigError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BadInput as err:   # a file or flag found unusable deep inside a command: one line, exit 2
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
