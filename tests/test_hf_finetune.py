"""Federated LoRA fine-tuning of Hugging Face folders built on the spot, with real coordinator and client processes.

Two sites, each with its own JSON Lines file; only adapters travel; the export loads with from_pretrained
and scores what the coordinator scored.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_fixtures import records, site_data, tiny_model

from fedswarm import tokenized
from fedswarm.app.cli import main
from fedswarm.app.export import load_exported
from fedswarm.formats import DataSpec
from fedswarm.models import evaluate, num_parameters
from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status, wait_until
from fedswarm.tokenizer import load_tokenizer

TRAIN = ["--seq-len", "32", "--batch-size", "8", "--local-steps", "12", "--min-clients", "2"]


def run_sites(tmp: Path, model: Path, eval_data: Path, sites: list[Path], extra: list[str], rounds: int = 3) -> dict:
    """Coordinator + one client per site file (each its whole file: partition 0/1); returns the final status."""
    state = tmp / "state"
    args = ["--state-dir", str(state), "--model", str(model), "--eval-data", str(eval_data), "--rounds", str(rounds),
            *TRAIN, *extra]
    with coordinator_process(tmp, args) as (coordinator, address):
        clients = [Proc(f"site-{i}", fedswarm_cmd("client", "--coordinator", address, "--data", str(site),
                                                   "--name", f"site-{i}", "--threads", "1", "--device", "cpu"),
                        tmp / f"site-{i}.log") for i, site in enumerate(sites)]
        try:
            status = wait_until("the run's end", lambda: (s := fetch_status(address))["state"] == "done" and s,
                                240, watch=[coordinator, *clients])
        finally:
            for c in clients:
                c.stop()
    return status


def coordinator_windows(model: Path, eval_data: Path, fmt: str = "text") -> torch.Tensor:
    """The eval windows the coordinator scores (same data, tokenizer, seq len and count)."""
    spec = DataSpec(str(eval_data), fmt)
    return tokenized.windows(tokenized.eval_tokens(spec, load_tokenizer(str(model))), 32, 64)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`fedswarm ARGS` in this process (the CLI's own code path, without another interpreter start)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_lora_two_sites_gpt2_int8_export(tmp_path, capsys):
    site_a, site_b, both = site_data(tmp_path / "data")
    model = tiny_model(tmp_path / "gpt2", "gpt2", records("add", 200, 7) + records("color", 200, 8))
    status = run_sites(tmp_path, model, both, [site_a, site_b], ["--peft", "lora", "--lora-r", "8", "--lr", "0.02",
                                                                "--upload-codec", "int8"])
    rounds = status["rounds"]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 0.3, rounds

    # only the adapters travel: <= 5 % of the model's fp32 bytes, times int8's ratio at the socket
    full_bytes = 4 * num_parameters(load_exported(str(model)))
    for r in rounds[1:]:
        assert len(r["clients"]) == 2
        adapter_bytes = r["bytes_up_raw"] / 2
        assert adapter_bytes <= 0.05 * full_bytes, (adapter_bytes, full_bytes)
        assert 0.24 < r["bytes_up"] / r["bytes_up_raw"] < 0.40, r

    # the PEFT adapter folder and the merged folder both score what the coordinator scored last
    windows = coordinator_windows(model, both)
    code, out, err = cli(capsys, "export", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "adapters"))
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["kind"] == "adapters"
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    assert evaluate(load_exported(str(tmp_path / "adapters")), windows) == pytest.approx(rounds[-1]["eval_loss"], abs=1e-4)

    code, out, err = cli(capsys, "export", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "merged"),
                         "--merge")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert evaluate(merged, windows) == pytest.approx(rounds[-1]["eval_loss"], abs=1e-3)

    code, out, err = cli(capsys, "generate", "--model", str(tmp_path / "merged"), "--prompt", "What is 3 plus 4?",
                         "--max-new-tokens", "8")
    assert code == 0, err
    assert out.strip(), "generate printed nothing"


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_lora_chat_llama_codec_none(tmp_path, capsys):
    """Chat records through the tokenizer's template, loss on responses only; fp32 adapters on the wire."""
    site_a, site_b, both = site_data(tmp_path / "data")
    model = tiny_model(tmp_path / "llama", "llama", records("add", 200, 7) + records("color", 200, 8))
    status = run_sites(tmp_path, model, both, [site_a, site_b],
                       ["--peft", "lora", "--lora-r", "8", "--lora-targets", "all-linear", "--lr", "0.03",
                        "--upload-codec", "none", "--format", "chat"], rounds=3)
    rounds = status["rounds"]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 0.3, rounds
    for r in rounds[1:]:
        assert 1.0 <= r["bytes_up"] / r["bytes_up_raw"] < 1.05, r
    code, _, err = cli(capsys, "export", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "adapters"))
    assert code == 0, err
    windows = coordinator_windows(model, both, "chat")
    assert windows.dim() == 3 and bool((windows[:, 1] == -100).any()), "prompt tokens carry no loss"
    assert evaluate(load_exported(str(tmp_path / "adapters")), windows) == pytest.approx(rounds[-1]["eval_loss"], abs=1e-4)
