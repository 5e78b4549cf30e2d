"""SwarmNode over real hivemind DHT + P2P on 127.0.0.1 (port 0): records, calls, deadlines, dead peers."""
import asyncio
import os
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress

import pytest

from fedswarm.p2p import PeerCallError, SwarmNode, SwarmTimeouts
from fedswarm.proto import fedswarm_pb2 as pb


async def echo(request, context):
    """Stage-like handler: loss = len(ids), step = stage, hidden = ids repeated `hidden.block_size` times."""
    reply = pb.StageReply(loss=float(len(request.ids)), optimizer_step=request.stage)
    if request.hidden.block_size:
        reply.hidden.data = request.ids * request.hidden.block_size
    return reply


async def slow(request, context):
    await asyncio.sleep(10)  # the system under test: a stage that never answers in time
    return pb.StageReply()


async def broken(request, context):
    raise ValueError("stage exploded")


@pytest.fixture(scope="module")
def pair():
    nodes = []
    try:
        t0 = time.perf_counter()
        nodes.append(SwarmNode(timeouts=SwarmTimeouts(call_s=3.0)))
        nodes.append(SwarmNode(initial_peers=nodes[0].maddrs(), timeouts=SwarmTimeouts(call_s=3.0)))
        print(f"two DHT nodes up in {time.perf_counter() - t0:.2f}s")
        b = nodes[1]
        b.add_handler("stage", echo, pb.StageRequest)
        b.add_handler("slow", slow, pb.StageRequest)
        b.add_handler("broken", broken, pb.StageRequest)
        yield nodes[0], b
    finally:
        for node in nodes:
            node.shutdown()


def wait_until(predicate, timeout: float, step: float = 0.05):
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline, tick = time.monotonic() + timeout, threading.Event()
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        tick.wait(step)


def test_announce_visible_from_other_node(pair):
    a, b = pair
    assert a.announce("fedswarm:t:stage:0", {"name": "a", "throughput": 10.0, "load": 0.0})
    assert b.announce("fedswarm:t:stage:0", {"name": "b", "throughput": 20.0, "load": 1.0})
    seen = wait_until(lambda: len(b.lookup("fedswarm:t:stage:0")) == 2 and b.lookup("fedswarm:t:stage:0"), 5.0)
    assert seen == {a.peer_id: {"name": "a", "throughput": 10.0, "load": 0.0},
                    b.peer_id: {"name": "b", "throughput": 20.0, "load": 1.0}}
    assert a.lookup("fedswarm:t:nothing-here") == {}


@pytest.mark.integration
def test_a_record_only_its_own_peer_can_write(pair):
    """A node that is not `a` writes over a's record (its own subkey, a year-long expiry, load 1e12) and beside
    it (the bare peer id as subkey): readers see only what a signed, and a's next announce wins."""
    from hivemind.utils.timed_storage import get_dht_time

    a, b = pair
    key, year = "fedswarm:t:stage:forged", get_dht_time() + 365 * 86400
    honest = {"name": "a", "throughput": 10.0, "load": 0.0}
    assert a.announce(key, honest, ttl=30)
    forger = SwarmNode(initial_peers=a.maddrs())
    try:
        forged = {"name": "a", "throughput": 10.0, "load": 1e12}
        for subkey in (a._validator.local_public_key, a.peer_id):   # a's signed subkey; a plain one
            forger._dht.store(key, forged, year, subkey=subkey, return_future=True).result(10)
        assert forger.announce(key, {"name": "forger", "throughput": 1e300, "load": 0.0})   # its own: fine
        seen = wait_until(lambda: (r := b.lookup(key)) and len(r) == 2 and r, 5.0)
        assert seen == {a.peer_id: honest, forger.peer_id: {"name": "forger", "throughput": 1e300, "load": 0.0}}
        assert b.take_unsigned_records() == 1 and b.lookup(key) and b.take_unsigned_records() == 0   # once each
        assert a.announce(key, {**honest, "load": 2.0}, ttl=30)
        assert wait_until(lambda: b.lookup(key)[a.peer_id]["load"] == 2.0, 5.0)
    finally:
        forger.shutdown()


def test_a_signed_subkey_names_its_peer():
    from fedswarm.p2p import new_identity
    from fedswarm.signed_records import by_owner, owner_peer_id, validator

    identity, peer_id = new_identity()
    subkey = validator(identity).local_public_key
    assert owner_peer_id(subkey) == peer_id
    assert owner_peer_id(peer_id) is None and owner_peer_id(b"[owner:not a key]") is None
    assert owner_peer_id(subkey + b"x") is None and owner_peer_id(b"x" + subkey) is None
    assert by_owner({subkey: 1, "plain": 2, b"[owner:junk]": 3}) == ({peer_id: 1}, ["plain", b"[owner:junk]"])


