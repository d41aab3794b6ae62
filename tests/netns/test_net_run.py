"""`voidbox net run` end to end: real Linux networking in a namespace behind the NAT.

Each test runs a command (busybox tools or this interpreter) inside the namespace; the
command's findings go to files under tmp_path, which the test reads afterwards. Servers
the guest talks to listen on the host's loopback only.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

from tests.netns.dnsserver import DnsServer
from voidbox.net import netns
from voidbox.net.config import NatConfig
from voidbox.net.policy import Policy, parse_forward
from voidbox.net.run import run_in_netns

pytestmark = pytest.mark.netns

PY = sys.executable
# Seconds a command waits for a reply; a bound on failure, never asserted as a timing.
WAIT = 5
PR_SET_DUMPABLE = 4  # linux/prctl.h


def _fd_count() -> int:
    # Objects other tests left for the garbage collector may close fds mid-test.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def run(argv, config=None, dhcp=False, policy=None, check_fds=True, offload=True, pcap=None):
    """run_in_netns plus leak checks: every flow, watch and fd is gone afterwards."""
    stats: dict = {}
    before = _fd_count()
    if policy is None:
        # These tests' servers listen on the host's loopback: open it (the default is closed).
        policy = Policy(host_loopback=True)
    rc = run_in_netns(argv, config or NatConfig(), dhcp=dhcp, policy=policy, debug=True,
                      stats=stats, offload=offload, pcap=pcap)
    assert stats["flows"] == 0
    assert stats["active_tcp_flows_at_exit"] == 0  # nothing reset while still carrying data
    assert stats["watched"] == 0
    assert stats["loop_errors"] == 0
    if check_fds:
        assert _fd_count() == before
    return rc, stats["counters"]


def unused_loopback_port(kind: int) -> int:
    """A 127.0.0.1 port nothing listens on now (bound, read, released)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


class UdpEcho:
    """A UDP echo server on the host's loopback (127.0.0.1, or ::1), in a thread."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            self.received += 1
            self.sock.sendto(data, peer)

    def close(self):
        self.sock.close()


@pytest.fixture
def echo():
    server = UdpEcho()
    yield server
    server.close()


def test_static_config_and_resolv_conf(tmp_path):
    out = tmp_path / "out"
    rc, _ = run(["sh", "-c", f"ip -4 addr show tap0 > {out}; ip route >> {out}; "
                 f"ip link show tap0 >> {out}; cat /etc/resolv.conf >> {out}"],
                NatConfig(mtu=1400))
    assert rc == 0
    text = out.read_text()
    assert "inet 10.0.2.15/24" in text
    assert "default via 10.0.2.2" in text
    assert "mtu 1400" in text
    assert "52:54:00:12:34:56" in text
    assert "nameserver 10.0.2.3" in text


def test_exit_status_is_the_commands():
    assert run(["sh", "-c", "exit 7"])[0] == 7
    assert run(["sh", "-c", "kill -TERM $$"])[0] == 128 + 15
    assert run(["/nonexistent/command"])[0] == 127


# Reads tap0's TSO and TX-checksum state with SIOCETHTOOL (linux/ethtool.h), from inside
# the namespace: what the namespace's stack will actually do.
ETHTOOL_PROBE = textwrap.dedent("""
    import ctypes, fcntl, socket, struct, sys
    SIOCETHTOOL, ETHTOOL_GTXCSUM, ETHTOOL_GTSO = 0x8946, 0x16, 0x1E
    out = []
    sock = socket.socket()
    for cmd in (ETHTOOL_GTXCSUM, ETHTOOL_GTSO):
        val = ctypes.create_string_buffer(struct.pack("II", cmd, 0))
        ifr = struct.pack("16sP", b"tap0", ctypes.addressof(val)).ljust(40, b"\\0")
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)
        out.append(struct.unpack_from("II", val.raw)[1])
    print("txcsum=%d tso=%d" % tuple(out))
""")


@pytest.mark.parametrize("flag,expect", [(None, "txcsum=1 tso=1"),
                                         ("--no-offload", "txcsum=0 tso=0")])
def test_offloads_follow_the_cli_flag(tmp_path, flag, expect):
    """`voidbox net run` turns on checksum offload and TSO on the namespace's interface
    by default, and leaves both off with --no-offload."""
    probe = tmp_path / "probe.py"
    probe.write_text(ETHTOOL_PROBE)
    args = [PY, "-m", "voidbox", "net", "run", *([flag] if flag else []), "--", PY, str(probe)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expect


def test_ping_gateway():
    rc, counters = run(["busybox", "ping", "-c", "2", "-W", str(WAIT), "10.0.2.2"])
    assert rc == 0
    assert counters["icmp_echo_local"] == 2


def _host_address() -> str | None:
    """A non-loopback IPv4 address of this host: ICMP to it stays on the host's loopback."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr and not addr.startswith("127."):
                return addr
    return None


