"""A re-assigned peer frees its old stage (module, optimizer, cached graphs, snapshot) and holds only the new one;
a genuinely slow stage gets a peer moved to it (real processes, -m slow)."""
import gc
import weakref

import pytest
import torch

from fedswarm.client.swarm.stage_server import StageServer
from fedswarm.client.swarm.tensors import ids_to_bytes
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.run_config import RunConfig
from fedswarm.stages import build_untied_model, stage_param_names, stage_state

CFG = RunConfig(model="gpt2-tiny", mode="swarm", stages=3, seed=0, lr=1e-3, seq_len=16, batch_size=2,
                activation_codec="bf16")


def _states():
    from fedswarm.stages import Stage
    full = build_untied_model("gpt2-tiny", 0)
    return [stage_state(Stage(full, i, 3)) for i in range(3)]


def test_a_stage_switch_frees_the_old_stage_before_building_the_new_one(monkeypatch):
    states = _states()
    server = StageServer("run", CFG, torch.device("cpu"), "fp32")
    try:
        server.serve(0, states[0])
        req = pb.StageRequest(run_id="run", stage=0, microbatch_id="m1", ids=ids_to_bytes(torch.zeros(2, 16, dtype=torch.long)))
        req.ids_shape[:] = [2, 16]
        assert server._timed_compute(req).hidden.shape == [2, 16, 128]   # a forward graph is now cached
        old = [weakref.ref(x) for x in (server.module, server.optimizer, *server.module.parameters(),
                                        *server.snapshot.values())]
        graph_out = weakref.ref(server.graphs["m1"][1])
        seen_during_build = []
        import fedswarm.client.swarm.stage_server as ss
        real_build = ss.build_stage

        def watching_build(*args, **kwargs):   # what the peer still holds of stage 0 while stage 1 is built
            gc.collect()
            seen_during_build.append(sum(r() is not None for r in old) + (graph_out() is not None))
            return real_build(*args, **kwargs)

        monkeypatch.setattr(ss, "build_stage", watching_build)
        server.serve(1, states[1])
        assert seen_during_build == [0], "the old stage was still alive while the new one was built"
        assert server.stage_index == 1 and not server.graphs
        assert [n for n, _ in server.module.named_parameters()] == stage_param_names("gpt2-tiny", 1, 3)
        assert list(server.snapshot) == list(states[1])
        assert {id(p) for g in server.optimizer.param_groups for p in g["params"]} == \
            {id(p) for p in server.module.parameters()}
    finally:
        server.close()


# A real swarm whose stage 2 runs on a slow device (FEDSWARM_FAULT=slow: every forward and backward takes 0.1 s
# more): the coordinator moves a peer there once the imbalance held over several windows, with the predicted
# gain and the mover's measured switch time (fetch + build, reported in its heartbeats) in the event.
# Real processes for ~2 minutes: behind -m slow (the policy itself: tests/test_swarm_registry.py).
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_genuinely_slow_stage_gets_a_peer_moved_to_it(tmp_path):
    import re

    from fedswarm.sim.processes import Proc, fedswarm_cmd
    from fedswarm.app.testing import swarm_run, swarm_status as _swarm_status, until as _until

    with swarm_run(tmp_path, stages=3, rounds=1000, average_every=50) as swarm:
        for i, stage in enumerate([0, 1, 2, 0, 1]):   # stage 0: p0 p3, 1: p1 p4, 2: p2 (slow)
            swarm.start_peer(f"p{i}", stage, env={"FEDSWARM_FAULT": "slow:0.1"} if i == 2 else None)
        argv = fedswarm_cmd("client", "--role", "trainer", "--coordinator", swarm.address, "--name", "t0",
                            "--threads", "1", "--inflight", "2")
        trainer = swarm.procs["t0"] = Proc("t0", argv, tmp_path / "t0.log")
        watch = list(swarm.procs.values()) + [swarm.coordinator]
        started = _until("the first micro-batches", lambda: (s := _swarm_status(swarm.address))["tokens"] > 0 and s,
                         120, watch)
        assert started["reassignments"] == [], started["reassignments"]

        def moved():
            s = _swarm_status(swarm.address)
            return [e for e in s["reassignments"] if e["stage"] == 2] or None
        move = _until("a peer moved to the slow stage 2", moved, 180, watch)[0]
        assert move["source"] in (0, 1) and "bottleneck" in move["reason"], move
        assert move["gain"] >= 0.15 and move["switch_s"] > 0, move
        mover = swarm.procs[move["peer"]]
        line = _until(f"{move['peer']} serving stage 2",
                      lambda: re.search(rf"now serving stage 2 \(was {move['source']}\).*ready in ([\d.]+) s",
                                        mover.output()), 120, watch)
        switched = float(line.group(1))
        sw = _until("its measured switch reported", lambda: (s := _swarm_status(swarm.address)) and
                    s["stages"][2]["switch_s"].get(move["peer"]) == pytest.approx(switched, abs=0.01) and s, 30, watch)
        assert not [e for e in sw["reassignments"] if "no peer" in e["reason"] or "last peer" in e["reason"]], sw
        assert sw["microbatches_lost"] == 0, sw
        assert "micro-batch lost" not in trainer.output()


def test_a_step_drops_the_forward_graphs_it_made_stale():
    """Each backward steps the optimizer, so every other cached forward saved weights that are gone (its
    backward would re-run the forward): they are dropped, activations and all, at once."""
    from fedswarm.client.swarm.tensors import to_wire

    states = _states()
    server = StageServer("run", CFG, torch.device("cpu"), "fp32")
    try:
        server.serve(1, states[1])
        outs = {}
        for mb in ("a", "b"):
            req = pb.StageRequest(run_id="run", stage=1, microbatch_id=mb)
            req.hidden.CopyFrom(to_wire(torch.randn(2, 16, 128), server.codec))
            outs[mb] = server._timed_compute(req)
        stale = weakref.ref(server.graphs["b"][1])
        back = pb.StageRequest(run_id="run", stage=1, microbatch_id="a", backward=True)
        back.grad_output.CopyFrom(to_wire(torch.randn(2, 16, 128), server.codec))
        reply = server._timed_compute(back)
        assert not reply.recomputed and server.optimizer_steps == 1
        assert not server.graphs and stale() is None   # freed without a collection: no cycle keeps it
    finally:
        server.close()
