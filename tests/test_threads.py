"""Thread defaults that share a host: passive OpenMP waits, CPUs split among the fedswarm processes running."""
from __future__ import annotations

import pytest

import os
import subprocess
import sys

from fedswarm import threads


def _fake_proc(root, cmdlines: dict[int, list[str]]):
    for pid, argv in cmdlines.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir()      # not a pid: ignored
    (root / "999").mkdir()       # a pid whose cmdline vanished: ignored


def test_counts_clients_and_coordinators_not_other_commands(tmp_path):
    _fake_proc(tmp_path, {
        1: ["/usr/bin/python3", "-m", "fedswarm", "client", "--coordinator", "h:1"],
        2: ["/venv/bin/python", "/venv/bin/fedswarm", "coordinator", "--state-dir", "s"],
        3: ["/venv/bin/fedswarm", "client"],
        4: ["/venv/bin/fedswarm", "status", "--coordinator", "h:1"],        # no compute
        5: ["/usr/bin/python3", "-m", "fedswarm", "sim"],                    # its children are counted
        6: ["/usr/bin/p2pd", "-hostAddrs=/ip4/127.0.0.1/tcp/0"],
        7: ["vim", "fedswarm", "client"],                                    # not a fedswarm command
    })
    assert threads.fedswarm_processes(tmp_path) == 3
    assert threads.fedswarm_processes(tmp_path / "missing") == 1


def test_wait_policy_is_passive_unless_the_user_chose():
    env = {}
    threads.set_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.set_wait_policy(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_auto_share_and_explicit_count(monkeypatch):
    budget = threads.ThreadBudget()
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(threads, "fedswarm_processes", lambda: 3)
    assert budget.choose()[0] == 2
    monkeypatch.setattr(threads, "fedswarm_processes", lambda: 20)
    assert budget.choose()[0] == 1      # never 0
    budget.requested = 5
    assert budget.choose() == (5, "--threads")


@pytest.mark.integration
def test_configure_logs_the_choice_and_uses_one_interop_thread():
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from fedswarm.threads import BUDGET\n"
            "n = BUDGET.configure(0); BUDGET.refresh()\n"
            "print(n == torch.get_num_threads(), torch.get_num_interop_threads())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "1"]
    assert proc.stderr.count("torch threads:") == 1 and "fedswarm process(es) on this host" in proc.stderr


@pytest.mark.integration
def test_cli_entry_sets_the_passive_policy_before_loading_a_command():
    code = ("import os, sys; from fedswarm.app import cli\n"
            "try:\n    cli.main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["PASSIVE", "True"]   # set, and torch was loaded after it
