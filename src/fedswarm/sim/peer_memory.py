"""Peer memory, stage-only vs the whole model (benchmark only): each build runs in a fresh process that
imports what a peer imports, serves one stage with the peer's own StageServer, runs one forward and
backward step through it, and reports its resident memory.

`full` is the construction peers used before they built only their stage: the whole untied model is
built, then the stage is cut out of it. It exists here only as the benchmark's yardstick.

    python -m fedswarm.sim.peer_memory --model gpt2-small8 --stages 4 --stage 1 --build full --state S.safetensors
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fedswarm.memory import proc_memory_mb  # noqa: F401 - the sims and benches read it from here
from fedswarm.run_config import RunConfig

BUILDS = ("stage", "full")
MEASURE_TIMEOUT_S = 900.0   # one peer process at 135M, on a loaded 2-core machine


def _full_model_build(preset, index, num_stages, seed=0, *, state, device="cpu"):
    """The old construction: cut from the whole model (build_stage without a state), then load the state."""
    from fedswarm.stages import build_stage, load_stage_state

    stage = build_stage(preset, index, num_stages, seed).to(device)
    load_stage_state(stage, state)
    return stage


def _saved_bytes(params) -> tuple[object, dict]:
    """A saved-tensors hook pair that adds up the bytes autograd keeps for the backward (each storage once,
    the parameters themselves not counted): one micro-batch's activations."""
    import torch

    own = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: "torch.Tensor"):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def stage_state_bytes(module, activation_bytes: int) -> dict[str, int]:
    """What a serving peer holds for its stage, in bytes: fp32 weights; per trainable weight its gradient,
    AdamW's two moments and the snapshot of the last sync; one micro-batch's activations. `sync_state_bytes`
    adds the upload's error-feedback residual (one more per trainable weight, from the first sync on)."""
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    state = 4 * params + (4 + 8 + 4) * trainable + activation_bytes
    return {"params": params, "trainable": trainable, "activation_bytes": activation_bytes, "state_bytes": state,
            "sync_state_bytes": state + 4 * trainable}


def _measure(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file

    import fedswarm.client.swarm.roles  # noqa: F401 - a peer's imports (hivemind, grpc, transformers)
    import fedswarm.client.swarm.stage_server as stage_server
    from fedswarm.client.swarm.tensors import ids_to_bytes, to_wire
    from fedswarm.proto import codec as C
    from fedswarm.proto import fedswarm_pb2 as pb

    torch.set_num_threads(1)
    before = proc_memory_mb()
    if args.build == "full":
        stage_server.build_stage = _full_model_build
    cfg = RunConfig(model=args.model, mode="swarm", stages=args.stages, seed=args.seed, lr=1e-3, seq_len=args.seq_len,
                    batch_size=args.batch_size, activation_codec="bf16")
    server = stage_server.StageServer("bench", cfg, torch.device("cpu"), args.precision)
    server.serve(args.stage, load_file(args.state))      # what a peer fetches from the coordinator
    m = server.module
    B, T = args.batch_size, args.seq_len
    ids = ids_to_bytes(torch.randint(0, m.config.vocab_size, (B, T)))
    req = pb.StageRequest(run_id="bench", stage=args.stage, microbatch_id="m")
    if m.is_first:
        req.ids, req.ids_shape[:] = ids, [B, T]
    else:
        req.hidden.CopyFrom(to_wire(torch.randn(B, T, m.config.hidden_size), C.CODEC_NAMES["bf16"]))
    if m.is_last:
        req.labels = ids
    hooks, saved = _saved_bytes(m.parameters())
    with hooks:
        server._timed_compute(req)                        # forward (and, on the last stage, backward + step)
    if not m.is_last:
        req.backward = True
        req.grad_output.CopyFrom(to_wire(torch.randn(B, T, m.config.hidden_size), C.CODEC_NAMES["bf16"]))
        server._timed_compute(req)                        # backward + AdamW step: optimizer state exists now
    assert server.optimizer_steps == 1
    server.close()
    return {"build": args.build, "stage": args.stage, "imports_mb": before["rss_mb"],
            **stage_state_bytes(m, sum(saved.values())), **proc_memory_mb()}


def measure_peer_memory(model: str, stages: int, seed: int, batch_size: int, seq_len: int,
                        which: list[int] | None = None, builds: tuple[str, ...] = BUILDS,
                        precision: str = "fp32") -> list[dict]:
    """For each stage in `which` (default: all), the memory of a peer built each of `builds` ways."""
    from safetensors.torch import save_file

    from fedswarm.stages import Stage, build_untied_model, stage_state

    full = build_untied_model(model, seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedswarm-peer-memory-") as tmp:
        for index in (which if which is not None else range(stages)):
            path = Path(tmp) / f"stage{index}.safetensors"
            save_file(dict(stage_state(Stage(full, index, stages))), str(path))
            for build in builds:
                argv = [sys.executable, "-m", "fedswarm.sim.peer_memory", "--model", model, "--stages", str(stages),
                        "--stage", str(index), "--build", build, "--state", str(path), "--seed", str(seed),
                        "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--precision", precision]
                done = subprocess.run(argv, capture_output=True, text=True, timeout=MEASURE_TIMEOUT_S)
                if done.returncode != 0:
                    raise RuntimeError(f"measuring {build} build of stage {index} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--build", choices=BUILDS, required=True)
    p.add_argument("--state", required=True, help="the stage's tensors (safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="the stage's autocast")
    print(json.dumps(_measure(p.parse_args())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
