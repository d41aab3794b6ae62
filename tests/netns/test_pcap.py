"""`voidbox net run --pcap`: what crossed tap0, both ways, read back by tcpdump.

The DHCP and size-bound cases run the real command line; the TCP case calls run_in_netns
to also check, from its counters, that every frame read from or written to the TAP is in
the capture.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.netns.test_net_run import http_server, run  # noqa: F401  (fixture)
from tests.requires import requires
from voidbox.net.pcap import PcapSpec

pytestmark = [pytest.mark.netns,
              requires(shutil.which("tcpdump") is not None,
                       "needs tcpdump (scripts/bootstrap installs it)")]

VOIDBOX = [sys.executable, "-m", "voidbox"]
WAIT = 5  # seconds a command waits for a reply; a bound on failure, never a timing
# tcpdump -nn, one TCP segment: "IP 10.0.2.15.41234 > 10.0.2.2.8000: Flags [S], ..., length 0"
TCP_LINE = re.compile(r" IP (\S+)\.(\d+) > (\S+)\.(\d+): Flags \[([^\]]*)\].* length (\d+)")


def tcpdump(path, *flags) -> list[str]:
    """tcpdump's lines for the capture at path; it must read the file without complaint."""
    done = subprocess.run(["tcpdump", "-nn", *flags, "-r", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "truncated" not in done.stderr and "bogus" not in done.stderr, done.stderr
    return done.stdout.splitlines()


def voidbox_net_run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*VOIDBOX, "net", "run", *args], capture_output=True, text=True,
                          timeout=120)


def test_dhcp_exchange_is_captured(tmp_path):
    pcap = tmp_path / "dhcp.pcap"
    # -t 1: one DISCOVER only, so a missing server fails instead of retrying.
    done = voidbox_net_run("--dhcp", "--pcap", str(pcap), "--", "sh", "-c",
                           f"busybox udhcpc -i tap0 -n -q -f -t 1 -T {WAIT} -s /bin/true")
    assert done.returncode == 0, done.stderr
    assert "pcap" not in done.stderr  # udhcpc's own progress lines only
    assert oct(pcap.stat().st_mode & 0o777) == "0o600"
    brief = [line for line in tcpdump(pcap) if "BOOTP/DHCP" in line]
    assert len(brief) == 4, brief
    assert ["Request" in line for line in brief] == [True, False, True, False]
    assert ["Reply" in line for line in brief] == [False, True, False, True]
    assert "0.0.0.0.68 > 255.255.255.255.67" in brief[0]
    assert "10.0.2.2.67 > " in brief[1]
    # -v decodes option 53: the four message types, in order.
    kinds = re.findall(r"DHCP-Message \(53\), length 1: (\w+)", "\n".join(tcpdump(pcap, "-v")))
    assert kinds == ["Discover", "Offer", "Request", "ACK"]


def _tcp_segments(lines, port):
    """[(direction, flags, payload length)] of the TCP segments to and from port."""
    segments = []
    for line in lines:
        m = TCP_LINE.search(line)
        if not m:
            continue
        src, sport, dst, dport, flags, length = m.groups()
        if dst == "10.0.2.2" and int(dport) == port and src == "10.0.2.15":
            segments.append(("out", flags, int(length)))
        elif src == "10.0.2.2" and int(sport) == port and dst == "10.0.2.15":
            segments.append(("in", flags, int(length)))
    return segments


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_tcp_handshake_and_data_both_ways_are_captured(tmp_path, http_server, offload):  # noqa: F811
    www, port = http_server
    payload = os.urandom(200 * 1024)  # more than one TSO super-frame, few seconds of capture
    (www / "blob").write_bytes(payload)
    got = tmp_path / "got"
    pcap = tmp_path / "tcp.pcap"
    rc, counters = run(["curl", "-sf", "--max-time", "60", "-o", str(got),
                        f"http://10.0.2.2:{port}/blob"], offload=offload, pcap=PcapSpec(str(pcap)))
    assert rc == 0
    assert got.read_bytes() == payload
    # Nothing went past the capture: every frame the TAP carried is a record.
    assert counters["tap_stream_frames"] == 0
    assert counters["pcap_dropped"] == 0
    assert counters["pcap_frames"] == counters["tap_rx"] + counters["tap_tx"]
    segments = _tcp_segments(tcpdump(pcap), port)
    assert segments[0] == ("out", "S", 0)
    assert segments[1] == ("in", "S.", 0)
    sent = sum(n for way, _, n in segments if way == "out")
    received = sum(n for way, _, n in segments if way == "in")
    assert sent >= len(f"GET /blob HTTP/1.1\r\nHost: 10.0.2.2:{port}\r\n\r\n")
    assert received > len(payload)  # the body and the response's headers
    assert any(way == "in" and "F" in flags for way, flags, _ in segments)


def test_size_bound_stops_early_and_leaves_a_readable_file(tmp_path, http_server):  # noqa: F811
    www, port = http_server
    payload = os.urandom(64 * 1024)
    (www / "blob").write_bytes(payload)
    got = tmp_path / "got"
    pcap = tmp_path / "small.pcap"
    done = voidbox_net_run("--pcap", str(pcap), "--pcap-max-bytes", "2000", "--host-loopback",
                           "--", "curl", "-sf",
                           "--max-time", "60", "-o", str(got), f"http://10.0.2.2:{port}/blob")
    assert done.returncode == 0, done.stderr
    assert got.read_bytes() == payload  # the capture stopped, the traffic did not
    size = pcap.stat().st_size
    assert 0 < size <= 2000
    assert done.stderr == f"pcap {pcap} reached {size} bytes: capture stopped\n"
    segments = _tcp_segments(tcpdump(pcap), port)
    assert segments[:2] == [("out", "S", 0), ("in", "S.", 0)]
