"""Out of file descriptors (issue 8, defect 7): every new flow is refused at once, counted
and logged at most once in a while; nothing raises into the loop, the loop never spins."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import struct
import subprocess
import sys

import pytest

from tests.unit.netframes import GATEWAY, Harness, guest_echo_frame, guest_udp_frame
from tests.unit.test_destinations import icmp_answers, settle, syn_frame, tcp_answers
from voidbox.net import limits
from voidbox.net.config import NatConfig
from voidbox.net.packets import ICMP_DEST_UNREACH, ICMP_HOST_UNREACH
from voidbox.net.tcp import ACK, RST

DNS = bytes([10, 0, 2, 3])
OUTSIDE = bytes([192, 0, 2, 9])
_real_socket = socket.socket


@contextlib.contextmanager
def out_of_fds():
    """socket(2) fails with EMFILE while inside; sockets made before keep working."""

    def emfile(*_args, **_kw):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    socket.socket = emfile
    try:
        yield
    finally:
        socket.socket = _real_socket


def test_tcp_syn_gets_a_rst_at_once(caplog):
    h = Harness()
    try:
        with caplog.at_level(logging.WARNING), out_of_fds():
            for _ in range(3):
                h.send(syn_frame(GATEWAY, 9))
        settle(h)
        answers = tcp_answers(h)
        assert len(answers) == 3
        assert all(seg.flags == RST | ACK for _ip, seg in answers)
        assert h.engine.tcp.counters["flows_refused_no_fds"] == 3
        assert h.engine.tcp.flow_count() == 0
        assert len([r for r in caplog.records if "refused" in r.message]) == 1  # rate-limited
    finally:
        h.close()


def test_udp_datagram_gets_host_unreachable():
    h = Harness()
    try:
        with out_of_fds():
            h.engine.udp._spare.clear()
            h.send(guest_udp_frame(GATEWAY, 5555, 9, b"x"))
        assert icmp_answers(h) == [(GATEWAY, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH)]
        assert h.engine.counters["flows_refused_no_fds"] == 1
    finally:
        h.close()


def test_icmp_echo_gets_host_unreachable():
    h = Harness()
    h.engine.icmp.mode = "ping"
    try:
        with out_of_fds():
            h.send(guest_echo_frame(OUTSIDE, 1, 1))
        assert icmp_answers(h) == [(OUTSIDE, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH)]
        assert h.engine.icmp.flow_count() == 0
    finally:
        h.close()


def _query(ident=0x4242) -> bytes:
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + b"\x07example\x03com\x00\x00\x01\x00\x01"


def test_dns_query_gets_servfail():
    h = Harness(NatConfig(dns_upstreams=[("127.0.0.1", 9)]))
    try:
        with out_of_fds():
            h.send(guest_udp_frame(DNS, 33333, 53, _query()))
        [(ip, hdr, data)] = h.udp_replies()
        assert ip.src == DNS and hdr.sport == 53 and hdr.dport == 33333
        ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
        assert ident == 0x4242 and flags == 0x8102 and (qd, an, ns, ar) == (1, 0, 0, 0)
        assert data[12:] == _query()[12:]
        assert not h.engine.dns.pending
    finally:
        h.close()


def test_forward_accept_out_of_fds_stops_watching_the_listener_for_a_while():
    h = Harness()
    try:
        h.engine.add_forward("tcp", "127.0.0.1", 0, 80)
        (lfd,) = h.engine.tcp.listeners
        lsock = h.engine.tcp.listeners[lfd][0]
        client = socket.create_connection(lsock.getsockname())

        def emfile():
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        real_accept = lsock.accept
        h.engine.tcp.listeners[lfd] = (type("L", (), {"accept": staticmethod(emfile),
                                                     "getsockname": lsock.getsockname})(), 80)
        h.loop.run_once(0.5)
        assert lfd not in h.loop._watchers  # no spin on the queued connection
        assert h.engine.tcp.counters["flows_refused_no_fds"] == 1
        h.engine.tcp.listeners[lfd] = (lsock, 80)
        for _ in range(50):
            h.loop.run_once(0.02)
        assert lfd in h.loop._watchers and h.engine.tcp.flow_count() == 1  # accepted later
        client.close()
        del real_accept
    finally:
        h.close()


def test_flow_limit_is_capped_by_the_fd_limit(caplog):
    config = NatConfig(max_flows=65536)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with caplog.at_level(logging.WARNING):
        limits.cap_flows(config, 65536)
    now_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert now_soft == hard or hard == resource.RLIM_INFINITY
    assert config.max_flows == min(65536, now_soft - limits.RESERVED_FDS)
    assert limits.flow_limit_for_fds(65536, 1024) == 1024 - limits.RESERVED_FDS
    assert limits.flow_limit_for_fds(100, 1024) == 100
    assert limits.flow_limit_for_fds(65536, 10) == 1


def test_soft_fd_limit_is_raised_to_the_hard_limit():
    code = ("import resource; from voidbox.net.limits import raise_fd_limit; "
            "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")

    def low_soft():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=low_soft, check=True).stdout.split()
    assert out == ["4096", "4096"]


@pytest.fixture(autouse=True)
def _restore_socket():
    yield
    socket.socket = _real_socket


def test_every_nat_caps_its_flows_by_the_fd_limit():
    """Not only net run: the engine behind a VM's card or net serve caps too."""
    code = ("from voidbox.eventloop import EventLoop; from voidbox.net.config import NatConfig;"
            "from voidbox.net.engine import Engine; c = NatConfig(); loop = EventLoop();"
            "e = Engine(c, loop, lambda f: None); print(c.max_flows); e.close(); loop.close()")

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=low_limit, check=True)
    assert out.stdout.split() == [str(300 - limits.RESERVED_FDS)]
    assert "open-file limit 300 allows" in out.stderr
