"""IPv6 through a VM (`--accel qemu`): the default guest's own kernel configures eth0 by
SLAAC from the NAT's router advertisement and fetches from the host's ::1 over [fd00::2].

Mirrors test_accel_qemu.py (its boot fixture and GuestShell); the servers listen on ::1
only.
"""

from __future__ import annotations

import functools
import http.server
import socket
import threading

import pytest

from tests.qemu.test_accel_qemu import boot, guest  # noqa: F401  (fixtures)

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
