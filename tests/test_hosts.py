"""Network-namespace hosts (sim/hosts.py): own addresses, a bridge, tbf caps, cut links, and full cleanup."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedswarm.sim.hosts import HostNetwork, probe
from fedswarm.sim.processes import Proc, wait_until

REASON = probe()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces here: {REASON}")

SINK = """
import socket
s = socket.socket()
s.bind(("0.0.0.0", 9000))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    n = 0
    while (d := c.recv(1 << 16)):
        n += len(d)
    c.sendall(str(n).encode())
    c.close()
"""

SEND = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 9000), timeout=5)
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
    s.sendall(b"x" * (1 << 20))
s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode(), time.perf_counter() - t, flush=True)
"""


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _send(net: HostNetwork, src: int, dst: int, mib: int) -> tuple[int, float]:
    """MiB from host `src` to host `dst`'s sink: (bytes the sink counted, seconds)."""
    out = subprocess.run(net.hosts[src].cmd([sys.executable, "-c", SEND, net.hosts[dst].ip, str(mib)]),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    received, seconds = out.stdout.split()
    return int(received), float(seconds)


@pytest.mark.integration
def test_hosts_have_their_own_addresses_links_caps_and_are_removed(tmp_path):
    with HostNetwork(3, bandwidth="50mbit") as net:
        names = {h.netns for h in net.hosts} | {net.bridge_ns}
        assert names <= _netns_names()
        ips = [h.ip for h in net.hosts]
        assert len(set(ips)) == 3 and len({ip.rsplit(".", 1)[0] for ip in ips}) == 1
        assert all(h.netns.startswith(f"fsw-{os.getpid()}-") for h in net.hosts)
        lo = subprocess.run(net.hosts[0].cmd(["ip", "-br", "link", "show", "lo"]), capture_output=True, text=True)
        assert "UNKNOWN" in lo.stdout or "UP" in lo.stdout, lo.stdout   # loopback is up inside a host

        sink = net.start(1, "sink", [sys.executable, "-c", SINK], tmp_path / "sink.log")
        sink.wait_for_line(re.compile("listening"), 30)
        received, seconds = _send(net, 0, 1, 8)
        assert received == 8 << 20
        mbit = received * 8 / seconds / 1e6
        assert mbit < 60, f"{mbit:.0f} Mbit/s through a 50mbit tbf cap"   # uncapped is thousands
        rx, tx = net.link_bytes(1)
        assert rx >= 8 << 20                                                # it crossed host 1's eth0

        relayed = net.forward(1, 9000)                                       # the test process reaches a host
        host, port = relayed.rsplit(":", 1)
        import socket
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b"5"

        net.set_link(1, up=False)                                            # a pulled cable
        out = subprocess.run(net.hosts[0].cmd([sys.executable, "-c", SEND, net.hosts[1].ip, "1"]),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        sink_pid = sink.pid
    assert not names & _netns_names()
    assert sink.popen.poll() is not None
    assert not Path(f"/proc/{sink_pid}").exists() or sink.popen.returncode is not None


HOLD = """
import sys, time
from pathlib import Path
from fedswarm.sim.hosts import HostNetwork
with HostNetwork(2, tag=sys.argv[1]) as net:
    net.start(0, "sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], Path(sys.argv[2]))
    print("ready", flush=True)
    time.sleep(600)
"""


def test_sigterm_removes_the_namespaces_and_their_processes(tmp_path):
    tag = f"fsw-{os.getpid()}-t"
    holder = Proc("holder", [sys.executable, "-c", HOLD, tag, str(tmp_path / "sleeper.log")], tmp_path / "holder.log")
    try:
        holder.wait_for_line(re.compile("ready"), 60)
        ours = {f"{tag}-0", f"{tag}-1", f"{tag}-br"}
        assert ours <= _netns_names()
        inside = subprocess.run(["ip", "netns", "pids", f"{tag}-0"], capture_output=True, text=True).stdout.split()
        assert inside
        os.kill(holder.pid, signal.SIGTERM)
        holder.popen.wait(30)
        assert not ours & _netns_names(), _netns_names()
        wait_until("the sleeper's death", lambda: not any(Path(f"/proc/{p}").exists() for p in inside), 10)
    finally:
        holder.stop()
