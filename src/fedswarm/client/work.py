"""What a federated client does with a task, apart from the connection: train on it, and encode the
result as the PushUpdate stream; or evaluate the task's model on its held-out split, and sign the result.
Shared by the daemon (client/daemon.py) and the simulation's virtual clients (sim/virtual.py), so both
send exactly the same bytes for the same work."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from fedswarm.client.options import ClientOptions
from fedswarm.client.trainer import LocalTrainer, RoundResult
from fedswarm.dp import privatize
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto import wire
from fedswarm.run_config import RunConfig
from fedswarm.schedule import LrSchedule


def task_schedule(run_cfg: RunConfig, config: dict) -> tuple[int, LrSchedule]:
    """(the round's first global step, the run's lr schedule) from the task's config (the strategy's
    ConfigRecord, as JSON)."""
    total = int(config.get("total-steps", run_cfg.rounds * run_cfg.local_steps))
    return int(config.get("global-step", 0)), LrSchedule(
        float(config.get("lr", run_cfg.lr)), max(total, 1), run_cfg.lr_schedule, run_cfg.warmup_steps,
        run_cfg.min_lr)


def train_on_task(trainer: LocalTrainer, run_cfg: RunConfig, task: pb.Task,
                  base: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], RoundResult]:
    """Run the task's local steps from `base`, each at the run's scheduled lr for its global step;
    returns (delta = new weights - base, the round's result). With --dp-mode distributed the delta comes clipped
    and noised (fedswarm.dp.privatize)."""
    config = json.loads(task.config_json)
    mu = float(config.get("proximal-mu", 0.0))
    steps = int(config.get("local-steps", run_cfg.local_steps))
    first, schedule = task_schedule(run_cfg, config)
    result = trainer.train_round(base, steps, run_cfg.grad_accum, proximal_mu=mu,
                                 lr_at=lambda i: schedule.lr_at(first + i))
    return privatize({n: result.state[n] - base[n] for n in base}, run_cfg), result


def training_figures(result: RoundResult) -> dict[str, float]:
    """What an update reports of its training (UpdateHeader.metrics): the lr of its first and last step."""
    return {"lr-first": result.lrs[0], "lr-last": result.lrs[-1]} if result.lrs else {}


def encode_delta(feedback: C.ErrorFeedback, delta: dict[str, torch.Tensor]) -> list[bytes]:
    """Compress each tensor with error feedback (moves the residuals) and cut it into serialized
    UpdateChunk parts, in the delta's order."""
    encoded = {n: feedback.compress(n, d)[0] for n, d in delta.items()}
    return [pb.UpdateChunk(part=p).SerializeToString()
            for n, d in delta.items() for p in wire.tensor_parts(n, tuple(d.shape), encoded[n])]


def update_stream(raw_parts: list[bytes], *, client_id: int, token: str, run_id: str, task: pb.Task,
                  num_tensors: int, num_examples: int, train_loss: float, seconds: float,
                  base_digest: bytes = b"", identity=None, metrics: dict[str, float] | None = None) -> list[bytes]:
    """The whole PushUpdate stream: a header (signed with `identity`, a client.identity.Identity, if
    given; `metrics`: figures of the training the round record shows, e.g. `training_figures`) and then the
    parts as they are (the coordinator hashes exactly those bytes)."""
    header = pb.UpdateHeader(client_id=client_id, session_token=token, task_id=task.task_id, round=task.round,
                             num_examples=num_examples, train_loss=train_loss, num_tensors=num_tensors,
                             num_parts=len(raw_parts), train_seconds=seconds, base_digest=base_digest,
                             metrics=metrics or {})
    if identity is not None:
        header.signature = identity.sign_update(run_id, task.round, client_id, task.task_id,
                                                num_examples, train_loss, len(raw_parts), raw_parts)
    return [pb.UpdateChunk(header=header).SerializeToString()] + raw_parts


# -- evaluation --------------------------------------------------------------------------

@dataclass
class EvalOutcome:
    loss: float      # mean loss over the scored tokens
    tokens: int      # tokens scored (the weight of this loss in the round's average)
    seconds: float


def held_out_windows(options: ClientOptions, run_cfg: RunConfig) -> torch.Tensor:
    """Eval windows of the held-out split of this client's --data, read and tokenized as its training data is
    (the run's format unless its own flags say otherwise; its copy of the model's tokenizer): at most the run's
    --eval-windows windows of --seq-len tokens, as the coordinator's central evaluation takes them."""
    from fedswarm import tokenized
    from fedswarm.tokenizer import load_tokenizer

    tokens = tokenized.eval_tokens(options.data_spec(run_cfg), load_tokenizer(options.local_run(run_cfg).model),
                                   options.cache_dir)
    return tokenized.windows(tokens, run_cfg.seq_len, run_cfg.eval_windows)


def scored_tokens(windows: torch.Tensor) -> int:
    """Tokens a loss over eval windows averages: [N, T+1] scores N x T; [N, 2, T+1] its labels that are not -100."""
    if windows.dim() == 3:
        return int((windows[:, 1, 1:] != -100).sum())
    return int(windows.size(0) * (windows.size(1) - 1))


def evaluate_on_task(model: torch.nn.Module, windows: torch.Tensor, base: dict[str, torch.Tensor]) -> EvalOutcome:
    """Load the task's weights into `model` and score the windows (float32, as the coordinator does)."""
    from fedswarm.models import evaluate, load_trainable_state

    started = time.perf_counter()
    load_trainable_state(model, base)
    loss = evaluate(model, windows)
    return EvalOutcome(loss, scored_tokens(windows), time.perf_counter() - started)


def eval_result(outcome: EvalOutcome, *, client_id: int, token: str, run_id: str, task: pb.Task,
                base_digest: bytes = b"", identity=None, error: str = "") -> pb.EvalResult:
    """The PushEval request (`error`: why this client cannot evaluate), signed with `identity` (a
    client.identity.Identity) if given, as updates are."""
    from fedswarm.proto import signing

    req = pb.EvalResult(client_id=client_id, session_token=token, task_id=task.task_id, round=task.round,
                        loss=outcome.loss, tokens=outcome.tokens, eval_seconds=outcome.seconds,
                        base_digest=base_digest, error=error)
    if identity is not None:
        req.signature = identity.key.sign(signing.update_message(
            run_id, task.round, client_id, task.task_id, signing.eval_digest(outcome.loss, outcome.tokens)))
    return req
