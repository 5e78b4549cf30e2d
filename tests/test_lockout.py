"""Lockout attacks on one real coordinator on loopback, scaled down through its serving-limit flags: calls that
never send their request, header-less uploads re-opened as soon as they are cut, one key dripping uploads of
one task, one session's flood of long-polls, silent connections at the open-file limit. Each is refused and
counted (the `rejections` counters match what the attacker saw) while an honest session from the same
address keeps getting Status, Heartbeat, health checks and its upload through."""
from __future__ import annotations

import asyncio
import collections
import json
import os
import resource
import socket
import time
from dataclasses import dataclass

import grpc
import pytest

from fedswarm.coordinator.serving import raise_open_file_limit
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals
from fedswarm.sim import attacks as A
from fedswarm.sim.attacks import Session
from fedswarm.sim.processes import coordinator_process, fetch_status

WAITING, PER_ADDRESS, PER_CONNECTION = 40, 16, 8
SHARE = 200   # connections one address may hold
FIRST_MESSAGE_S, GRACE_S, CHUNK_S, UPLOAD_S = 1.5, 0.3, 1.5, 30.0
LIMITS = ["--max-waiting-calls", str(WAITING), "--max-waiting-per-address", str(PER_ADDRESS),
          "--max-waiting-per-connection", str(PER_CONNECTION), "--first-message-timeout", str(FIRST_MESSAGE_S),
          "--first-message-grace", str(GRACE_S), "--chunk-timeout", str(CHUNK_S), "--upload-timeout", str(UPLOAD_S),
          "--max-calls-per-session", "6", "--max-polls-per-session", "2", "--handshake-timeout", "1",
          "--max-connections-per-address", str(SHARE), "--ban-after", "1000000"]   # bans: their own test
RUN = ["--min-clients", "3", "--rounds", "3", "--local-steps", "1", "--seq-len", "32", "--batch-size", "2",
       "--upload-codec", "int8", "--eval-windows", "2", "--round-timeout", "120", "--lease", "300"]
NAMES = ("honest", "bystander", "mallory")   # round 1 trains all three (FedAvg samples every client)
HONEST_MAX_S = 5.0   # an honest call's latency under attack, on a busy CI host (each must also succeed)


@dataclass
class Coordinator:
    proc: object
    address: str
    honest: Session
    bystander: Session   # another honest session (its upload answers round 1 during the drips)
    mallory: Session     # a member: one key, one session

    def rejections(self) -> collections.Counter:
        return collections.Counter(fetch_status(self.address)["rejections"])


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lockout")
    with coordinator_process(tmp, ["--state-dir", str(tmp / "state"), *RUN, *LIMITS]) as (proc, address):
        yield Coordinator(proc, address, *A.join(address, NAMES))


def _worst(latencies: dict[str, list[float]]) -> list[float]:
    return sorted(v for values in latencies.values() for v in values)[-5:]


def _flood(coord, method: str, during=None):
    """4 connections x 30 silent calls on `method` for 3 s beside the honest probe (and `during()`)."""
    return asyncio.run(A.flood(coord.address, method, 4, 30, 3.0, coord.honest, during, settle_s=FIRST_MESSAGE_S / 2))


def _check_counted(seen: collections.Counter, before: collections.Counter, after: collections.Counter,
                   late: str) -> None:
    reasons = collections.Counter()
    for (code, reason), n in seen.items():
        assert reason in A.WAIT_REASONS and code in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                   grpc.StatusCode.DEADLINE_EXCEEDED), (code, reason)
        reasons[reason] += n
    assert reasons[late] > 0 and reasons["busy_connection"] + reasons["busy_address"] > 0, reasons
    for reason in A.WAIT_REASONS:
        assert after[reason] - before[reason] == reasons[reason], (reason, after[reason] - before[reason], reasons)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_calls_that_never_send_their_request_are_cut_and_counted(coord):
    """Unary calls (Status) that never send their request: at most the waiting shares wait their deadline, the
    rest are cut after the grace, every one counted; Status, Heartbeat, Challenge and Health keep answering."""
    before = coord.rejections()
    seen, latencies, _ = _flood(coord, "/fedswarm.Coordinator/Status")
    _check_counted(seen, before, coord.rejections(), "slow_request")
    assert latencies["Status"] and max(_worst(latencies)) < HONEST_MAX_S, _worst(latencies)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_headerless_uploads_reopened_at_once_leave_an_honest_upload_through(coord):
    """Header-less PushUpdate streams, each re-opened as soon as it is cut, hold no more than the waiting shares;
    the honest session's upload, sent meanwhile from the same address, is accepted."""
    before = coord.rejections()
    seen, latencies, (accepted, took) = _flood(coord, "/fedswarm.Coordinator/PushUpdate",
                                               during=lambda: A.upload(coord.address, coord.honest))
    _check_counted(seen, before, coord.rejections(), "slow_header")
    assert accepted and took < 10.0 and max(_worst(latencies)) < HONEST_MAX_S, (took, _worst(latencies))


