"""A re-assigned peer frees its old stage (module, optimizer, cached graphs, snapshot) and holds only the new one."""
import gc
import weakref

import torch

from fedswarm.client.swarm.stage_server import StageServer
from fedswarm.client.swarm.tensors import ids_to_bytes
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.stages import build_untied_model, stage_param_names, stage_state

CFG = {"model": "gpt2-tiny", "stages": 3, "seed": 0, "lr": 1e-3, "seq_len": 16, "batch_size": 2,
       "activation_codec": "bf16"}


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
