"""Processes forked from the pre-imported fork server (sim/forkstart.py), as the suite and the swarm sim start
them: each is the caller's (its working directory, open-file limit, network namespace host), is
named so that thread budgets count it, and can keep its stderr apart."""
from __future__ import annotations

import os
import re
import resource

import pytest

from fedswarm.sim.forkstart import ForkedPopen
from fedswarm.sim.hosts import HostNetwork, probe
from fedswarm.sim.processes import Proc, fedswarm_cmd, run_fedswarm
from fedswarm.threads import fedswarm_processes

RETRYING = re.compile(r"failed \(UNAVAILABLE.*retrying in")


@pytest.mark.integration
def test_a_forked_client_is_the_callers_and_counts_as_a_fedswarm_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 700), hard))
    try:   # nothing listens on port 1: each client retries its join until stopped
        procs = [Proc(f"forked-{i}", fedswarm_cmd("client", "--coordinator", "127.0.0.1:1", "--name", f"forked-{i}"),
                      tmp_path / f"forked-{i}.log", fork=True) for i in range(2)]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        for proc in procs:
            proc.wait_for_line(RETRYING, 60)
            pid = proc.pid
            assert open(f"/proc/{pid}/comm").read().strip() == "fsw-client"
            assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path)
            limit = next(line for line in open(f"/proc/{pid}/limits") if line.startswith("Max open files"))
            assert limit.split()[3] == str(min(soft, 700)), limit
            assert os.getpgid(pid) == pid                    # a session of its own: stop() signals its group
        assert fedswarm_processes() >= 2   # both counted (uncounted, this would be 1): thread budgets share the cores
    finally:
        for proc in procs:
            assert proc.stop() is not None
    assert all(proc.popen.poll() is not None for proc in procs)


@pytest.mark.integration
def test_a_forked_command_keeps_its_stderr_apart_and_its_exit_code(tmp_path):
    done = run_fedswarm("client", "--partition", "3/2", "--coordinator", "127.0.0.1:1", fork=True)
    assert done.returncode == 2
    assert "partition 3/2" in done.stderr and "partition 3/2" not in done.stdout


@pytest.mark.integration
@pytest.mark.skipif(probe() is not None, reason=f"no network namespaces here: {probe()}")
def test_a_forked_process_runs_inside_its_host(tmp_path):
    with HostNetwork(1) as net:
        proc = net.start(0, "forked", fedswarm_cmd("client", "--coordinator", f"{net.hosts[0].ip}:1"),
                         tmp_path / "forked.log")
        assert isinstance(proc.popen, ForkedPopen)   # the suite's default: forked, not `ip netns exec`
        proc.wait_for_line(RETRYING, 60)
        host_ns = os.stat(f"/var/run/netns/{net.hosts[0].netns}").st_ino
        assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == host_ns != os.stat("/proc/self/ns/net").st_ino