@pytest.mark.timeout(120)
def test_one_key_dripping_uploads_of_one_task_cannot_stall_uploads(coord):
    """20 uploads of mallory's one task, each dripping valid parts (more streams than the 16 upload workers):
    each newer stream replaces the older (upload_replaced) and the bystander's upload goes through while the
    newest still drips; that one then completes (the task's one answer), and round 1 commits."""
    async def scenario():
        async with A.channel(coord.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            task = await A.open_task(stub, coord.mallory)
            parts = await A.model_parts(stub, coord.mallory, task, C.codec_by_name("int8"))
            push, head = A.pusher(channel), A.header(coord.mallory, task, parts)
            seen, hurry, drippers = collections.Counter(), asyncio.Event(), []
            for _ in range(20):
                drippers.append(asyncio.create_task(A.drip(push, head, parts, CHUNK_S / 3, hurry, seen)))
                await asyncio.sleep(0.02)
            accepted, took = await A.upload(coord.address, coord.bystander)
            assert accepted
            replaced_by_then = seen["upload_replaced"] + seen["session_busy"]
            hurry.set()
            await asyncio.gather(*drippers)
            coord.mallory.task = None
            return seen, took, replaced_by_then
    before = coord.rejections()
    seen, took, replaced_by_then = asyncio.run(scenario())
    after = coord.rejections()
    assert seen["accepted"] == 1 and seen["upload_replaced"] + seen["session_busy"] == 19 == replaced_by_then, seen
    for reason in ("upload_replaced", "session_busy"):
        assert after[reason] - before[reason] == seen[reason], reason
    assert took < 10.0, took   # a dripper takes 52 parts x 0.5 s: the bystander's upload did not wait for that


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_one_sessions_flood_of_long_polls_holds_two(coord):
    """60 concurrent PullTask long-polls of one session: it holds two; a newer poll answers its oldest at once
    (poll_superseded) or, past the session's 6 calls in flight, is refused (session_busy); honest calls go on."""
    async def scenario():
        async with A.channel(coord.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            req = pb.PullTaskRequest(client_id=coord.mallory.client_id, session_token=coord.mallory.token, wait_s=2)

            async def poll():
                started = time.monotonic()
                try:
                    task = await stub.PullTask(req, timeout=30)
                    if task.kind == pb.TASK_TRAIN:
                        coord.mallory.task = task
                    return "none" if task.kind == pb.TASK_NONE else "task", time.monotonic() - started
                except grpc.aio.AioRpcError as err:
                    return refusals.reason(err), time.monotonic() - started
            stop = asyncio.Event()
            prober = asyncio.create_task(A.probe(coord.address, coord.honest, stop))
            outcomes = await asyncio.gather(*[poll() for _ in range(60)])
            stop.set()
            return outcomes, await prober
    before = coord.rejections()
    outcomes, latencies = asyncio.run(scenario())
    after = coord.rejections()
    kinds = collections.Counter(kind for kind, _ in outcomes)
    assert set(kinds) <= {"none", "task", "session_busy"} and kinds["task"] <= 1, kinds   # round 2's, if out
    superseded = after["poll_superseded"] - before["poll_superseded"]
    assert after["session_busy"] - before["session_busy"] == kinds["session_busy"]
    # it never held more than 2: every other poll was answered at once or refused
    assert superseded + kinds["session_busy"] >= 60 - 2 - kinds["task"] and superseded <= kinds["none"], \
        (superseded, kinds)
    assert max(_worst(latencies)) < HONEST_MAX_S, _worst(latencies)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_silent_connections_at_the_open_file_limit_are_closed(coord):
    """The coordinator raised its open-file limit at start (logged). Lowered from outside to 30 files above
    what it holds, 60 silent TCP connections use them up; they are closed after --handshake-timeout 1 s, so a
    new honest connection gets in within seconds."""
    assert "open-file limit" in coord.proc.output()
    pid, (host, port) = coord.proc.pid, coord.address.rsplit(":", 1)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    silent = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 30, hard))
        silent = [socket.create_connection((host, int(port))) for _ in range(60)]
        started = time.monotonic()
        with grpc.insecure_channel(coord.address, options=A.OWN_CONNECTION) as channel:   # a new connection
            reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=15)
        took = time.monotonic() - started
        silent[0].settimeout(5)
        while silent[0].recv(4096):   # the server's settings, then its close at the handshake timeout
            pass
    finally:
        for sock in silent:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert json.loads(reply.json)["run_id"] and took < 10, took


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_address_that_floods_is_banned_and_another_is_served(tmp_path):
    """On a coordinator listening on both IPv4 and IPv6 loopback, calls from [::1] that never send their request
    are cut; after --ban-after 100 of them the address is banned: its calls are held, then refused `banned`
    (counted), while an honest prober on 127.0.0.1 gets every Status, Challenge and health check through,
    during the flood and after it."""
    flags = ["--listen", "[::]:0", "--state-dir", str(tmp_path / "state"), *RUN, *LIMITS[:-2],
             "--ban-after", "100", "--ban-seconds", "60"]
    with coordinator_process(tmp_path, flags) as (proc, address):
        port = address.rsplit(":", 1)[1]
        honest, stranger = f"127.0.0.1:{port}", f"[::1]:{port}"
        seen, latencies, _ = asyncio.run(A.flood(stranger, "/fedswarm.Coordinator/Status", 4, 30, 4.0, None,
                                                 probe_address=honest))
        counted = collections.Counter(fetch_status(honest)["rejections"])
        with grpc.insecure_channel(stranger, options=A.OWN_CONNECTION) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)
    assert "banned ::/64" in proc.output()
    assert refusals.reason(refused.value) == "banned", refused.value
    assert any(reason == "banned" for (_, reason) in seen) or counted["banned"] > 0, seen
    assert counted["banned"] > 0 and sum(counted[r] for r in A.WAIT_REASONS) >= 100, counted
    assert min(len(v) for v in latencies.values()) > 0 and max(_worst(latencies)) < HONEST_MAX_S, _worst(latencies)


HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])   # preface, SETTINGS


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_one_address_holds_at_most_its_share_of_connections(coord):
    """SHARE + 100 connections from 127.0.0.2 (loopback is all of 127/8) that finish their HTTP/2 handshake
    and then say nothing (so the handshake timeout never cuts them): the coordinator shuts 100 of the newest
    down and counts each `too_many_connections`; SHARE stay, and a new honest connection from
    127.0.0.1 is served meanwhile."""
    from fedswarm.coordinator.connections import connections

    host, port = coord.address.rsplit(":", 1)
    before = coord.rejections()["too_many_connections"]
    # connections from 127.0.0.2 an earlier test of this module left open count against the same share
    leftover = sum(1 for key, _ in connections({int(port)}) if key == "127.0.0.2")
    held = []
    try:
        for _ in range(SHARE + 100):
            sock = socket.create_connection((host, int(port)), source_address=("127.0.0.2", 0))
            sock.sendall(HTTP2_HELLO)
            held.append(sock)
        deadline = time.monotonic() + 30
        while coord.rejections()["too_many_connections"] - before < 100 and time.monotonic() < deadline:
            time.sleep(0.2)
        with grpc.insecure_channel(coord.address, options=A.OWN_CONNECTION) as channel:   # a new connection
            reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=15)
        counted = json.loads(reply.json)["rejections"].get("too_many_connections", 0) - before
        time.sleep(1.0)   # the shut-down ones' ends reach us
        closed = [i for i, sock in enumerate(held) if A.closed(sock)]
    finally:
        for sock in held:
            sock.close()
    # at most SHARE stay open; the watch shut down the rest (a few may instead miss the 1 s handshake timeout
    # on a loaded host, so they are closed, not counted)
    assert len(held) - len(closed) <= SHARE and 90 <= counted <= 100 + leftover, (len(closed), counted, leftover)


def test_raise_open_file_limit_lifts_the_soft_limit_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard open-file limit above 256, not {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_leave_files_for_the_coordinators_own_work(tmp_path):
    """gRPC accepts at most the open-file soft limit less FILE_RESERVE connections, and counting processes
    without a file to spare (EMFILE on /proc) counts this one instead of crashing the round driver."""
    from fedswarm.coordinator.serving import FILE_RESERVE, ServingLimits, max_connections
    from fedswarm.threads import fedswarm_processes

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        limits = ServingLimits()
        assert dict(limits.options())["grpc.max_allowed_incoming_connections"] == 1024 - FILE_RESERVE == max_connections()
        limits.shutdown()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    class NoFiles(type(tmp_path)):
        def iterdir(self):
            raise OSError(24, "Too many open files")
    assert fedswarm_processes(NoFiles(tmp_path)) == 1
