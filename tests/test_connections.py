"""The per-address connection share (coordinator/connections.py): the kernel's TCP tables read right, each
address's newest connections beyond its share picked, and a connection shut down under its owner."""
from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from fedswarm.coordinator.connections import connections, over_share, shut_down, socket_fds
from fedswarm.coordinator.serving import ServingLimits, max_connections

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _row(local: str, remote: str, state: str, inode: int) -> str:
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1\n"


def test_tcp_tables_parse_to_peer_addresses_on_our_port(tmp_path):
    v4, v6 = tmp_path / "tcp", tmp_path / "tcp6"
    v4.write_text(HEADER + _row("0100007F:1F90", "00000000:0000", "0A", 10)       # the listener
                  + _row("0100007F:1F90", "0200007F:C350", "01", 11)              # 127.0.0.2 -> :8080
                  + _row("0100007F:1F91", "0300007F:C351", "01", 12)              # another port
                  + _row("0100007F:1F90", "0300007F:C352", "06", 0))              # TIME_WAIT: held by no one
    mapped = "0000000000000000FFFF00000A00000A"   # ::ffff:10.0.0.10
    v6.write_text(HEADER + _row("00000000000000000000000001000000:1F90", mapped + ":C350", "01", 13)
                  + _row("00000000000000000000000001000000:1F90", "B80D0120000000000000000001000000:C350", "01", 14)
                  + _row("00000000000000000000000001000000:1F90", "B80D0120000000000000000002000000:C351", "01", 15))
    got = sorted(connections({8080}, (v4, v6)), key=lambda c: c[1])
    assert got == [("127.0.0.2", 11), ("10.0.0.10", 13), ("2001:db8::/64", 14), ("2001:db8::/64", 15)]
    assert ipaddress.ip_network(got[2][0]).prefixlen == 64


def test_each_address_keeps_its_oldest_connections():
    conns = [("a", 5), ("b", 1), ("a", 9), ("a", 2), ("b", 3)]
    assert over_share(conns, 2) == [("a", 9)]
    assert sorted(over_share(conns, 1)) == [("a", 5), ("a", 9), ("b", 3)]
    assert over_share(conns, 3) == []
    # first seen in a later pass is newer, whatever its inode (the kernel numbers them in per-CPU batches)
    assert over_share(conns, 2, {5: 1, 9: 1, 2: 2}) == [("a", 2)]


@pytest.mark.integration   # a real TCP connection on loopback
def test_a_connection_is_ended_under_its_owner_and_reset_on_close():
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    owned, _ = listener.accept()
    try:
        inode = os.fstat(owned.fileno()).st_ino
        assert socket_fds({inode}) == {inode: owned.fileno()}
        assert not shut_down(owned.fileno(), inode + 1)   # not the socket it names: untouched
        assert shut_down(owned.fileno(), inode)
        owned.settimeout(2)
        assert owned.recv(1) == b""                        # the owner's reads end (gRPC then closes it) ...
        owned.close()
        peer.settimeout(2)
        with pytest.raises(ConnectionResetError):          # ... and its close resets: no TIME_WAIT left behind
            peer.recv(1)
    finally:
        for sock in (owned, peer, listener):
            sock.close()


def test_an_address_share_is_at_most_a_quarter_of_the_connections():
    limits = ServingLimits(max_connections_per_address=10 ** 9)
    try:
        assert limits.connection_share() == max(1, max_connections() // 4)
    finally:
        limits.shutdown()
