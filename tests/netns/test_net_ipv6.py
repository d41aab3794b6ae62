"""IPv6 through `voidbox net run`: Linux's own IPv6 stack in the namespace, servers on the
host's ::1 (and DNS upstreams on 127.0.0.1 or ::1); nothing leaves this machine.

Mirrors the IPv4 tests of test_net_run.py and test_net_tcp.py with the namespace's address
fd00::100, the gateway fd00::2 (the host's ::1) and the DNS relay fd00::3. The NAT runs
sandboxed, as by default; run() checks that flows, watches and fds return to zero.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

from tests.netns.dnsserver import DnsServer
from tests.netns.test_net_run import (  # noqa: F401  (workdir: a fixture)
    WAIT,
    UdpEcho,
    _drop_to_nobody_and_run,
    run,
    script,
    workdir,
)
from tests.netns.test_net_tcp import (  # noqa: F401  (fixtures)
    GIB,
    MIB,
    SHORT_CONNECTIONS,
    assert_clean,
    run_client,
    server,
    tcp_counters,
    tool,
)
from voidbox.net.config import NatConfig
from voidbox.net.policy import Policy, parse_forward
from voidbox.net.run import config_from_options

pytestmark = pytest.mark.netns

PY = sys.executable
GATEWAY6 = "fd00::2"
BARRIER6 = f"busybox ping -6 -c1 -W{WAIT} {GATEWAY6} >/dev/null"
SLAAC_ADDRESS = "fd00::5054:ff:fe12:3456"  # EUI-64 of the guest MAC 52:54:00:12:34:56
PCAP_GLOBAL_HEADER = 24
PCAP_RECORD_HEADER = 16
ETH_P_IPV6 = 0x86DD


def test_static_address_route_resolv_conf_and_slaac(tmp_path):
    """fd00::100/64 and a default route via fd00::2 at once; the NAT's advertisement (the
    unsolicited one at link-up, or the answer to the kernel's own solicitation) makes the
    kernel add the EUI-64 address by SLAAC and fe80::2 as a default router."""
    out = tmp_path / "out"
    wait_slaac = (f"for i in $(seq 100); do ip -6 addr show tap0 | grep -q {SLAAC_ADDRESS} "
                  f"&& break; sleep 0.1; done")
    rc, counters = run(["sh", "-c", f"{wait_slaac}; ip -6 addr show tap0 > {out}; "
                        f"ip -6 route >> {out}; cat /etc/resolv.conf >> {out}"])
    assert rc == 0
    text = out.read_text()
    assert "inet6 fd00::100/64" in text
    assert "default via fd00::2" in text
    assert "nameserver 10.0.2.3\nnameserver fd00::3" in text
    assert f"inet6 {SLAAC_ADDRESS}/64" in text  # from the RA's prefix (RFC 4862)
    assert "default via fe80::2" in text  # the RA's router lifetime made it a default router
    assert counters["ndp_ra_sent"] >= 1


def test_no_ipv6_leaves_the_namespace_without_it(tmp_path):
    out = tmp_path / "out"
    config, _ = config_from_options(ipv6=False)
    rc, counters = run(["sh", "-c", f"ip -6 addr show tap0 scope global > {out}; "
                        f"cat /etc/resolv.conf >> {out}; "
                        f"! busybox ping -6 -c1 -W1 {GATEWAY6} 2>/dev/null"], config)
    assert rc == 0
    text = out.read_text()
    assert "fd00::" not in text and "nameserver fd00::3" not in text
    assert "ip6_in" not in counters


def test_ping6_gateway_and_dns_address():
    rc, counters = run(["sh", "-c", f"busybox ping -6 -c 2 -W {WAIT} {GATEWAY6} && "
                        f"busybox ping -6 -c 1 -W {WAIT} fd00::3"])
    assert rc == 0
    assert counters["icmp6_echo_local"] == 3


def _host_address6() -> str | None:
    """A global IPv6 address of this host: echo to it stays on this machine."""
    from voidbox.net.policy import host_addresses

    return next((a for a in host_addresses() if ":" in a), None)


def _config_beside(addr: str) -> NatConfig:
    """The default IPv6 layout, or fd01::/64 if the host's address is in fd00::/64 (as on
    this machine's eth0): the guest's own link would hide it otherwise."""
    if addr.startswith("fd00:") and addr.count(":") > 1 and addr.split(":")[1] in ("", "0"):
        return NatConfig(prefix6="fd01::", guest_ip6="fd01::100", gateway_ip6="fd01::2",
                         dns_ip6="fd01::3")
    return NatConfig()


def test_ping6_a_host_address_through_an_icmpv6_socket():
    """Echo to the host's own IPv6 address relayed through the NAT's ICMPv6 socket (raw
    here, as root; ping sockets where ping_group_range allows), allowed as the host's
    addresses are with --host-loopback; denied by default."""
    addr = _host_address6()
    if addr is None:
        pytest.skip("the host has no global IPv6 address to ping")
    config = _config_beside(addr)
    rc, counters = run(["busybox", "ping", "-6", "-c", "1", "-W", str(WAIT), addr], config)
    assert rc == 0
    assert counters["icmp6_echo_rx"] == 1
    rc, counters = run(["busybox", "ping", "-6", "-c", "1", "-W", "2", addr], config,
                       policy=Policy())
    assert rc != 0 and counters["icmp_denied"] == 1


def test_udp_to_the_hosts_ipv6_loopback(tmp_path):
    echo = UdpEcho("::1")
    out = tmp_path / "out"
    client = script(tmp_path, "client.py", f"""\
        import socket
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.settimeout({WAIT})
        s.connect(("{GATEWAY6}", {echo.port}))
        s.send(b"x" * 3000)  # fragmented by the namespace's stack, reassembled by the NAT
        open({str(out)!r}, "w").write(str(len(s.recv(65535))))
        """)
    try:
        rc, counters = run([PY, client])
    finally:
        echo.close()
    assert rc == 0 and out.read_text() == "3000"
    assert counters["udp6_flows_opened"] == 1 and counters["ip6_reassembled"] >= 1


@pytest.fixture
def http_server6(tmp_path):
    """A python http.server on the host's ::1 serving tmp_path/www, in a thread."""
    import functools
    import http.server

    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Server6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    httpd = Server6(("::1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_curl_over_ipv6_through_the_gateway(tmp_path, http_server6):
    www, port = http_server6
    payload = os.urandom(2 * 1024 * 1024)
    (www / "blob").write_bytes(payload)
    got = tmp_path / "got"
    rc, counters = run(["curl", "-sf", "--max-time", "60", "-o", str(got),
                        f"http://[{GATEWAY6}]:{port}/blob"])
    assert rc == 0
    assert got.read_bytes() == payload
    assert counters["tcp6_in"] > 0


def test_the_hosts_ipv6_loopback_is_closed_by_default_and_by_a_rule(http_server6):
    _www, port = http_server6
    url = f"http://[{GATEWAY6}]:{port}/"
    rc, counters = run(["curl", "-sf", "--max-time", "20", url], policy=Policy())
    assert rc == 7  # failed to connect: the NAT answered the SYN with RST
    assert counters["tcp_denied"] == 1
    rc, _ = run(["curl", "-sf", "--max-time", "20", url],
                policy=Policy(deny=[f"[::1]:{port}"], host_loopback=True))
    assert rc == 7
    rc, _ = run(["curl", "-sf", "--max-time", "20", url],
                policy=Policy(deny=[GATEWAY6], host_loopback=True))
    assert rc == 7


def test_other_addresses_of_the_guests_link_do_not_answer_neighbour_discovery():
    """fd00::99 is on the namespace's link: its kernel asks who has it, the NAT claims
    nothing it does not own, and the connection fails as on a real link (EHOSTUNREACH)."""
    rc, counters = run(["curl", "-sf", "--max-time", "20", "http://[fd00::99]:80/"])
    assert rc == 7 and counters["ndp_ns_not_ours"] >= 1
    assert counters.get("tcp6_in", 0) == 0


@pytest.mark.parametrize("bind", ["127.0.0.1", "::1"])
def test_aaaa_lookup_through_fd00_3(bind):
    dns = DnsServer({"six.test": "2001:db8::77", "four.test": "192.0.2.77"}, bind=bind)
    try:
        cmd = ("test \"$(dig +short +tries=1 +time=5 AAAA six.test @fd00::3)\" = 2001:db8::77 && "
               "test \"$(dig +short +tries=1 +time=5 A four.test @fd00::3)\" = 192.0.2.77 && "
               "busybox nslookup -type=AAAA six.test fd00::3 | grep -q 2001:db8::77")
        rc, counters = run(["sh", "-c", cmd], NatConfig(dns_upstreams=[dns.addr]))
    finally:
        dns.close()
    assert rc == 0
    assert counters["dns_replies"] >= 3 and dns.queries >= 3


def test_tcp_forward_on_the_hosts_ipv6_loopback(tmp_path):
    """--forward tcp:[::1]:PORT:8000: a host client on [::1] reaches the namespace's server
    (over IPv4 on the guest side, from the gateway)."""
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        host_port = probe.getsockname()[1]
    listener = script(tmp_path, "server.py", """\
        import socket
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 8000))
        s.listen()
        c, peer = s.accept()
        data = b""
        while not data.endswith(b"\\n"):
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
        c.sendall(data.upper() + (" from %s" % peer[0]).encode())
        c.close()
        """)
    config = NatConfig(forwards=[parse_forward(f"tcp:[::1]:{host_port}:8000")])
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(rc=run([PY, listener], config, check_fds=False)[0]))
    thread.start()
    reply = b""
    try:
        for _ in range(120):  # until the namespace's server listens, the NAT resets: retry
            if not thread.is_alive():
                break
            try:
                with socket.create_connection(("::1", host_port), timeout=WAIT) as c:
                    c.sendall(b"v" * 100000 + b"\n")
                    while chunk := c.recv(65536):
                        reply += chunk
                if reply:
                    break
            except OSError:
                pass
            reply = b""
            thread.join(0.25)
    finally:
        thread.join(30)
    assert reply == b"V" * 100000 + b"\n from 10.0.2.2"
    assert result["rc"] == 0


def test_unprivileged_run_over_ipv6(tmp_path, workdir):  # noqa: F811
    """As uid nobody (a user namespace): the namespace still gets its IPv6 address and
    route, echo to fd00::2 is answered, UDP reaches the host's ::1, and echo to the host's
    own address fails at once (no raw socket and no ping socket for nobody here)."""
    system_py = "/usr/bin/python3"
    if not os.access(system_py, os.X_OK):
        pytest.skip("needs /usr/bin/python3 for the unprivileged UDP client")
    # Imported here, as root: uid nobody cannot read this venv's interpreter's library.
    import pyroute2  # noqa: F401
    echo = UdpEcho("::1")
    out = workdir / "out"
    client = script(workdir, "client.py", f"""\
        import os, socket
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.settimeout({WAIT})
        s.connect(("{GATEWAY6}", {echo.port}))
        s.send(b"hello6")
        open({str(out)!r}, "w").write("%s uid=%d" % (s.recv(100).decode(), os.getuid()))
        """)
    addr = _host_address6()
    config = _config_beside(addr) if addr else NatConfig()
    gw = config.gateway_ip6
    cmd = f"busybox ping -6 -c1 -W5 {gw} && {system_py} {client}"
    if addr:
        cmd += f" && ! busybox ping -6 -c1 -W5 {addr}"
    try:
        if gw != GATEWAY6:
            client_text = (workdir / "client.py").read_text().replace(GATEWAY6, gw)
            (workdir / "client.py").write_text(client_text)
        assert _drop_to_nobody_and_run(tmp_path, workdir, cmd, config) == 0
    finally:
        echo.close()
    assert out.read_text() == "hello6 uid=0"  # root inside its own user namespace
    assert echo.received == 1
    counters = json.loads((workdir / "counters.json").read_text())
    assert counters["icmp6_echo_local"] == 1 and counters["udp6_flows_opened"] == 1
    if addr:
        assert counters["icmp6_unreachable_sent"] == 1


# ---------------------------------------------------------------------- TCP, real stacks

BULK6 = [
    pytest.param(64 * MIB, id="64MiB"),
    pytest.param(GIB, id="1GiB", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("size", BULK6)
def test_bulk_each_way_over_ipv6(tmp_path, tool, server, size):  # noqa: F811
    """Host -> namespace then namespace -> host, SHA-256 checked at both ends; with
    offload the stream sender wrote IPv6 super-frames (TCPV6) and the namespace handed
    over TSO6 segments larger than its MTU."""
    config, _ = config_from_options()
    results = {}
    for direction, role in (("down", "get"), ("up", "put")):
        srv = server(1, bind="::1")
        out = tmp_path / f"{direction}.json"
        rc, counters = run_client(tool, [role, GATEWAY6, srv.port, size, out], config)
        assert rc == 0
        [peer] = srv.results()
        got = json.loads(out.read_text())
        if role == "get":
            assert got["bytes"] == size and got["sha"] == peer["sha"]
            assert counters["tap_stream_frames"] > 0
        else:
            assert peer["bytes"] == size and peer["sha"] == got["sha"]
            assert counters["tap_rx_oversize"] > 0
        assert_clean(counters, 1)
        assert counters["tcp6_flows_opened"] == 1
        results[direction] = got["seconds"]
    print(f"\nIPv6 {size // MIB} MiB: host->namespace "
          f"{size * 8 / results['down'] / 1e9:.2f} Gbit/s, namespace->host "
          f"{size * 8 / results['up'] / 1e9:.2f} Gbit/s")


@pytest.mark.slow
def test_thousand_sequential_connections_over_ipv6(tmp_path, tool, server):  # noqa: F811
    srv = server(SHORT_CONNECTIONS, bind="::1")
    out = tmp_path / "out.json"
    rc, counters = run_client(tool, ["echo", GATEWAY6, srv.port, SHORT_CONNECTIONS, out],
                              NatConfig())
    assert rc == 0
    got = json.loads(out.read_text())
    assert got["failures"] == [] and got["ok"] == SHORT_CONNECTIONS
    assert all(r["eof"] for r in srv.results())
    assert_clean(counters, SHORT_CONNECTIONS)
    print(f"\n{SHORT_CONNECTIONS} IPv6 connections in {got['seconds']:.2f} s, "
          f"{got['seconds'] / SHORT_CONNECTIONS * 1e3:.2f} ms each")


# ---------------------------------------------------------------------- stats and pcap


def test_stats_count_ipv6():
    result = subprocess.run(
        [sys.executable, "-m", "voidbox", "net", "run", "--stats", "--",
         "busybox", "ping", "-6", "-c", "1", "-W", str(WAIT), GATEWAY6],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("voidbox: net run: ")]
    fields = dict(item.split("=") for item in line[len("voidbox: net run: "):].split())
    assert fields["icmp6_echo_local"] == "1" and int(fields["ip6_in"]) >= 1, line
    assert int(fields["ndp_na_sent"]) >= 1, line


def test_pcap_captures_ipv6(tmp_path):
    from voidbox.net.pcap import PcapSpec

    path = tmp_path / "cap.pcap"
    rc, counters = run(["busybox", "ping", "-6", "-c", "1", "-W", str(WAIT), GATEWAY6],
                       pcap=PcapSpec(str(path), 1 << 20))
    assert rc == 0
    raw = path.read_bytes()
    i, ethertypes = PCAP_GLOBAL_HEADER, []
    while i + PCAP_RECORD_HEADER <= len(raw):
        incl = struct.unpack_from("<I", raw, i + 8)[0]
        frame = raw[i + PCAP_RECORD_HEADER:i + PCAP_RECORD_HEADER + incl]
        ethertypes.append(struct.unpack_from("!H", frame, 12)[0])
        i += PCAP_RECORD_HEADER + incl
    # The echo request and reply, the neighbour solicitation and advertisement at least.
    assert ethertypes.count(ETH_P_IPV6) >= 4