def _config_not_covering(addr: str) -> NatConfig:
    """The default layout, or 10.0.3.0/24 if the host itself sits in 10.0.2.0/24."""
    config = NatConfig()
    if ipaddress.IPv4Address(addr) in config.network:
        config = NatConfig(guest_ip="10.0.3.15", gateway_ip="10.0.3.2", dns_ip="10.0.3.3")
    return config


def test_ping_host_address_through_raw_socket():
    addr = _host_address()
    if addr is None:
        pytest.skip("the host has no non-loopback IPv4 address to ping")
    rc, counters = run(["busybox", "ping", "-c", "1", "-W", str(WAIT), addr], _config_not_covering(addr))
    assert rc == 0
    assert counters["icmp_echo_rx"] == 1


def test_ping_denied_address_fails():
    addr = _host_address()
    if addr is None:
        pytest.skip("the host has no non-loopback IPv4 address to ping")
    rc, counters = run(["busybox", "ping", "-c", "1", "-W", "2", addr], _config_not_covering(addr),
                       policy=Policy(deny=[addr], host_loopback=True))
    assert rc != 0
    assert counters["icmp_denied"] == 1


def test_udhcpc_configures_at_once(tmp_path):
    out = tmp_path / "out"
    hook = script(tmp_path, "hook.sh", f"""\
        #!/bin/sh
        case "$1" in
        bound) ip addr add $ip/$mask dev $interface
               ip route add default via $router
               echo "ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu lease=$lease" > {out} ;;
        esac
        """)
    os.chmod(hook, 0o755)
    # -t 1: one DISCOVER only, so a missing server fails instead of retrying.
    rc, counters = run(["sh", "-c", f"busybox udhcpc -i tap0 -f -q -n -t 1 -T {WAIT} -s {hook} "
                        "&& busybox ping -c1 -W5 10.0.2.2"], dhcp=True)
    assert rc == 0
    assert out.read_text().split() == [
        "ip=10.0.2.15", "mask=24", "router=10.0.2.2", "dns=10.0.2.3", "mtu=1500", "lease=86400"]
    assert counters["dhcp_replies"] == 2  # OFFER and ACK


def test_udp_to_host_echo_server(tmp_path, echo):
    out = tmp_path / "out"
    client = script(tmp_path, "client.py", f"""\
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout({WAIT})
        s.connect(("10.0.2.2", {echo.port}))
        got = []
        for payload in (b"hello", b"x" * 3000):  # the second one is fragmented both ways
            s.send(payload)
            got.append(s.recv(65535) == payload)
        open({str(out)!r}, "w").write(repr(got))
        """)
    rc, counters = run([PY, client])
    assert rc == 0
    assert out.read_text() == "[True, True]"
    assert echo.received == 2
    assert counters["udp_flows_opened"] == 1


def test_udp_denied_destination_is_refused(tmp_path, echo):
    out = tmp_path / "out"
    client = script(tmp_path, "client.py", f"""\
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout({WAIT})
        s.connect(("10.0.2.2", {echo.port}))
        s.send(b"hello")
        try:
            s.recv(100)
            result = "answered"
        except socket.timeout:
            result = "timeout"
        except OSError as e:
            result = "error %d" % e.errno
        open({str(out)!r}, "w").write(result)
        """)
    # The policy sees the translated destination: 10.0.2.2 is checked as 127.0.0.1.
    rc, counters = run([PY, client], policy=Policy(deny=[f"127.0.0.0/8:{echo.port}"], host_loopback=True))
    assert rc == 0
    import errno

    assert out.read_text() == f"error {errno.EHOSTUNREACH}"
    assert echo.received == 0
    assert counters["udp_denied"] == 1


def test_udp_port_unreachable_is_reflected(tmp_path):
    closed_port = unused_loopback_port(socket.SOCK_DGRAM)
    out = tmp_path / "out"
    client = script(tmp_path, "client.py", f"""\
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout({WAIT})
        s.connect(("10.0.2.2", {closed_port}))
        s.send(b"hello")
        try:
            s.recv(100)
            result = "answered"
        except socket.timeout:
            result = "timeout"
        except OSError as e:
            result = "error %d" % e.errno
        open({str(out)!r}, "w").write(result)
        """)
    rc, counters = run([PY, client])
    import errno

    assert rc == 0
    assert out.read_text() == f"error {errno.ECONNREFUSED}"
    assert counters["udp_icmp_reflected"] == 1


