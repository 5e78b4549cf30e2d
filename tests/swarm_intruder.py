"""A process that never joined the run, on a host of its own, trying the swarm's data plane (used by
tests/test_hosts_swarm.py).

  calls RUN_ID IP STAGES MADDR...    one forward and one backward to a peer of each stage; prints the outcomes
  records RUN_ID IP STAGES MADDR...  announces a fake replica (throughput 1e300) of every stage, serves it,
                                      and tries to overwrite the last stage's records with junk of one-year
                                      expiry (under their signed subkeys and under their bare peer ids);
                                      prints "calls N" (calls its fake replica received) every second
"""
import json
import sys
import threading

import torch

from hivemind.utils.timed_storage import get_dht_time

from fedswarm.client.swarm.routing import StageRecord, stage_key
from fedswarm.client.swarm.stage_server import HANDLER
from fedswarm.client.swarm.tensors import ids_to_bytes, to_wire
from fedswarm.p2p import PeerCallError, SwarmNode
from fedswarm.models import model_config
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb

YEAR_S = 365 * 86400.0


def main() -> None:
    mode, run_id, ip, stages, bootstrap = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
    node = SwarmNode(initial_peers=bootstrap, host=ip)
    tick = threading.Event()

    def records(stage: int) -> dict:
        for _ in range(300):   # 60 s: it may start beside the peers it looks for
            found = node.lookup(stage_key(run_id, stage))
            if found:
                return found
            tick.wait(0.2)
        raise SystemExit(f"no records of stage {stage} in the DHT")

    if mode == "calls":
        hidden = model_config("gpt2-tiny").hidden_size
        bf16 = C.CODEC_NAMES["bf16"]
        outcomes = []
        for stage in range(stages):
            peer = sorted(records(stage))[0]
            req = pb.StageRequest(run_id=run_id, stage=stage, microbatch_id="intruder")
            if stage == 0:
                req.ids, req.ids_shape[:] = ids_to_bytes(torch.zeros(8, 64, dtype=torch.long)), [8, 64]
            else:
                req.hidden.CopyFrom(to_wire(torch.randn(8, 64, hidden), bf16))
            if stage == stages - 1:
                req.labels = ids_to_bytes(torch.zeros(8, 64, dtype=torch.long))
            for backward in (False, True):
                req.backward = backward
                if backward:
                    req.grad_output.CopyFrom(to_wire(torch.randn(8, 64, hidden) * 100, bf16))
                try:
                    node.call(peer, HANDLER, req, pb.StageReply, timeout=10)
                    outcomes.append("served")
                except PeerCallError as err:
                    outcomes.append(f"{err.kind}: {err.reason[:300]}")
        print(json.dumps(outcomes), flush=True)
    elif mode == "records":
        calls = [0]

        async def fake_stage(request, context):
            calls[0] += 1
            return pb.StageReply()
        node.add_handler(HANDLER, fake_stage, pb.StageRequest)
        hide = stages - 1
        honest = sorted(records(hide))
        found = node._dht.get(stage_key(run_id, hide), latest=True)   # the honest records' own (signed) subkeys
        signed = list(found.value) if found is not None else []
        while True:
            for stage in range(stages):
                fake = StageRecord(node.peer_id, "fake", stage, 1e300, 0.0)
                node.announce(stage_key(run_id, stage), fake.to_value(), ttl=60)
            # bury the honest replicas' records under junk that outlives their announces: under their own
            # subkeys (unsigned: refused by every DHT node) and under their bare peer ids (ignored by readers)
            for subkey in [*signed, *honest]:
                node._dht.store(stage_key(run_id, hide), {"junk": True}, get_dht_time() + YEAR_S, subkey=subkey)
            print(f"calls {calls[0]}", flush=True)
            tick.wait(1.0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    node.shutdown()


if __name__ == "__main__":
    main()
