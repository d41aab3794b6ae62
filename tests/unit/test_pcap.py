"""The pcap writer (voidbox/net/pcap.py), read back by a reader written here from
pcap-savefile(5) and by tcpdump; and TapIO capturing the frames that cross its fd."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time

import pytest

from tests.requires import requires
from tests.unit.netframes import GUEST_HW
from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop
from voidbox.net.dhcp import DHCP_MAGIC, DHCPDISCOVER
from voidbox.net.packets import (
    ARPOP_REQUEST,
    ETH_BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    IPPROTO_UDP,
    build_arp,
    build_ethernet,
    build_ipv4,
    build_udp,
)
from voidbox.net.pcap import SNAPLEN, PcapWriter
from voidbox.net.tap import TapIO

# pcap-savefile(5), little-endian, nanosecond magic: a1b23c4d, 2.4, zone 0, sigfigs 0,
# snaplen 262144, LINKTYPE_ETHERNET.
GOLDEN_HEADER = bytes.fromhex("4d3cb2a1" "0200" "0400" "00000000" "00000000" "00000400" "01000000")
ZERO_IP = b"\x00" * 4
BROADCAST_IP = b"\xff" * 4


def read_pcap(data: bytes) -> tuple[dict, list[tuple[int, int, bytes]]]:
    """(header fields, [(timestamp ns, original length, captured bytes)]) of a pcap file;
    asserts the file is whole: no torn record at its end."""
    magic, major, minor, zone, sigfigs, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    header = {"magic": magic, "version": (major, minor), "zone": zone, "sigfigs": sigfigs,
              "snaplen": snaplen, "linktype": linktype}
    records = []
    offset = 24
    while offset < len(data):
        assert offset + 16 <= len(data), "torn record header"
        sec, frac, incl, orig = struct.unpack_from("<IIII", data, offset)
        offset += 16
        assert incl <= orig and incl <= snaplen
        assert offset + incl <= len(data), "torn record"
        records.append((sec * 1_000_000_000 + frac, orig, data[offset:offset + incl]))
        offset += incl
    return header, records


def dhcp_discover_frame() -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x1234ABCD, 0, 0, ZERO_IP,
                        ZERO_IP, ZERO_IP, ZERO_IP, GUEST_HW.ljust(16, b"\x00"), b"", b"")
    bootp += DHCP_MAGIC + bytes((53, 1, DHCPDISCOVER)) + b"\xff"
    udp = build_udp(ZERO_IP, BROADCAST_IP, 68, 67, bootp)
    return build_ethernet(ETH_BROADCAST, GUEST_HW, ETH_P_IP,
                          build_ipv4(ZERO_IP, BROADCAST_IP, IPPROTO_UDP, udp))


def arp_request_frame() -> bytes:
    arp = build_arp(ARPOP_REQUEST, GUEST_HW, bytes([10, 0, 2, 15]), b"\x00" * 6, bytes([10, 0, 2, 2]))
    return build_ethernet(ETH_BROADCAST, GUEST_HW, ETH_P_ARP, arp)


def test_empty_capture_is_the_golden_header(tmp_path):
    path = tmp_path / "c.pcap"
    PcapWriter(str(path)).close()
    assert path.read_bytes() == GOLDEN_HEADER
    assert read_pcap(GOLDEN_HEADER) == ({"magic": 0xA1B23C4D, "version": (2, 4), "zone": 0,
                                         "sigfigs": 0, "snaplen": 262144, "linktype": 1}, [])


def test_records_read_back_in_order_with_nanosecond_timestamps(tmp_path):
    path = tmp_path / "c.pcap"
    frames = [dhcp_discover_frame(), arp_request_frame(), bytes(range(256)) * 4]
    before = time.time_ns()
    with PcapWriter(str(path)) as writer:
        writer.write(frames[0])
        writer.write(memoryview(frames[1]))
        writer.write(memoryview(bytearray(frames[2]))[:])
    after = time.time_ns()
    assert writer.counters == {"pcap_frames": 3, "pcap_dropped": 0}
    _, records = read_pcap(path.read_bytes())
    assert [(orig, data) for _, orig, data in records] == [(len(f), f) for f in frames]
    stamps = [ts for ts, _, _ in records]
    assert before <= stamps[0] <= stamps[1] <= stamps[2] <= after


def test_a_frame_longer_than_snaplen_is_cut_and_keeps_its_length(tmp_path):
    path = tmp_path / "c.pcap"
    frame = b"\xab" * (SNAPLEN + 100)
    with PcapWriter(str(path)) as writer:
        writer.write(frame)
    _, [(_, orig, data)] = read_pcap(path.read_bytes())
    assert orig == len(frame) and data == frame[:SNAPLEN]


def test_size_bound_stops_the_capture_once_with_a_note(tmp_path, caplog):
    path = tmp_path / "c.pcap"
    frame = b"\x01" * 100  # a record of 116 bytes
    with caplog.at_level(logging.WARNING, logger="voidbox.net.pcap"):
        with PcapWriter(str(path), max_bytes=24 + 3 * 116 + 50) as writer:
            for _ in range(10):
                writer.write(frame)
            writer.write(b"\x02" * 14)  # would still fit, but the capture has stopped
    data = path.read_bytes()
    assert len(data) == 24 + 3 * 116
    _, records = read_pcap(data)
    assert len(records) == 3
    assert writer.counters == {"pcap_frames": 3, "pcap_dropped": 8}
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [f"pcap {path} reached {24 + 3 * 116} bytes: capture stopped"]


def test_a_bound_of_exactly_one_record_keeps_it(tmp_path):
    path = tmp_path / "c.pcap"
    with PcapWriter(str(path), max_bytes=24 + 16 + 60) as writer:
        writer.write(b"\x00" * 60)
        writer.write(b"\x00" * 60)
    assert writer.counters == {"pcap_frames": 1, "pcap_dropped": 1}
    assert path.stat().st_size == 24 + 16 + 60


def test_bound_below_the_header_is_refused(tmp_path):
    with pytest.raises(ValueError):
        PcapWriter(str(tmp_path / "c.pcap"), max_bytes=23)


def test_file_is_private_even_when_it_existed(tmp_path):
    path = tmp_path / "c.pcap"
    path.write_bytes(GOLDEN_HEADER + b"an old capture's records, longer than the header")
    path.chmod(0o644)
    PcapWriter(str(path)).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == GOLDEN_HEADER  # truncated
    new = tmp_path / "new.pcap"
    old_umask = os.umask(0)
    try:
        PcapWriter(str(new)).close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


def test_symlink_at_the_path_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    link = tmp_path / "c.pcap"
    link.symlink_to(target)
    with pytest.raises(VoidboxError) as info:
        PcapWriter(str(link))
    assert str(info.value) == f"cannot write pcap {link}: Too many levels of symbolic links"
    assert target.read_bytes() == b"keep me"


def test_unwritable_path_is_one_line(tmp_path):
    path = tmp_path / "no-such-dir" / "c.pcap"
    with pytest.raises(VoidboxError) as info:
        PcapWriter(str(path))
    assert str(info.value) == f"cannot write pcap {path}: No such file or directory"


def test_a_file_that_takes_no_data_is_one_line_before_any_traffic(tmp_path):
    """A file that opens but refuses its bytes (here: past RLIMIT_FSIZE, as a full disk
    would): the header is written through at once, so the run stops before its command
    starts, with one line and no fd left open."""
    before = len(os.listdir("/proc/self/fd"))
    path = tmp_path / "c.pcap"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (10, limit[1]))
        with pytest.raises(VoidboxError) as info:
            PcapWriter(str(path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, xfsz)
    assert str(info.value) == f"cannot write pcap {path}: File too large"
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("device", ["/dev/full", "/dev/zero", "/dev/tty"])
def test_a_device_other_than_dev_null_is_refused_before_it_is_opened(device, monkeypatch):
    """A device may act on being opened or written (/dev/full refuses every byte, others
    do worse): only /dev/null takes a capture. One line, no fd left open, and open(2)
    never called on it."""
    from voidbox.net import pcap as pcap_module
    before = len(os.listdir("/proc/self/fd"))
    opened = []
    real_open = pcap_module.os.open
    monkeypatch.setattr(pcap_module.os, "open",
                        lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    with pytest.raises(VoidboxError) as info:
        PcapWriter(device)
    assert str(info.value) == f"cannot write pcap {device}: not a regular file"
    assert opened == []
    assert len(os.listdir("/proc/self/fd")) == before
    PcapWriter("/dev/null").close()


def test_a_flush_the_file_refuses_stops_the_capture_not_the_run(tmp_path, caplog):
    """flush() runs before net run forks: a file that refuses the buffered records then
    (here: past RLIMIT_FSIZE, EFBIG) ends the capture with one warning; writes after it
    are counted as dropped, and close() is quiet."""
    writer = PcapWriter(str(tmp_path / "c.pcap"))
    writer.write(b"\x00" * 4000)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, limit[1]))
        with caplog.at_level(logging.WARNING, logger="voidbox.net.pcap"):
            writer.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, xfsz)
    assert writer.stopped and "capture stopped" in caplog.text
    writer.write(b"\x00" * 60)
    assert writer.counters == {"pcap_frames": 1, "pcap_dropped": 1}
    writer.close()


def test_a_file_that_is_not_a_capture_is_never_replaced(tmp_path):
    """--pcap naming the VM's disk or kernel by mistake: refused, the file untouched."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xeb\x63\x90" + bytes(4093))
    with pytest.raises(VoidboxError) as info:
        PcapWriter(str(image))
    assert str(info.value) == f"pcap {image} exists and is not a capture: not replacing it"
    assert image.read_bytes() == b"\xeb\x63\x90" + bytes(4093)
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    PcapWriter(str(empty)).close()  # an empty file holds nothing to lose
    assert empty.read_bytes() == GOLDEN_HEADER


