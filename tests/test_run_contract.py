"""The run contract is typed on both sides: RunConfig (fedswarm.run_config) is what the coordinator stores and
sends at join and what clients read back; the client's own options are ClientOptions fields (opt())."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from fedswarm.client import daemon
from fedswarm.client.options import ClientSettings
from fedswarm.coordinator.strategies import STRATEGIES
from fedswarm.errors import BadInput
from fedswarm.proto import codec as C
from fedswarm.run_config import MEAN_BASED, STRATEGY_NAMES, RunConfig
from fedswarm.settings import settings_of

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedswarm"


def test_the_strategy_names_are_exactly_the_strategies_built():
    assert sorted(STRATEGIES) == sorted(STRATEGY_NAMES)
    assert MEAN_BASED <= set(STRATEGY_NAMES)
    strategy = next(s for s in settings_of(RunConfig) if s.name == "strategy")
    assert strategy.choices == STRATEGY_NAMES   # --strategy offers what the coordinator can build


def test_a_client_reads_an_older_coordinators_contract_with_the_runs_defaults():
    """A join reply that lacks a key gets RunConfig's default: downloads in int8 (the daemon once assumed none)."""
    raw = json.loads(RunConfig(rounds=3).to_json())
    del raw["download_codec"]
    cfg = RunConfig.from_json(json.dumps(raw))
    assert cfg.rounds == 3 and cfg.download_codec == RunConfig().download_codec == "int8"
    assert C.CodecSpec.of(cfg, "download").codec == C.codec_by_name("int8")


def test_a_newer_coordinators_unknown_setting_is_refused_by_name():
    raw = {**json.loads(RunConfig().to_json()), "warp_drive": 9}
    with pytest.raises(BadInput, match=r"does not know \(warp_drive\).*install the coordinator's fedswarm version"):
        RunConfig.from_json(json.dumps(raw))
    with pytest.raises(BadInput, match="JSON object"):
        RunConfig.from_json("[1, 2]")
    # a status viewer shows what it can of a newer coordinator's run
    assert RunConfig.from_status({"config": {**raw, "model": "m"}}).model == "m"


def test_clients_and_the_foundation_read_the_run_config_as_attributes():
    """No `cfg["key"]` / `cfg.get("key", default)` re-stating a default, and no argparse Namespace in the client."""
    dict_reads, namespace_reads = re.compile(r"\b(run_cfg|cfg)(\.get\(|\[)"), re.compile(r"\bargs\.\w|getattr\((self\.)?args\b")
    checks = [(p, dict_reads) for p in PACKAGE.glob("*.py")] + \
             [(p, c) for p in (PACKAGE / "client").rglob("*.py") for c in (dict_reads, namespace_reads)]
    bad = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}" for p, check in checks
           for n, line in enumerate(p.read_text().splitlines(), 1) if check.search(line)]
    assert not bad, "\n".join(bad)


def test_client_flags_come_from_the_options_dataclasses():
    parser = argparse.ArgumentParser()
    daemon.add_arguments(parser)
    settings = ClientSettings.from_args(parser.parse_args(
        ["--coordinator", "127.0.0.1:7000", "--gradient-checkpointing", "--metrics-port", "0", "--rpc-timeout", "5"]))
    options = settings.options
    assert options.gradient_checkpointing and not options.load_in_4bit and options.metrics_port == 0
    assert (options.role, options.inflight, options.precision, options.model) == ("client", 2, "auto", None)
    assert settings.timeouts.rpc_s == 5.0
    with pytest.raises(SystemExit):
        parser.parse_args([])   # --coordinator is required
    assert options.local_run(RunConfig(model="gpt2-tiny")).model == "gpt2-tiny"
    assert ClientSettings.from_args(parser.parse_args(["--coordinator", "h:1", "--model", "/m"])).options \
        .local_run(RunConfig()).model == "/m"
