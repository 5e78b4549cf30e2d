"""The CLI: `fedswarm status` loads no torch/transformers/Flower, every option is described with its
default, and the status table shows a real coordinator's rounds and clients."""
from __future__ import annotations

import pytest

import argparse
import json
import subprocess
import sys

from fedswarm.app.cli import build_parser
from fedswarm.sim.processes import coordinator_process, fetch_status, run_fedswarm, wait_until

HEAVY = ("torch", "transformers", "flwr", "hivemind")
PROBE = ("import sys, runpy\n"
         "sys.argv = ['fedswarm'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('fedswarm', run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code\n"
         "print('LOADED', [m for m in {heavy!r} if m in sys.modules], 'EXIT', code, file=sys.stderr)\n")


def _loaded_heavy(*argv: str) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          timeout=120)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("LOADED"))
    return eval(line.split(" EXIT ")[0][len("LOADED "):]), proc.stdout  # noqa: S307 - our own printed list


def test_status_and_health_paths_import_no_torch():
    for argv in (["status", "--help"], ["status", "--coordinator", "127.0.0.1:1", "--timeout", "0.5"],
                 ["health", "--coordinator", "127.0.0.1:1", "--timeout", "0.5"]):
        loaded, _ = _loaded_heavy(*argv)
        assert loaded == [], f"`fedswarm {' '.join(argv)}` imported {loaded}"


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand (`bench codecs`, `bench load`, ...) by its full name."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    leaves = {}
    for name, sub in action.choices.items():
        nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
        leaves.update(_subcommands(sub, f"{prefix}{name} ") if nested else {f"{prefix}{name}": sub})
    return leaves


def test_every_option_of_every_subcommand_has_help_with_its_default():
    missing, no_default = [], []
    for name, sub in _subcommands(build_parser()).items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            if not action.help:
                missing.append(f"{name} {flag}")
            elif (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                  and "default" not in sub.formatter_class(name)._get_help_string(action).lower()):
                no_default.append(f"{name} {flag}")
        assert "(default:" in text or name in ("status", "health", "config"), name
    assert not missing, f"options without help text: {missing}"
    assert not no_default, f"options whose help does not show the default: {no_default}"


@pytest.mark.integration
def test_status_table_shows_rounds_and_clients_of_a_real_coordinator(tmp_path):
    args = ["--state-dir", str(tmp_path / "state"), "--rounds", "2", "--seq-len", "64", "--batch-size", "8"]
    with coordinator_process(tmp_path, args) as (coordinator, address):
        wait_until("round 0 evaluated", lambda: fetch_status(address)["rounds"], 120, watch=[coordinator])
        table = run_fedswarm("status", "--coordinator", address)
        as_json = run_fedswarm("status", "--coordinator", address, "--json")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"coordinator {address}") and "state waiting" in lines[0] and "round 0/2" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("round "))
    assert lines[header].split()[:3] == ["round", "eval", "loss"] and lines[header + 2].split()[0] == "0"
    assert float(lines[header + 2].split()[1]) > 0
    assert "clients (0)" in lines
    status = json.loads(as_json.stdout)
    assert status["rounds_total"] == 2 and status["rounds"][0]["round"] == 0