@requires(os.geteuid() == 0, "needs root to give the file to another user")
def test_another_users_file_is_never_written(tmp_path):
    """A capture planted by someone else in a shared directory, even one writable to us:
    its owner would read this user's traffic. Refused, untouched."""
    planted = tmp_path / "c.pcap"
    planted.write_bytes(GOLDEN_HEADER)
    planted.chmod(0o666)
    os.chown(planted, 65534, 65534)  # nobody
    with pytest.raises(VoidboxError) as info:
        PcapWriter(str(planted))
    assert str(info.value) == f"pcap {planted} belongs to another user: not replacing it"
    assert planted.read_bytes() == GOLDEN_HEADER


def test_a_fifo_is_refused_without_waiting_for_a_reader(tmp_path):
    fifo = tmp_path / "c.pcap"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(VoidboxError) as info:
        PcapWriter(str(fifo))
    assert str(info.value) == f"cannot write pcap {fifo}: not a regular file"
    assert time.monotonic() - started < 5


def test_no_fd_is_left_behind(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    writer = PcapWriter(str(tmp_path / "c.pcap"))
    writer.write(b"\x00" * 60)
    writer.close()
    writer.close()  # twice is harmless
    with pytest.raises(VoidboxError):
        PcapWriter(str(tmp_path))  # a directory
    assert len(os.listdir("/proc/self/fd")) == before


@requires(shutil.which("tcpdump") is not None, "needs tcpdump (scripts/bootstrap installs it)")
def test_tcpdump_reads_dhcp_and_arp(tmp_path):
    path = tmp_path / "c.pcap"
    with PcapWriter(str(path)) as writer:
        writer.write(dhcp_discover_frame())
        writer.write(arp_request_frame())
    out = subprocess.run(["tcpdump", "-nn", "-r", str(path)], capture_output=True, text=True,
                         timeout=30, check=True).stdout.splitlines()
    assert len(out) == 2, out
    assert "0.0.0.0.68 > 255.255.255.255.67: BOOTP/DHCP, Request from 52:54:00:12:34:56" in out[0]
    assert "ARP, Request who-has 10.0.2.2 tell 10.0.2.15" in out[1]


# TapIO with a capture: a datagram socketpair stands in for the TAP (as in test_tap_io.py).

ETH = bytes.fromhex("525400000002" "525400123456" "0800")
VNET_HDR = bytes(10)


@pytest.fixture
def tap_pair():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    peer.setblocking(False)
    loop = EventLoop(debug=True)
    yield loop, ours, peer
    loop.close()
    ours.close()
    peer.close()


def test_tap_captures_frames_read_without_their_virtio_header(tmp_path, tap_pair):
    loop, ours, peer = tap_pair
    path = tmp_path / "c.pcap"
    got = []
    with PcapWriter(str(path)) as writer:
        tap = TapIO(loop, ours.fileno(), 1500, lambda f, ok: got.append(f), vnet_hdr=True,
                    pcap=writer)
        big = ETH + b"g" * 60000  # a TSO super-frame is captured whole, as tcpdump shows it
        peer.send(VNET_HDR + big)
        peer.send(VNET_HDR + ETH + b"small")
        loop.run_once(1.0)
        tap.close()
    assert got == [big, ETH + b"small"]
    _, records = read_pcap(path.read_bytes())
    assert [data for _, _, data in records] == got


def test_tap_captures_frames_as_the_kernel_takes_them_backlog_included(tmp_path, tap_pair):
    loop, ours, peer = tap_pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    path = tmp_path / "c.pcap"
    frames = [ETH + bytes([i]) * 1000 for i in range(40)]
    received = []
    with PcapWriter(str(path)) as writer:
        tap = TapIO(loop, ours.fileno(), 1500, lambda f, ok: None, vnet_hdr=True, pcap=writer)
        buf = bytearray(ETH + b"\x00" * 1000)
        for f in frames:
            buf[:] = f
            tap.write(memoryview(buf))  # the engine reuses its buffer: borrow=True
        assert tap.backlog  # the pair filled up: the rest waits for EPOLLOUT
        queued_at_first = writer.frames
        assert queued_at_first == len(frames) - len(tap.backlog)
        for _ in range(200):
            while True:
                try:
                    received.append(peer.recv(4096)[len(VNET_HDR):])
                except BlockingIOError:
                    break
            if len(received) == len(frames):
                break
            loop.run_once(0.05)
        tap.close()
    assert received == frames
    _, records = read_pcap(path.read_bytes())
    assert [data for _, _, data in records] == frames  # each once, in the order sent
