"""The client session (client/session.py) against the real coordinator service on a real gRPC socket in this
process: credentials swap whole on a re-join, heartbeats stay inside the lease the coordinator granted, and one
retry policy (capped exponential backoff) serves every call."""
from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time

import grpc
import pytest

from fedswarm.client.session import ClientTimeouts, RetryPolicy, Session, heartbeat_every, retry
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.sim.bench_status import ServedInThread, old_run


@contextlib.contextmanager
def coordinator(lease_s: float, heartbeat_s: float):
    """A coordinator service granting `lease_s` and telling clients to beat every `heartbeat_s`."""
    from fedswarm.coordinator.config import CoordinatorTimeouts
    from fedswarm.coordinator.driver import RunProgress
    from fedswarm.coordinator.grid import SessionGrid
    from fedswarm.coordinator.membership import Membership
    from fedswarm.coordinator.service import CoordinatorService
    from fedswarm.run_config import RunConfig

    cfg = RunConfig(rounds=1)
    members = Membership(lease_s, lambda cid, why: None, reaper_interval_s=0.05)
    timeouts = CoordinatorTimeouts(lease_s=lease_s, heartbeat_interval_s=heartbeat_s)
    service = CoordinatorService(cfg, "run-s", SessionGrid(1, members.live_ids), members,
                                 RunProgress(cfg, old_run(0, 0)), timeouts)
    try:
        with ServedInThread(service) as address:
            yield members, address
    finally:
        members.close()


def live(members) -> list[int]:
    return [m.client_id for m in members.snapshot()]


def test_heartbeats_stay_inside_the_lease_the_coordinator_grants():
    """Told to beat every 5 s under a 0.6 s lease, the session beats every 0.2 s and keeps its lease."""
    with coordinator(lease_s=0.6, heartbeat_s=5.0) as (members, address):
        session = Session(address, "steady")
        try:
            session.join()
            assert session.joined.lease_s == 0.6 and session.heartbeat_s == pytest.approx(0.2)
            first = session.creds
            time.sleep(1.5)   # well past the lease: only the heartbeats keep the session
            assert live(members) == [first.client_id]
            assert session.creds == first and session.lost_leases == 0
        finally:
            session.close()


def test_virtual_sessions_keep_the_same_lease():
    """aio_session.AsyncSession (virtual clients) takes its interval from the same rule."""
    from fedswarm.client.aio_session import AsyncSession, open_aio_channel

    async def hold(members, address: str) -> tuple[float, list[int], int, int]:
        channel = open_aio_channel(address)
        session = AsyncSession(channel, "virtual")
        try:
            await session.join()
            beats = asyncio.create_task(session.heartbeats())
            await asyncio.sleep(1.5)
            members_then = live(members)
            session.close()
            await beats
            return session.heartbeat_s, members_then, session.client_id, session.lost_leases
        finally:
            await channel.close()
    with coordinator(lease_s=0.6, heartbeat_s=5.0) as (members, address):
        every, members_then, client_id, lost = asyncio.run(hold(members, address))
    assert every == pytest.approx(0.2) and lost == 0 and members_then == [client_id]


def test_heartbeat_interval_is_the_coordinators_or_a_third_of_its_lease():
    assert heartbeat_every(2.0, 15.0) == 2.0
    assert heartbeat_every(2.0, 3.0) == 1.0
    assert heartbeat_every(0.0, 0.0) == 2.0          # an old coordinator that sends neither


def test_a_rejoin_swaps_the_credentials_whole():
    """The coordinator drops the session (its heartbeats held back past the lease); the next heartbeat is refused
    (bad_session) and the session joins again. A reader meanwhile never sees one session's id with the other's
    token."""
    with coordinator(lease_s=0.5, heartbeat_s=0.1) as (members, address):
        session = Session(address, "swapper")
        seen: set[tuple[int, str]] = set()
        stop = threading.Event()

        def read():
            while not stop.is_set():
                c = session.creds
                seen.add((c.client_id, c.token))
        reader = threading.Thread(target=read, daemon=True)
        try:
            session.join()
            first = session.creds
            reader.start()
            with session.fork_guard:   # no heartbeat gets out (as while hivemind forks) ...
                deadline = time.monotonic() + 10
                while live(members) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not live(members), "the coordinator kept a silent session past its lease"
            deadline = time.monotonic() + 10   # ... then the next beat is refused and the session joins again
            while session.creds == first and time.monotonic() < deadline:
                time.sleep(0.02)
            second = session.creds
        finally:
            stop.set()
            session.close()
    assert second != first and session.lost_leases == 1
    assert seen <= {(first.client_id, first.token), (second.client_id, second.token)}, seen


def test_backoff_doubles_from_initial_and_stays_under_the_cap():
    policy = RetryPolicy(initial_s=0.5, max_s=10.0)
    lowest, highest = random.Random(), random.Random()
    lowest.uniform = lambda a, b: a    # the jitter's two ends
    highest.uniform = lambda a, b: b
    assert [policy.delay(n, lowest) for n in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert [policy.delay(n, highest) for n in range(7)] == [0.75, 1.5, 3.0, 6.0, 10.0, 10.0, 10.0]
    assert policy.delay(10_000) <= 10.0


def test_retry_backs_off_while_unreachable_then_gives_up():
    """Nothing listens: UNAVAILABLE is retried with growing waits, capped, until give_up_s."""
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    t = ClientTimeouts(rpc_s=1.0, backoff_initial_s=0.02, backoff_max_s=0.08, give_up_s=0.6)
    session = Session(address, "unreachable", timeouts=t)
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        time.sleep(s)
    try:
        with pytest.raises(grpc.RpcError) as err:
            retry("join", lambda: session.stub.Join(pb.JoinRequest(name="x"), timeout=t.rpc_s), session.policy, sleep)
    finally:
        session.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(waits) >= 4 and waits[0] <= 0.03 and max(waits) <= 0.08
    assert max(waits) > 0.04   # it grew


def test_final_and_unexpected_errors_are_not_retried():
    """A refusal that a retry cannot change (a join without a name: bad_name) raises at once."""
    with coordinator(lease_s=5.0, heartbeat_s=1.0) as (_, address):
        session = Session(address, "")   # an empty name: the coordinator refuses it (bad_name)
        waits: list[float] = []
        try:
            with pytest.raises(grpc.RpcError) as err:
                retry("join", lambda: session.stub.Join(pb.JoinRequest(name=""), timeout=5), session.policy,
                      waits.append)
        finally:
            session.close()
    assert err.value.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN) and waits == []