def test_nslookup_and_dig_through_relay():
    server = DnsServer({"example.test": "192.0.2.77"})
    try:
        cmd = ("busybox nslookup example.test | grep -q 192.0.2.77 && "
               "test \"$(dig +short +tries=1 +time=5 example.test)\" = 192.0.2.77")
        rc, counters = run(["sh", "-c", cmd], NatConfig(dns_upstreams=[server.addr]))
    finally:
        server.close()
    assert rc == 0
    assert counters["dns_replies"] >= 2
    assert server.queries >= 2


def test_large_dns_answer_is_truncated_for_tcp_retry(tmp_path):
    # 100 A records (~1.6 KB) exceed one 1500-byte frame: the guest must see TC set.
    server = DnsServer({"big.test": "192.0.2.1"}, pad_answers=99)
    out = tmp_path / "out"
    try:
        rc, counters = run(["sh", "-c", f"dig +notcp +ignore +bufsize=4096 +tries=1 +time=5 big.test > {out}"],
                           NatConfig(dns_upstreams=[server.addr]))
    finally:
        server.close()
    assert rc == 0
    assert " tc" in out.read_text().split("flags:")[1].split(";")[0]
    assert counters["dns_truncated"] == 1


def test_udp_port_forward(tmp_path):
    host_port = unused_loopback_port(socket.SOCK_DGRAM)
    ready = tmp_path / "ready"
    server = script(tmp_path, "server.py", f"""\
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 7000))
        open({str(ready)!r}, "w").close()
        data, peer = s.recvfrom(100)
        s.sendto(data.upper() + (" from %s" % peer[0]).encode(), peer)
        """)
    config = NatConfig(forwards=[parse_forward(f"udp:127.0.0.1:{host_port}:7000")])
    result = {}
    fds_before = _fd_count()
    # The main thread opens sockets meanwhile, so fds are counted here, not in run().
    thread = threading.Thread(
        target=lambda: result.update(rc=run([PY, server], config, check_fds=False)[0]))
    thread.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(1)
    reply = None
    try:
        # The guest's server binds after the namespace is up; retry until it answers.
        for _ in range(60):
            if thread.is_alive() and ready.exists():
                client.sendto(b"ping", ("127.0.0.1", host_port))
                try:
                    reply = client.recv(100)
                    break
                except TimeoutError:
                    continue
            thread.join(0.25)
    finally:
        client.close()
        thread.join(30)
    assert reply == b"PING from 10.0.2.2"
    assert result["rc"] == 0
    assert _fd_count() == fds_before


def _drop_to_nobody_and_run(tmp_path, workdir, cmd: str, config: NatConfig,
                            policy: Policy | None = None) -> int:
    """Run cmd with voidbox net run as uid nobody, in a forked child; return its status.

    /dev/net/tun is 0600 root here, so the child first covers it, in a private mount
    namespace of its own, with a 0666 node for the same device (what distributions ship).
    """
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            netns.unshare(netns.CLONE_NEWNS)
            netns.mount(None, "/", None, netns.MS_REC | netns.MS_PRIVATE)
            node = tmp_path / "tun"
            st = os.stat("/dev/net/tun")
            os.mknod(node, 0o666 | stat.S_IFCHR, st.st_rdev)
            os.chmod(node, 0o666)
            netns.bind_file(str(node), "/dev/net/tun")
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            # setuid() left this process non-dumpable, which makes /proc/self root-owned; a
            # user who starts voidbox by exec() is dumpable, so restore that.
            netns._libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
            os.environ["TMPDIR"] = str(workdir)
            stats: dict = {}
            code = run_in_netns(["sh", "-c", cmd], config, debug=True, stats=stats,
                                policy=policy if policy is not None else Policy(host_loopback=True))
            if stats["flows"] or stats["watched"] or stats["loop_errors"]:
                code = 98
            (workdir / "counters.json").write_text(json.dumps(stats["counters"]))
        except BaseException as e:  # the child must never return into pytest
            sys.stderr.write(f"unprivileged run failed: {e!r}\n")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def workdir():
    """A scratch directory uid nobody can write (pytest's tmp_path is root-only)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="voidbox-test-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path)


def test_unprivileged_run(tmp_path, workdir, echo):
    out = workdir / "out"
    addr = _host_address() or "192.0.2.2"
    config = _config_not_covering(addr)
    gw = config.gateway_ip
    # This venv's interpreter lives under /root, which nobody cannot enter: the guest side
    # uses the system interpreter, or skips the UDP part without one.
    system_py = "/usr/bin/python3"
    if not os.access(system_py, os.X_OK):
        pytest.skip("needs /usr/bin/python3 for the unprivileged UDP client")
    client = script(workdir, "client.py", f"""\
        import os, socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout({WAIT})
        s.connect(({gw!r}, {echo.port}))
        s.send(b"hello")
        open({str(out)!r}, "w").write("%s uid=%d" % (s.recv(100).decode(), os.getuid()))
        """)
    # No CAP_NET_RAW and no ping socket: pings outside fail at once (host unreachable).
    cmd = (f"busybox ping -c1 -W5 {gw} && {system_py} {client} && "
           f"! busybox ping -c1 -W5 {addr}")
    assert _drop_to_nobody_and_run(tmp_path, workdir, cmd, config) == 0
    assert out.read_text() == "hello uid=0"  # root inside its own user namespace
    assert echo.received == 1
    counters = json.loads((workdir / "counters.json").read_text())
    assert counters["icmp_unreachable_sent"] == 1
    assert counters["icmp_echo_local"] == 1



@pytest.fixture
def http_server(tmp_path):
    """A python http.server on the host's loopback serving tmp_path/www, in a thread."""
    import functools
    import http.server

    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, server.server_address[1]
    server.shutdown()
    server.server_close()