@pytest.mark.integration
def test_record_expires_after_ttl(pair):
    a, b = pair
    t0 = time.monotonic()
    assert a.announce("fedswarm:t:stage:9", {"x": 1}, ttl=1.0)
    assert b.lookup("fedswarm:t:stage:9") == {a.peer_id: {"x": 1}}
    gone = wait_until(lambda: b.lookup("fedswarm:t:stage:9") == {}, 5.0)
    assert gone and 0.8 < time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("stream", [True, False])
def test_call_round_trips(pair, stream):
    a, b = pair
    reply = a.call(b.peer_id, "stage", pb.StageRequest(run_id="r", stage=2, ids=b"\x01" * 40), pb.StageReply,
                   stream=stream)
    assert reply.loss == 40.0 and reply.optimizer_step == 2
    fut = a.submit(a.acall(b.peer_id, "stage", pb.StageRequest(ids=b"xy"), pb.StageReply, 2.0, stream))
    assert fut.result(5).loss == 2.0


def test_large_reply_to_small_request_streams(pair):
    a, b = pair
    request = pb.StageRequest(ids=b"\x07" * 1024, hidden=pb.SwarmTensor(block_size=6 * 1024))  # 6 MiB back
    reply = a.call(b.peer_id, "stage", request, pb.StageReply, timeout=5.0)
    assert len(reply.hidden.data) == 6 * 1024 * 1024
    t0 = time.monotonic()
    with pytest.raises(PeerCallError) as e:  # the unary path caps frames at 4 MiB: a clean error, not a hang
        a.call(b.peer_id, "stage", request, pb.StageReply, timeout=5.0, stream=False)
    assert e.value.kind == "error" and e.value.peer_id == b.peer_id and "stream=True" in str(e.value)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("stream", [True, False])
def test_slow_handler_times_out(pair, stream):
    a, b = pair
    t0 = time.monotonic()
    with pytest.raises(PeerCallError) as e:
        a.call(b.peer_id, "slow", pb.StageRequest(), pb.StageReply, timeout=0.5, stream=stream)
    assert e.value.kind == "timeout" and e.value.peer_id == b.peer_id
    assert b.peer_id in str(e.value) and "0.50s" in str(e.value)
    assert time.monotonic() - t0 < 1.5


def test_handler_error_and_missing_handler(pair):
    a, b = pair
    for name in ("broken", "no-such-handler"):
        for stream in (True, False):
            with pytest.raises(PeerCallError) as e:
                a.call(b.peer_id, name, pb.StageRequest(), pb.StageReply, timeout=2.0, stream=stream)
            assert e.value.kind == "error", str(e.value)
    with pytest.raises(PeerCallError) as e:
        a.call("not-a-peer-id", "stage", pb.StageRequest(), pb.StageReply)
    assert e.value.kind == "error"


PEER_SCRIPT = """
import sys
from fedswarm.p2p import SwarmNode
from fedswarm.proto import fedswarm_pb2 as pb
async def echo(request, context):
    return pb.StageReply(loss=float(len(request.ids)), optimizer_step=request.stage)
node = SwarmNode(initial_peers=sys.argv[1:])
try:
    node.add_handler("stage", echo, pb.StageRequest)
    print(node.peer_id, *node.maddrs(), flush=True)
    sys.stdin.readline()  # serve until the parent closes stdin or kills us
finally:
    node.shutdown()
"""


def read_line(proc, timeout: float) -> str:
    """One stdout line from ``proc`` or AssertionError after ``timeout``."""
    deadline, buf = time.monotonic() + timeout, b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"peer process not ready (rc={proc.poll()}, got {buf!r})"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"peer process closed stdout (rc={proc.poll()})"
            buf += chunk
    return buf.decode().strip()


