"""Status size and latency on an old run: `python -m fedswarm.sim.bench_status [--rounds N] [--clients K]`.

A coordinator service holding N committed rounds of K clients each (built in-process, as a restart on such a
state dir would load them) serves Status on a real gRPC socket; this prints the size and latency of a plain
Status, of paging in the whole history, and the size a Status listing every round would have (the old reply)."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

ROUND = {"eval_loss": 3.25, "train_loss": 3.31, "bytes_up": 123_456_789, "bytes_up_raw": 987_654_321,
         "seconds": 31.5, "bytes_down": 12_345_678, "bytes_down_raw": 98_765_432, "tokens": 819_200, "failures": 0}


def old_run(rounds: int, clients: int) -> list[dict]:
    """Round records as the driver keeps them: round 0 (the initial model), then `rounds` of `clients` each."""
    names = [f"client-{i}" for i in range(clients)]
    return [{"round": 0, **dict.fromkeys(ROUND, 0), "clients": []}] + [
        {"round": r, **ROUND, "clients": names} for r in range(1, rounds + 1)]


def build_service(rounds: list[dict], clients: int, limits=None, auth=None):
    """A CoordinatorService over those rounds, with `clients` live sessions (`auth`: an Authenticator whose
    run id the service takes)."""
    from fedswarm.coordinator.config import CoordinatorTimeouts
    from fedswarm.run_config import RunConfig
    from fedswarm.coordinator.driver import RunProgress
    from fedswarm.coordinator.grid import SessionGrid
    from fedswarm.coordinator.membership import Membership
    from fedswarm.coordinator.service import CoordinatorService

    cfg = RunConfig(rounds=len(rounds) - 1)
    members = Membership(600.0, lambda cid, why: None)
    for i in range(clients):
        members.join(f"client-{i}", "cpu", "bf16")
    return CoordinatorService(cfg, auth.run_id if auth else "bench", SessionGrid(1, members.live_ids), members,
                              RunProgress(cfg, rounds), CoordinatorTimeouts(), auth=auth, status_limits=limits)


class ServedInThread:
    """The service's real aio server on 127.0.0.1, its event loop on a thread of its own."""

    def __init__(self, service):
        self.service, self.port = service, 0
        self._loop = asyncio.new_event_loop()
        self._started, self._stop = threading.Event(), None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)

    async def _serve(self):
        from fedswarm.coordinator.serving import Server, ServingLimits

        server = Server(self.service.handler(), ServingLimits())   # grpc.aio: made on the loop it serves on
        self.port, self._stop = server.bind("127.0.0.1:0", None), asyncio.Event()
        await server.start()
        self._started.set()
        await self._stop.wait()
        await server.stop(grace_s=0.5)

    def __enter__(self) -> str:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the in-process coordinator server did not start within 30 s")
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()


def measure(rounds: int, clients: int, calls: int = 20) -> dict:
    import grpc

    from fedswarm.proto import fedswarm_pb2 as pb
    from fedswarm.proto import fedswarm_pb2_grpc as pb_grpc
    from fedswarm.app.status_view import fetch_history

    history = old_run(rounds, clients)
    service = build_service(history, clients)
    old_bytes = len(json.dumps({**service.status_dict(), "rounds": history}))
    with ServedInThread(service) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        stub.Status(pb.StatusRequest(), timeout=30)   # connect
        took, size = [], 0
        for _ in range(calls):
            t0 = time.perf_counter()
            size = stub.Status(pb.StatusRequest(), timeout=30).ByteSize()
            took.append(time.perf_counter() - t0)
        pages = []
        t0 = time.perf_counter()

        def request():
            pages.append(1)
            return pb.StatusRequest()
        every = fetch_history(stub, request, 30)
        paged_s = time.perf_counter() - t0
    service.members.close()
    assert [r["round"] for r in every] == list(range(rounds + 1)), "paging lost or repeated a round"
    return {"rounds": rounds, "clients": clients, "status_bytes": size,
            "status_p50_ms": round(statistics.median(took) * 1e3, 2), "status_max_ms": round(max(took) * 1e3, 2),
            "history_pages": len(pages), "history_s": round(paged_s, 3),
            "every_round_status_bytes": old_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--calls", type=int, default=20, help="plain Status calls timed")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.rounds, args.clients, args.calls)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
