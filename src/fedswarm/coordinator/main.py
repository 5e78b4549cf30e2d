"""`fedswarm coordinator`: serve the gRPC service and drive the run's rounds."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import threading
from pathlib import Path

import grpc
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedswarm.coordinator.aggregate import return_freed_memory_to_os, sink_for
from fedswarm.coordinator.auth import Authenticator, load_authorized_keys, server_credentials
from fedswarm.coordinator.config import CoordinatorTimeouts
from fedswarm.run_config import RunConfig
from fedswarm.coordinator.driver import RoundDriver, RunFailed, RunProgress
from fedswarm.coordinator.grid import SessionGrid
from fedswarm.coordinator.membership import Membership
from fedswarm.coordinator.service import CoordinatorService
from fedswarm.coordinator.serving import Server, ServingLimits, raise_open_file_limit
from fedswarm.coordinator.status import StatusLimits
from fedswarm.coordinator.store import DB_NAME, StateError, Store, check_state_dir
from fedswarm.coordinator.strategies import build_strategy
from fedswarm import settings, tokenized
from fedswarm.errors import one_line, why
from fedswarm.formats import DataSpec
from fedswarm.lora import CentralModel
from fedswarm.models import check_model
from fedswarm.tokenizer import load_tokenizer
from fedswarm.threads import BUDGET
from fedswarm.proto.run_state import RunState

log = logging.getLogger("fedswarm.coordinator")
SWARM_LEASE_S, SWARM_HEARTBEAT_S = 3.0, 0.5   # stage peers must be noticed gone within seconds
EXIT_DRIVER_CRASHED, EXIT_RUN_FAILED = 1, 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:7000", help="HOST:PORT to serve on (port 0 picks a free port)")
    p.add_argument("--state-dir", required=True, help="folder for the SQLite database and checkpoints")
    settings.add_arguments(p, RunConfig)   # the run's settings: one flag per RunConfig field
    p.add_argument("--lease", type=float, default=None,
                   help=f"seconds of silence before a client is dropped (default {CoordinatorTimeouts.lease_s:.0f}; "
                        f"swarm: {SWARM_LEASE_S:.0f})")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for evaluation (0: this host's CPUs shared among the fedswarm processes "
                        "running on it, re-checked at each eval)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://--metrics-host:PORT/metrics (0: a free port; default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics endpoint binds")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit 0 after the last round instead of serving status")
    p.add_argument("--cache-dir", default=None, help="where tokenized eval shards go when --eval-data is read-only")
    p.add_argument("--aggregation", default="stream", choices=["stream", "hold"],
                   help="stream: fold each update into a running sum (robust strategies: spill to --state-dir), "
                        "so memory does not grow with the clients; hold: keep every reply's weights (Flower's stock path)")
    p.add_argument("--tls-cert", metavar="FILE", help="server certificate chain (PEM); needs --tls-key")
    p.add_argument("--tls-key", metavar="FILE", help="server private key (PEM); needs --tls-cert")
    # swarm data plane (hivemind): where the coordinator's bootstrap node listens and what it announces
    p.add_argument("--p2p-host", default="127.0.0.1", metavar="IP[:PORT]",
                   help="swarm: address the coordinator's hivemind node binds (default loopback, any free port)")
    p.add_argument("--p2p-announce", default="", metavar="IP[:PORT]",
                   help="swarm: address peers dial to bootstrap when it differs from --p2p-host (NAT, containers)")
    p.add_argument("--authorized-keys", metavar="FILE",
                   help="only clients proving a key listed here may join (`ed25519 <base64> name` lines)")
    p.add_argument("--admin-keys", metavar="FILE",
                   help="keys (authorized_keys format) that may read Status but not join; any authorized key may too")
    # what one caller may hold: --max-sessions, the waiting shares, per-session caps, deadlines (ServingLimits)
    settings.add_arguments(p.add_argument_group("serving limits"), ServingLimits)
    p.add_argument("--status-rounds", type=int, default=StatusLimits.recent_rounds, metavar="N",
                   help="rounds a Status reply lists: the last N (totals cover every round; all of them: "
                        "`fedswarm status --history`; default %(default)s)")
    # every wait of the rounds and the sessions (CoordinatorTimeouts; the lease: --lease above)
    settings.add_arguments(p.add_argument_group("timeouts"), CoordinatorTimeouts)


def load_security(args: argparse.Namespace) -> tuple[grpc.ServerCredentials | None, Authenticator]:
    """TLS credentials (None: plaintext) and the join/update authenticator; ValueError on bad flags or files."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together: pass both (e.g. server.pem and server.key "
                         "from `fedswarm keygen DIR`) or neither")
    creds = server_credentials(args.tls_cert, args.tls_key) if args.tls_cert else None
    keys = load_authorized_keys(args.authorized_keys) if args.authorized_keys else None
    if args.admin_keys and keys is None:
        raise ValueError("--admin-keys needs --authorized-keys (without it Status is open to anyone)")
    admin = load_authorized_keys(args.admin_keys, "--admin-keys") if args.admin_keys else None
    return creds, Authenticator(keys, admin=admin)