def test_curl_through_the_gateway(tmp_path, http_server):
    www, port = http_server
    payload = os.urandom(2 * 1024 * 1024)
    (www / "blob").write_bytes(payload)
    got = tmp_path / "got"
    rc, counters = run(["curl", "-sf", "--max-time", "60", "-o", str(got), f"http://10.0.2.2:{port}/blob"])
    assert rc == 0
    assert got.read_bytes() == payload
    assert counters["tcp_in"] > 0


def test_tcp_to_a_denied_destination_is_refused(http_server):
    _www, port = http_server
    rc, _ = run(["curl", "-sf", "--max-time", "20", f"http://10.0.2.2:{port}/"],
                policy=Policy(deny=[f"127.0.0.1:{port}"], host_loopback=True))
    assert rc == 7  # curl: failed to connect (the NAT answered the SYN with RST)


def test_tcp_port_forward(tmp_path):
    host_port = unused_loopback_port(socket.SOCK_STREAM)
    server = script(tmp_path, "server.py", """\
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
    config = NatConfig(forwards=[parse_forward(f"tcp:127.0.0.1:{host_port}:8000")])
    result = {}
    fds_before = _fd_count()
    thread = threading.Thread(
        target=lambda: result.update(rc=run([PY, server], config, check_fds=False)[0]))
    thread.start()
    reply = b""
    try:
        # Until the guest listens, the NAT resets forwarded connections: retry.
        for _ in range(120):
            if not thread.is_alive():
                break
            try:
                with socket.create_connection(("127.0.0.1", host_port), timeout=WAIT) as c:
                    c.sendall(b"x" * 100000 + b"\n")
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
    assert reply == b"X" * 100000 + b"\n from 10.0.2.2"
    assert result["rc"] == 0
    assert _fd_count() == fds_before


@pytest.mark.parametrize("mode", ["ping", "raw"])
def test_icmp_proxy_modes_in_a_private_namespace(mode):
    """Echo through a ping socket (allowed by this namespace's own ping_group_range) or a raw
    socket, to an address on the namespace's loopback; net.ipv4 sysctls are per namespace."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = "crashed"
        try:
            os.close(r)
            netns.unshare(netns.CLONE_NEWNET)
            os.system("ip link set lo up && ip addr add 192.0.2.99/32 dev lo")
            with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
                f.write("0 2147483647" if mode == "ping" else "1 0")
            from tests.unit.netframes import Harness, guest_echo_frame

            h = Harness()
            h.send(guest_echo_frame(bytes([192, 0, 2, 99]), 0x77, 1, b"payload"))
            h.pump(lambda: h.out)
            [(ip, hdr, data)] = h.icmp_replies()
            result = f"{h.engine.icmp.mode} {ip.src.hex()} {hdr.type} {hdr.rest:#x} {data!r}"
            h.close()
        except BaseException as e:  # report to the parent; never return into pytest
            result = f"error {e!r}"
        finally:
            os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        result = f.read()
    os.waitpid(pid, 0)
    assert result == f"{mode} c0000263 0 0x770001 b'payload'"


def test_stats_prints_the_nats_counters_at_exit():
    result = subprocess.run(
        [sys.executable, "-m", "voidbox", "net", "run", "--stats", "--",
         "busybox", "ping", "-c", "1", "-W", str(WAIT), "10.0.2.2"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("voidbox: net run: ")]
    fields = dict(item.split("=") for item in line[len("voidbox: net run: "):].split())
    assert fields["icmp_echo_local"] == "1" and int(fields["tap_rx"]) >= 1, line
