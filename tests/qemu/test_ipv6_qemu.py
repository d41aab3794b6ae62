"""IPv6 through a VM (`--accel qemu`): the default guest's own kernel configures eth0 by
SLAAC from the NAT's router advertisement and fetches from the host's ::1 over [fd00::2];
bulk TCP both ways goes in IPv6 TSO segments and GSO_TCPV6 frames.

Mirrors test_accel_qemu.py (its boot fixture and GuestShell); the servers listen on ::1
only.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import socket
import threading

import pytest

from tests.qemu.test_accel_qemu import boot, guest, hashing_sink  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SLAAC_WAIT = "for i in $(seq 100); do ip -6 addr show eth0 scope global | grep -q 'inet6 fd00::' && break; sleep 0.1; done"


def serve_http6(directory) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Server6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    server = Server6(("::1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_slaac_ping6_and_a_fetch_over_ipv6(boot, tmp_path):  # noqa: F811
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello6.txt").write_bytes(b"hello over IPv6\n" * 1000)
    server = serve_http6(www)
    try:
        vm, shell = boot()
        status, out = shell.run(f"{SLAAC_WAIT}; ip -6 addr show eth0; ip -6 route")
        assert status == 0 and "inet6 fd00::" in out and "default via fe80::2" in out, out
        status, out = shell.run("ping -6 -c 2 -W 5 fd00::2")
        assert status == 0 and "2 packets received" in out, out
        port = server.server_address[1]
        status, out = shell.run(f"wget -q -O - http://[fd00::2]:{port}/hello6.txt | wc -c")
        assert status == 0 and out.strip().endswith("16000"), out
        counters = vm.network_counters()[0]
        assert counters.get("ndp_ra_solicited", 0) >= 1 and counters.get("tcp6_flows_opened") == 1
    finally:
        server.shutdown()
        server.server_close()


BULK6_MIB = 4  # TCG is slow: enough for many 64 KiB TSO6 segments each way


def test_bulk_tcp_over_ipv6_both_ways_with_tso6(boot, tmp_path):  # noqa: F811
    """4 MiB host -> guest (HTTP from ::1) and guest -> host (nc to ::1), each over
    [fd00::2] with a matching SHA-256; the guest negotiated HOST_TSO6 and GUEST_TSO6 and
    used them: its TSO6 segments reached the NAT whole, and host data came to it in
    GSO_TCPV6 frames from the card's stream port."""
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(BULK6_MIB << 20)
    (www / "blob6").write_bytes(blob)
    server = serve_http6(www)
    sink, drainer, received, got = hashing_sink("::1")
    try:
        vm, shell = boot()
        status, out = shell.run(SLAAC_WAIT)
        assert status == 0, out
        status, out = shell.run(f"wget -q -O - http://[fd00::2]:{server.server_address[1]}/blob6"
                                " | sha256sum", timeout=300)
        assert status == 0 and hashlib.sha256(blob).hexdigest() in out, out
        status, out = shell.run(f"dd if=/dev/urandom of=/dev/shm/up6 bs=1M count={BULK6_MIB}"
                                " 2>/dev/null && sha256sum /dev/shm/up6")
        digests = re.findall(r"\b[0-9a-f]{64}\b", out)
        assert status == 0 and digests, out
        status, out = shell.run(f"nc fd00::2 {sink.getsockname()[1]} < /dev/shm/up6", timeout=300)
        drainer.join(60)
        assert got.get("bytes") == BULK6_MIB << 20, (got, out)
        assert received.hexdigest() == digests[-1]
        counters = vm.network_counters()[0]
        for feature in ("csum", "host_tso6", "guest_csum", "guest_tso6", "mrg_rxbuf"):
            assert counters.get(f"negotiated_{feature}") == 1, (feature, counters)
        assert counters.get("tcp6_flows_opened") == 2, counters
        # Used, both ways: IPv6 TSO segments from the guest, GSO_TCPV6 frames to it.
        assert counters.get("tx_tso6_frames", 0) > 0, counters
        assert counters.get("rx_gso6_frames", 0) > 0, counters
    finally:
        server.shutdown()
        server.server_close()
        sink.close()