@pytest.mark.integration
def test_killed_peer_fails_within_deadline(pair):
    a, _ = pair
    proc = subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, *a.maddrs()], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        peer_id, *maddrs = read_line(proc, 60.0).split()
        assert maddrs and all("/ip4/127.0.0.1/tcp/" in m for m in maddrs)
        reply = a.call(peer_id, "stage", pb.StageRequest(stage=1, ids=b"abc"), pb.StageReply, timeout=3.0)
        assert reply.loss == 3.0 and reply.optimizer_step == 1

        os.killpg(proc.pid, signal.SIGKILL)  # the peer, its DHT process and its p2pd
        proc.wait(10)
        for stream in (True, False):
            t0 = time.monotonic()
            with pytest.raises(PeerCallError) as e:
                a.call(peer_id, "stage", pb.StageRequest(stage=1), pb.StageReply, timeout=5.0, stream=stream)
            elapsed = time.monotonic() - t0
            assert e.value.kind in ("timeout", "unreachable") and e.value.peer_id == peer_id
            assert elapsed < 6.0
            print(f"call to killed peer (stream={stream}): {e.value.kind} after {elapsed:.3f}s")
    finally:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        for f in (proc.stdin, proc.stdout):
            with suppress(OSError):
                f.close()


def test_shutdown_is_idempotent_and_final():
    node = SwarmNode()
    try:
        assert node.maddrs()
    finally:
        node.shutdown()
        node.shutdown()
    with pytest.raises(RuntimeError):
        node.call(node.peer_id, "stage", pb.StageRequest(), pb.StageReply)


def test_an_oversized_message_is_refused_before_it_is_read(pair, monkeypatch):
    """A stage request whose length prefix is over the P2P bound is refused on that prefix (counted, never
    read into memory); the node serves the next call as before."""
    import fedswarm.p2p as transport

    a, b = pair
    monkeypatch.setattr(transport, "MAX_P2P_MESSAGE", 1 << 20)
    before = transport.P2P_REFUSALS.snapshot().get("oversized_message", 0)
    with pytest.raises(PeerCallError):
        a.call(b.peer_id, "stage", pb.StageRequest(ids=b"\x01" * (2 << 20)), pb.StageReply, timeout=5.0)
    assert wait_until(lambda: transport.P2P_REFUSALS.snapshot().get("oversized_message", 0) == before + 1, 5.0)
    assert a.call(b.peer_id, "stage", pb.StageRequest(ids=b"\x01" * 40), pb.StageReply, timeout=5.0).loss == 40.0


def test_a_gated_stream_refuses_before_it_reads_the_request(pair, monkeypatch):
    """With a gate, a stream call is refused before its request is read: a 2 MiB request over a 1 MiB P2P
    bound gets the gate's refusal (not `oversized_message`) and the handler never runs; an admitted call
    is served as usual."""
    import fedswarm.p2p as transport

    a, b = pair
    seen, admitted = [], set()

    async def gate(context):
        if context.remote_id.to_base58() not in admitted:
            raise ValueError("refused: not a member of this run")

    async def handler(request, context):
        seen.append(len(request.ids))
        return pb.StageReply(loss=float(len(request.ids)))
    b.add_handler("gated", handler, pb.StageRequest, gate=gate)
    monkeypatch.setattr(transport, "MAX_P2P_MESSAGE", 1 << 20)
    before = transport.P2P_REFUSALS.snapshot().get("oversized_message", 0)
    with pytest.raises(PeerCallError, match="not a member"):
        a.call(b.peer_id, "gated", pb.StageRequest(ids=b"\x01" * (2 << 20)), pb.StageReply, timeout=5.0)
    assert seen == [] and transport.P2P_REFUSALS.snapshot().get("oversized_message", 0) == before
    admitted.add(a.peer_id)
    assert a.call(b.peer_id, "gated", pb.StageRequest(ids=b"\x01" * 40), pb.StageReply, timeout=5.0).loss == 40.0
    assert seen == [40]


def test_a_member_request_over_its_role_bound_is_refused_unread(pair):
    """The gate admits a member with a byte bound (a stage server's: its run's micro-batch); a request whose
    length prefix says more is refused and counted `oversized_message` before it is read, and the handler
    never runs; one within the bound is served."""
    import fedswarm.p2p as transport

    a, b = pair
    seen = []

    async def gate(context):
        return 64 << 10

    async def handler(request, context):
        seen.append(len(request.ids))
        return pb.StageReply(loss=float(len(request.ids)))
    b.add_handler("bounded", handler, pb.StageRequest, gate=gate)
    before = transport.P2P_REFUSALS.snapshot().get("oversized_message", 0)
    with pytest.raises(PeerCallError, match="over this run's limit"):
        a.call(b.peer_id, "bounded", pb.StageRequest(ids=b"\x01" * (1 << 20)), pb.StageReply, timeout=5.0)
    assert seen == [] and transport.P2P_REFUSALS.snapshot().get("oversized_message", 0) == before + 1
    assert a.call(b.peer_id, "bounded", pb.StageRequest(ids=b"\x01" * 40), pb.StageReply, timeout=5.0).loss == 40.0
    assert seen == [40]