def resolve_config(args: argparse.Namespace, store: Store) -> RunConfig:
    """A new run takes the flags; a state dir that holds a run keeps its stored config."""
    stored = store.get_meta("run_config")
    if stored is not None:
        try:
            cfg = RunConfig.from_json(stored)
        except (ValueError, TypeError) as err:
            raise StateError(f"{store.db_path}: the run config stored there does not parse ({why(err)}): restore "
                             f"the database from a backup, or start a new run on an empty --state-dir") from None
        if args.rounds != cfg.rounds and args.rounds > cfg.rounds:
            log.info("extending the run from %d to %d rounds", cfg.rounds, args.rounds)
            cfg.rounds = args.rounds
            store.set_meta("run_config", cfg.to_json())
        return cfg
    cfg = settings.from_args(RunConfig, args)
    cfg.check()
    store.set_meta("run_config", cfg.to_json())
    store.set_meta("run_id", secrets.token_hex(8))
    return cfg


def open_run(args: argparse.Namespace) -> tuple[Store, RunConfig]:
    """The --state-dir's store (writable, its database readable) and the run's config with its model checked;
    BadInput (a ValueError) naming the file otherwise."""
    new_run = not (Path(args.state_dir) / DB_NAME).is_file()
    if new_run:   # bad flags or files make nothing on disk
        fresh = settings.from_args(RunConfig, args)
        fresh.check()
        check_model(fresh.model)
    check_state_dir(args.state_dir)
    store = Store(args.state_dir)
    try:
        cfg = resolve_config(args, store)
        if not new_run:
            check_model(cfg.model)   # the folder may have changed since the run began
    except BaseException:
        store.close()
        raise
    return store, cfg


