"""Status stays bounded on an old run (the history comes in pages), and a full nonce cache refuses fresh proofs
with a counted "retry shortly" reason the client daemon retries on. The coordinator service runs in-process on
a real gRPC socket, over rounds and sessions built in-process."""
from __future__ import annotations

import json

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedswarm.client.identity import Identity, signed_join_fields
from fedswarm.coordinator.auth import Authenticator, NonceCache
from fedswarm.coordinator.status import StatusLimits
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import refusals
from fedswarm.sim.bench_status import ServedInThread, build_service, old_run
from fedswarm.app.status_view import render

ROUNDS, CLIENTS, SESSIONS = 2000, 100, 1200


@pytest.fixture(scope="module")
def old_coordinator():
    service = build_service(old_run(ROUNDS, CLIENTS), SESSIONS)
    with ServedInThread(service) as address, grpc.insecure_channel(address) as channel:
        yield service, pb_grpc.CoordinatorStub(channel), address
    service.members.close()


def test_status_lists_the_last_rounds_and_totals_over_all(old_coordinator):
    service, stub, _ = old_coordinator
    reply = stub.Status(pb.StatusRequest(), timeout=30)
    status = json.loads(reply.json)
    every = service.progress.rounds
    assert reply.ByteSize() < 400_000                  # every round listed: 3 MB here, past 4 MiB by ~2,800 rounds
    assert [r["round"] for r in status["rounds"]] == list(range(ROUNDS - 99, ROUNDS + 1))
    assert status["round"] == ROUNDS and status["history"]["rounds"] == ROUNDS + 1
    assert status["resumed_from"] == ROUNDS            # this coordinator took the run up after its last commit
    t = status["totals"]
    assert t["rounds_committed"] == ROUNDS and t["updates"] == ROUNDS * CLIENTS
    for key in ("bytes_up", "bytes_up_raw", "bytes_down", "bytes_down_raw", "tokens", "failures"):
        assert t[key] == sum(r[key] for r in every), key
    assert len(status["clients"]) == StatusLimits.clients < SESSIONS
    assert status["clients_total"] == SESSIONS and status["clients_by_role"] == {"client": SESSIONS}
    text = render(status, "here")                      # what `fedswarm status` prints
    assert f"totals: {ROUNDS} rounds, {ROUNDS * CLIENTS} updates" in text
    assert f"resumed after round {ROUNDS}" in text.splitlines()[0]
    assert f"rounds ({ROUNDS + 1}, last 10 shown)" in text and f"clients ({SESSIONS}, first 1000 shown)" in text


def test_history_pages_are_bounded_and_fedswarm_status_history_gets_every_round(old_coordinator, capsys):
    from fedswarm.app.cli import build_parser

    service, stub, address = old_coordinator
    page = json.loads(stub.Status(pb.StatusRequest(history=True, from_round=5, max_rounds=7), timeout=30).json)
    assert [r["round"] for r in page["rounds"]] == list(range(5, 12)) and page["next_round"] == 12
    big = stub.Status(pb.StatusRequest(history=True, max_rounds=100_000), timeout=30)
    assert big.ByteSize() < StatusLimits.round_bytes + 4096   # the page size is capped, in rounds and bytes
    assert 0 < json.loads(big.json)["next_round"] < ROUNDS
    past = json.loads(stub.Status(pb.StatusRequest(history=True, from_round=ROUNDS + 1), timeout=30).json)
    assert past["rounds"] == [] and past["next_round"] is None
    args = build_parser(only="status").parse_args(["status", "--coordinator", address, "--history", "--json"])
    assert args.func(args) == 0                        # `fedswarm status --history --json`, pages and all
    printed = json.loads(capsys.readouterr().out)
    assert printed["rounds"] == service.progress.rounds and printed["totals"]["rounds_committed"] == ROUNDS


def _key_file(tmp_path, name: str) -> tuple[str, Identity]:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / f"{name}.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return str(path), Identity(key)


@pytest.mark.integration
def test_a_full_nonce_cache_is_a_counted_retry_and_the_daemon_joins_after(tmp_path):
    from fedswarm.client.session import ClientTimeouts, Session

    admin, honest, *fillers = (Identity(ed25519.Ed25519PrivateKey.generate()) for _ in range(4))
    late_key, late = _key_file(tmp_path, "late")
    auth = Authenticator({k.public_key: n for k, n in ((honest, "h"), (late, "l"), *((f, "f") for f in fillers))},
                         window_s=1.5, admin={admin.public_key: "ops"}, run_id="run-1",
                         nonces=NonceCache(max_entries=25, per_key=10))
    service = build_service(old_run(3, 2), 0, auth=auth)
    with ServedInThread(service) as address, grpc.insecure_channel(address) as channel:
        daemon = Session(address, "late", identity=Identity.load(late_key),
                         timeouts=ClientTimeouts(backoff_initial_s=0.1, backoff_max_s=0.2, give_up_s=20))
        stub = pb_grpc.CoordinatorStub(channel)
        challenge = stub.Challenge(pb.ChallengeRequest(), timeout=10).challenge   # one for all: fresh nonces
        signed = lambda who: pb.StatusRequest(**who.status_proof("run-1", challenge))  # noqa: E731
        for _ in range(10):                              # an admin polling Status takes its share ...
            stub.Status(signed(admin), timeout=10)
        with pytest.raises(grpc.RpcError) as err:        # ... and no more
            stub.Status(signed(admin), timeout=10)
        assert refusals.reason(err.value) == "too_many_proofs"
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        def join(who: Identity, name: str, on=stub):
            return on.Join(pb.JoinRequest(name=name, device="cpu", precision="bf16",
                                          **signed_join_fields(on, who, name)), timeout=10)
        assert join(honest, "honest").client_id               # another key joins meanwhile
        for f in fillers:
            for _ in range(7):
                stub.Status(signed(f), timeout=10)
        with pytest.raises(grpc.RpcError) as err:        # 10 + 1 + 14 = 25 unexpired proofs: full
            join(late, "late")
        assert refusals.reason(err.value) == "nonce_cache_full" and "nonce_cache_full" in refusals.RETRY_SOON
        # The daemon's retry loop, on its own channel, signs fresh challenges until the proofs above expire
        # (1.5 s after their challenge), then joins.
        joined = daemon.with_retry("join", lambda: join(daemon.identity, "late", on=daemon.stub))
        daemon.channel.close()
        assert joined.client_id
        counted = service.status_dict()["rejections"]
    service.members.close()
    assert counted.get("too_many_proofs") == 1 and counted.get("nonce_cache_full", 0) >= 2, counted
    assert "replayed_join" not in counted
