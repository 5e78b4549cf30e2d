"""TLS, join proofs and signed updates: signing helpers, authorized_keys, and real processes on 127.0.0.1."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedswarm.client.identity import Identity, open_channel
from fedswarm.coordinator.auth import AuthError, Authenticator, NonceCache, SeenSet, parse_authorized_keys, verify
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
from fedswarm.proto import signing, wire
from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status, run_fedswarm
from fedswarm.sim.processes import wait_until

SMALL = ["--rounds", "1", "--min-clients", "1", "--local-steps", "5", "--seq-len", "64", "--batch-size", "8"]
OPTIONS = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES + 4096),
           ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES + 4096)]


run_cli = run_fedswarm   # `fedswarm ARGS` to its end (forked from the suite's fork server)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    proc = run_cli("keygen", str(out), "--clients", "2", "--hosts", "127.0.0.1,localhost")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "client-1.key" in proc.stdout
    for name in ("ca.key", "server.key", "client-0.key", "client-1.key"):
        assert (out / name).stat().st_mode & 0o777 == 0o600, name
    return out


def tls_args(keys: Path) -> list[str]:
    return ["--tls-cert", str(keys / "server.pem"), "--tls-key", str(keys / "server.key"),
            "--authorized-keys", str(keys / "authorized_keys")]




# -- unit: signing helpers and authorized_keys --------------------------------------------
def _signed_update(ident: Identity, run_id="r1", rnd=3, client_id=7, task_id="t1"):
    chunks = [b"part-one", b"part-two"]
    sig = ident.sign_update(run_id, rnd, client_id, task_id, 16, 1.5, len(chunks), chunks)
    return sig, signing.update_digest(16, 1.5, len(chunks), chunks)


def test_update_signature_binds_run_round_client_task_and_payload():
    ident = Identity(ed25519.Ed25519PrivateKey.generate())
    sig, digest = _signed_update(ident)
    ok = lambda **kw: verify(ident.public_key, kw.get("sig", sig), signing.update_message(  # noqa: E731
        kw.get("run_id", "r1"), kw.get("rnd", 3), kw.get("cid", 7), kw.get("task", "t1"), kw.get("digest", digest)))
    assert ok()
    assert not ok(sig=bytes([sig[0] ^ 1]) + sig[1:])        # bad signature
    assert not ok(rnd=4)                                     # wrong round
    assert not ok(run_id="r2")                               # wrong run id
    assert not ok(cid=8) and not ok(task="t2")
    assert not ok(digest=signing.update_digest(16, 1.5, 2, [b"part-one", b"part-twO"]))
    assert not ok(digest=signing.update_digest(17, 1.5, 2, [b"part-one", b"part-two"]))
    other = Identity(ed25519.Ed25519PrivateKey.generate())
    assert not verify(other.public_key, sig, signing.update_message("r1", 3, 7, "t1", digest))

    auth = Authenticator({ident.public_key: "c0"})
    auth.check_update(ident.public_key, sig, "r1", 3, 7, "t1", digest)
    for args in (("r1", 4, 7, "t1"), ("r2", 3, 7, "t1"), ("r1", 3, 7, "t2")):
        with pytest.raises(AuthError) as err:
            auth.check_update(ident.public_key, sig, *args, digest)
        assert err.value.reason == "bad_signature"
    Authenticator(None).check_update(b"", b"", "r1", 3, 7, "t1", digest)  # dev mode: ignored


def test_join_proof_checks():
    ident, stranger = (Identity(ed25519.Ed25519PrivateKey.generate()) for _ in range(2))
    auth = Authenticator({ident.public_key: "c0"}, run_id="run-1")
    now = time.time()
    fresh = auth.challenge(now - 5)

    def reason(proof: dict, name: str = "alice", role: str = "client", at: float = now) -> str | None:
        try:
            auth.check_join(name, role, proof["public_key"], proof["signature"], proof["challenge"], proof["nonce"],
                            now=at)
        except AuthError as err:
            return err.reason
        return None

    good = ident.join_proof("alice", "client", "run-1", fresh)
    assert reason(good) is None
    assert reason(good) == "replayed_join"
    assert reason(stranger.join_proof("alice", "client", "run-1", fresh)) == "unknown_key"
    assert reason(ident.join_proof("alice", "client", "run-1", auth.challenge(now - 121))) == "stale_join"
    assert reason(ident.join_proof("alice", "client", "run-1", auth.challenge(now + 5))) == "stale_join"
    assert reason(ident.join_proof("alice", "client", "run-1", fresh), name="mallory") == "bad_signature"
    assert reason(ident.join_proof("alice", "client", "run-1", fresh), role="peer") == "bad_signature"
    assert reason(ident.join_proof("alice", "client", "run-2", fresh)) == "bad_signature"   # another run
    assert reason({**ident.join_proof("alice", "client", "run-1", fresh), "nonce": b"short"}) == "bad_signature"
    # A challenge from another coordinator process (as after a restart) or a forged one is refused.
    restarted = Authenticator({ident.public_key: "c0"}, run_id="run-1")
    assert reason(ident.join_proof("alice", "client", "run-1", restarted.challenge(now))) == "stale_challenge"
    assert reason(ident.join_proof("alice", "client", "run-1", fresh[:8] + bytes(16))) == "stale_challenge"
    assert Authenticator(None).check_join("anyone", "client", b"", b"", b"", b"") == ""


def test_status_proof_checks():
    ident, admin, stranger = (Identity(ed25519.Ed25519PrivateKey.generate()) for _ in range(3))
    auth = Authenticator({ident.public_key: "c0"}, admin={admin.public_key: "ops"}, run_id="run-1")

    def reason(who: Identity | None) -> str | None:
        proof = who.status_proof("run-1", auth.challenge()) if who else {}
        try:
            auth.check_status(proof.get("public_key", b""), proof.get("signature", b""), proof.get("challenge", b""),
                              proof.get("nonce", b""))
        except AuthError as err:
            return err.reason
        return None

    assert reason(ident) is None and reason(admin) is None
    assert reason(stranger) == "unknown_key" and reason(None) == "no_key"
    with pytest.raises(AuthError):  # an admin key may read status, not join
        auth.check_join("ops", "client", **admin.join_proof("ops", "client", "run-1", auth.challenge()))


def _refusal(call) -> str | None:
    try:
        call()
    except AuthError as err:
        return err.reason
    return None


def test_a_full_nonce_cache_never_locks_out_a_fresh_join():
    admin, honest, *others = (Identity(ed25519.Ed25519PrivateKey.generate()) for _ in range(5))
    auth = Authenticator({honest.public_key: "c0", **{o.public_key: f"o{i}" for i, o in enumerate(others)}},
                         admin={admin.public_key: "ops"}, run_id="run-1", nonces=NonceCache(max_entries=40, per_key=15))
    now = time.monotonic()

    def status(who: Identity, at: float = now, proof: dict | None = None) -> str | None:
        p = proof or who.status_proof("run-1", auth.challenge(at))
        return _refusal(lambda: auth.check_status(p["public_key"], p["signature"], p["challenge"], p["nonce"], now=at))

    def join(who: Identity, at: float = now, proof: dict | None = None) -> str | None:
        p = proof or who.join_proof("h", "client", "run-1", auth.challenge(at))
        return _refusal(lambda: auth.check_join("h", "client", **p, now=at))

    kept = admin.status_proof("run-1", auth.challenge(now))
    assert status(admin, proof=kept) is None
    assert [status(admin) for _ in range(14)] == [None] * 14          # an admin polling Status: its share ...
    assert status(admin) == "too_many_proofs"                         # ... and no more
    assert join(honest) is None                                       # another key still joins
    assert [status(o) for o in others[:2] for _ in range(12)] == [None] * 24   # 15 + 1 + 24 = 40: full
    assert join(others[2]) == "nonce_cache_full"                      # a fresh proof: "retry shortly", not a replay
    assert status(admin, proof=kept) == "replayed_join"               # a replay still is one
    assert len(auth.nonces) == 40
    # Every proof is forgotten when its challenge expires, and a proof on an expired challenge is stale: no hole.
    later = now + auth.window_s + 0.001
    assert status(admin, at=later, proof=kept) == "stale_join"
    assert join(others[2], at=later) is None and join(honest, at=later) is None
    assert len(auth.nonces) == 2


def test_nonces_are_per_key_and_expire_with_their_challenge():
    cache = NonceCache(max_entries=10, per_key=10)
    nonce = bytes(16)
    assert cache.add(b"a" * 32, nonce, expires_at=10.0, now=0.0) == ""
    assert cache.add(b"b" * 32, nonce, expires_at=10.0, now=0.0) == ""   # another key's proof may reuse it
    assert cache.add(b"a" * 32, nonce, expires_at=20.0, now=10.0) == "replayed_join"   # still live at its expiry
    assert cache.add(b"a" * 32, nonce, expires_at=20.0, now=10.5) == ""  # forgotten after it
    assert len(cache) == 1


def test_seen_updates_are_kept_until_a_round_after_theirs_commits():
    committed = [4]
    seen = SeenSet(lambda: committed[0])
    seen.add(("c1", "task-a"))          # an update of round 5, delivered while 4 was the last committed
    committed[0] = 5
    seen.add(("c1", "task-b"))          # round 6
    assert ("c1", "task-a") in seen     # round 5 just committed: a replay of it is still caught here
    committed[0] = 6
    assert ("c1", "task-a") not in seen and ("c1", "task-b") in seen and len(seen) == 1
    for i in range(5000):               # no size cap, so nothing live is ever evicted
        seen.add(("c2", i))
    assert ("c1", "task-b") in seen and len(seen) == 5001
    committed[0] = 8
    assert len(seen) == 0


def test_authorized_keys_parsing():
    a = Identity(ed25519.Ed25519PrivateKey.generate()).public_key
    b = Identity(ed25519.Ed25519PrivateKey.generate()).public_key
    text = (f"# header\n\n  ed25519 {base64.b64encode(a).decode()} client-0\n"
            f"ed25519 {base64.b64encode(b).decode()}\n   # indented comment\n")
    assert parse_authorized_keys(text) == {a: "client-0", b: "line 4"}
    bad = [f"ssh-rsa {base64.b64encode(a).decode()} x", "ed25519", "ed25519 not*base64 x",
           f"ed25519 {base64.b64encode(a[:31]).decode()} short"]
    for line in bad:
        with pytest.raises(ValueError, match=r"line 3\b"):
            parse_authorized_keys(f"# ok\n\n{line}\n")


# -- real processes -------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_tls_client_completes_round_and_plaintext_client_cannot_join(tmp_path, keys):
    ca, key0 = str(keys / "ca.pem"), str(keys / "client-0.key")
    with coordinator_process(tmp_path, ["--state-dir", str(tmp_path / "state"), *SMALL, *tls_args(keys)]) as (coord, address):
        assert "accepts ANY client" not in coord.output()
        plain = Proc("plain", fedswarm_cmd("client", "--coordinator", address, "--name", "plain", "--threads", "1",
                                           "--device", "cpu", "--key", str(keys / "client-1.key")),
                     tmp_path / "plain.log")
        try:
            plain.wait_for_line(re.compile(r"(?s)join failed \(UNAVAILABLE.*retrying.*join failed.*retrying"), 90)
            assert plain.popen.poll() is None
        finally:
            plain.stop()

        argv = fedswarm_cmd("client", "--coordinator", address, "--name", "good", "--threads", "1", "--device", "cpu",
                            "--tls-ca", ca, "--key", str(keys / "client-0.key"))
        good = Proc("good", argv, tmp_path / "good.log")
        try:
            wait_until("state done", lambda: fetch_status(address, tls_ca=ca, key=key0)["state"] == "done", 200,
                       [coord, good])
            refused = run_cli("status", "--coordinator", address, "--json", "--tls-ca", ca)
            assert refused.returncode == 1 and "no_key" in refused.stderr, refused.stderr
            cli = run_cli("status", "--coordinator", address, "--json", "--tls-ca", ca, "--key", key0)
            assert cli.returncode == 0, cli.stderr
            status = json.loads(cli.stdout)
            assert status["state"] == "done" and status["round"] == 1
            assert status["rounds"][-1]["clients"] == ["good"]   # (its live session may have lapsed by now)
            assert good.popen.wait(timeout=60) == 0, good.output()[-3000:]
        finally:
            good.stop()
        # status without the CA cannot reach a TLS coordinator
        assert run_cli("status", "--coordinator", address, "--timeout", "3").returncode != 0


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bad_security_files_exit_2(tmp_path, keys):
    state = tmp_path / "state"
    cases = [
        ["coordinator", "--state-dir", str(state), "--tls-cert", str(keys / "server.pem")],
        ["coordinator", "--state-dir", str(state), "--tls-cert", str(tmp_path / "missing.pem"),
         "--tls-key", str(keys / "server.key")],
        ["coordinator", "--state-dir", str(state), "--tls-cert", str(keys / "server.pem"),
         "--tls-key", str(keys / "ca.key")],
        ["coordinator", "--state-dir", str(state), "--authorized-keys", str(keys / "ca.pem")],
        ["client", "--coordinator", "127.0.0.1:1", "--key", str(keys / "server.key")],
        ["client", "--coordinator", "127.0.0.1:1", "--tls-ca", str(keys / "client-0.pub")],
        ["status", "--coordinator", "127.0.0.1:1", "--tls-ca", str(tmp_path / "missing.pem")],
    ]
    for argv in cases:
        proc = run_cli(*argv, timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, (argv, out)
        assert "error:" in proc.stderr and "Traceback" not in out, (argv, out)
    assert not state.exists()


@pytest.fixture(scope="module")
def auth_coordinator(tmp_path_factory, keys):
    out = tmp_path_factory.mktemp("authcoord")
    args = ["--state-dir", str(out / "state"), *SMALL, "--lease", "120", *tls_args(keys)]
    with coordinator_process(out, args) as (proc, address):
        channel = open_channel(address, keys / "ca.pem", options=OPTIONS)
        yield proc, address, channel, str(keys / "ca.pem")
        channel.close()


def _proof(stub, ident: Identity, name: str) -> dict:
    challenge = stub.Challenge(pb.ChallengeRequest(), timeout=30)
    return ident.join_proof(name, "client", challenge.run_id, challenge.challenge)


def _join(stub, proof: dict, name: str):
    return stub.Join(pb.JoinRequest(name=name, device="cpu", precision="fp32", **proof), timeout=30)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_unlisted_key_is_refused(auth_coordinator, keys):
    _, address, channel, ca = auth_coordinator
    stub = pb_grpc.CoordinatorStub(channel)
    stranger = Identity(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(grpc.RpcError) as err:
        _join(stub, _proof(stub, stranger, "stranger"), "stranger")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        _join(stub, {}, "keyless")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status = fetch_status(address, tls_ca=ca, key=keys / "client-0.key")
    assert status["rejections"].get("unknown_key", 0) >= 2
    assert not any(c["name"] in ("stranger", "keyless") for c in status["clients"])


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_tampered_and_replayed_updates_are_refused(auth_coordinator, keys):
    coord, address, channel, ca = auth_coordinator
    stub = pb_grpc.CoordinatorStub(channel)
    push_raw = channel.stream_unary("/fedswarm.Coordinator/PushUpdate", request_serializer=None,
                                    response_deserializer=pb.PushReply.FromString)
    ident = Identity.load(keys / "client-1.key")
    proof = _proof(stub, ident, "direct")
    joined = _join(stub, proof, "direct")
    with pytest.raises(grpc.RpcError) as err:  # the same proof twice
        _join(stub, proof, "direct")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    cid, token, run_id = joined.client_id, joined.session_token, joined.run_id
    cfg = json.loads(joined.run_config_json)

    def pull():
        task = stub.PullTask(pb.PullTaskRequest(client_id=cid, session_token=token, wait_s=5), timeout=30)
        return task if task.kind == pb.TASK_TRAIN else None
    task = wait_until("a train task", pull, 120, [coord])

    shapes = {}
    for chunk in stub.FetchModel(pb.FetchModelRequest(client_id=cid, session_token=token, task_id=task.task_id),
                                 timeout=60):
        shapes[chunk.part.name] = tuple(chunk.part.shape)
    codec = C.codec_by_name(cfg["upload_codec"])
    block = cfg.get("codec_block_size") or None
    parts = [p for name, shape in shapes.items()
             for p in wire.tensor_parts(name, shape, C.encode(torch.zeros(shape).flatten(), codec, block))]
    raw = [pb.UpdateChunk(part=p).SerializeToString() for p in parts]
    header = pb.UpdateHeader(client_id=cid, session_token=token, task_id=task.task_id, round=task.round,
                             num_examples=8, train_loss=2.0, num_tensors=len(shapes), num_parts=len(parts))
    header.signature = ident.sign_update(run_id, task.round, cid, task.task_id, 8, 2.0, len(parts), raw)
    head = pb.UpdateChunk(header=header).SerializeToString()

    tampered_part = pb.TensorPart()
    tampered_part.CopyFrom(parts[0])
    tampered_part.data = bytes([tampered_part.data[0] ^ 0x01]) + tampered_part.data[1:]
    tampered = [pb.UpdateChunk(part=tampered_part).SerializeToString()] + raw[1:]
    with pytest.raises(grpc.RpcError) as err:
        push_raw(iter([head] + tampered), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    status = fetch_status(address, tls_ca=ca, key=keys / "client-0.key")
    assert status["rejections"].get("bad_signature", 0) >= 1
    assert status["round"] == 0 and status["state"] != "done"

    reply = push_raw(iter([head] + raw), timeout=60)
    assert reply.accepted
    with pytest.raises(grpc.RpcError) as err:
        push_raw(iter([head] + raw), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    status = wait_until("round 1", lambda: (s := fetch_status(address, tls_ca=ca, key=keys / "client-0.key"))["round"] == 1 and s, 120, [coord])
    assert status["rejections"].get("replayed_update", 0) >= 1
    assert status["rejections"].get("replayed_join", 0) >= 1
    assert status["rounds"][-1]["clients"] == ["direct"]