def resolve_resume(store: Store, initial: dict, progress: RunProgress) -> None:
    """Where the run resumes: the newest committed round whose checkpoint loads and fits the model (newer
    rounds are dropped from the store and from `progress`, and run again); CheckpointError if none does."""
    good = store.resume_point({name: tuple(t.shape) for name, t in initial.items()})
    if good is None:
        return
    with progress.lock:
        dropped = [r["round"] for r in progress.rounds if r["round"] > good]
        progress.rounds = [r for r in progress.rounds if r["round"] <= good]
    if dropped:
        log.warning("resuming from round %d: round(s) %s will run again", good, ", ".join(map(str, dropped)))


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_file_limit()   # every connection holds a file: the soft limit (often 1024) is up to the hard one
    try:
        tls, auth = load_security(args)
        limits = settings.from_args(ServingLimits, args)
        status_limits = StatusLimits(recent_rounds=args.status_rounds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if auth.enabled:
        log.info("authenticated run: %d authorized key(s) from %s", len(auth.authorized), args.authorized_keys)
    else:
        log.warning("no --authorized-keys: this coordinator accepts ANY client (development mode)")
    if tls is None:
        log.warning("no --tls-cert/--tls-key: traffic is plaintext")
    if not return_freed_memory_to_os():
        log.warning("not glibc: freed update buffers may stay in this process's RSS")
    try:
        store, cfg = open_run(args)
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    run_id = store.get_meta("run_id")
    auth.run_id = run_id
    BUDGET.configure(args.threads)
    swarm_mode = cfg.mode == "swarm"
    timeouts = settings.from_args(CoordinatorTimeouts, args)
    if swarm_mode:
        timeouts.lease_s, timeouts.heartbeat_interval_s = SWARM_LEASE_S, SWARM_HEARTBEAT_S
    if args.lease is not None:
        timeouts.lease_s = args.lease

    # Flower's Message reads the sender's identity from TaskIdentity.
    TaskIdentity.run_id = int(run_id, 16) & ((1 << 63) - 1)
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1

    try:  # the held-out split, tokenized with the run model's own tokenizer (--evaluate clients: not needed)
        windows = None
        if cfg.evaluate != "clients" or swarm_mode:
            eval_tokens = tokenized.eval_tokens(DataSpec.from_run(cfg.eval_data, cfg), load_tokenizer(cfg.model),
                                                args.cache_dir)
            windows = tokenized.windows(eval_tokens, cfg.seq_len, cfg.eval_windows)
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        store.close()
        return 2
    progress = RunProgress(cfg, store.rounds())

    lost_hooks = []
    membership = Membership(timeouts.lease_s, on_lost=lambda cid, why: [hook(cid, why) for hook in lost_hooks],
                            reaper_interval_s=timeouts.reaper_interval_s, max_sessions=limits.max_sessions)
    sink = sink_for(cfg.strategy, args.state_dir, args.aggregation, cfg.secure_aggregation)
    grid = SessionGrid(TaskIdentity.run_id, membership.live_ids, updates=sink)
    lost_hooks.append(grid.fail_node)
    swarm, privacy = None, None   # privacy: --dp-clip's ledger, which the uploads' clip consults
    try:
        if swarm_mode:
            from fedswarm.coordinator.swarm_driver import start_swarm

            swarm, initial = start_swarm(cfg, grid, store, progress, windows, timeouts,
                                         p2p_host=args.p2p_host, p2p_announce=args.p2p_announce, run_id=run_id)
            lost_hooks.append(swarm.registry.remove)
            driver, run_driver = swarm.driver, swarm.driver.run
        else:
            # --peft lora: only adapters travel, and the base is built only if the coordinator evaluates
            central = cfg.evaluate != "clients"
            model = CentralModel(cfg, central_eval=central)
            initial = model.initial_state()
            strategy = build_strategy(cfg)
            privacy = getattr(strategy, "privacy", None)
            driver = RoundDriver(cfg, grid, strategy, store, model if central else None, windows,
                                 progress, timeouts.round_timeout_s, timeouts=timeouts,
                                 roles=lambda: {m.client_id: m.role for m in membership.snapshot()})
            run_driver = driver.run
        resolve_resume(store, initial, progress)   # before serving: the drivers resume where the store says
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        if swarm is not None:
            swarm.node.shutdown()
        membership.close()
        store.close()
        return 2
    service = CoordinatorService(cfg, run_id, grid, membership, progress, timeouts, auth=auth, swarm=swarm,
                                 limits=limits, state_dir=store.dir, status_limits=status_limits, privacy=privacy)
    if args.metrics_port is not None:
        from fedswarm.metrics import coordinator_registry, serve as serve_metrics
        try:
            serve_metrics(coordinator_registry(service.status_dict), args.metrics_host, args.metrics_port)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        code = asyncio.run(_serve_until_done(args, service, tls, lambda: run_driver(initial), progress))
    finally:
        driver.stop.set()
        membership.close()
        if swarm is not None:
            swarm.node.shutdown()
        store.close()
    log.info("stopped after committed round %d", progress.committed_round)
    return code


async def _serve_until_done(args: argparse.Namespace, service: CoordinatorService, tls, run_driver,
                            progress: RunProgress) -> int:
    """Serve until a signal, the end of the run (--exit-when-done) or a driver failure; the exit code."""
    server = Server(service.handler(), service.limits, service.admission)
    host, _, port = args.listen.rpartition(":")
    bound = server.bind(f"{host}:{port}", tls)
    if bound == 0:
        print(f"error: cannot listen on {args.listen}", file=sys.stderr)
        return 2
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)

    loop = asyncio.get_running_loop()
    stop, driver_ended = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    failure: list[BaseException] = []

    def drive():
        try:
            run_driver()
        except RunFailed as err:
            log.error("run failed: %s", err)
            failure.append(err)
        except BaseException as err:  # noqa: BLE001 - reported below: a crashed driver must exit non-zero
            log.exception("round driver failed")
            failure.append(err)
        finally:
            if not loop.is_closed():   # after a signal the server may already have stopped and closed it
                with contextlib.suppress(RuntimeError):   # closed between the check and the call
                    loop.call_soon_threadsafe(driver_ended.set)

    threading.Thread(target=drive, name="round-driver", daemon=True).start()
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(driver_ended.wait())]
    code = 0
    while not stop.is_set():
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not driver_ended.is_set():
            continue
        with progress.lock:
            state = progress.state
        if failure and isinstance(failure[0], RunFailed):
            print(f"error: the run failed (state {state}): {failure[0]}", file=sys.stderr)
            code = EXIT_RUN_FAILED
            break
        if failure:
            print(f"error: the round driver crashed: {type(failure[0]).__name__}: {failure[0]}", file=sys.stderr)
            code = EXIT_DRIVER_CRASHED
            break
        if args.exit_when_done or state != RunState.DONE:
            break
        waits = [w for w in waits if not w.done()]
    for w in waits:
        w.cancel()
    service.grid.close()
    await server.stop(grace_s=2.0)
    return code
