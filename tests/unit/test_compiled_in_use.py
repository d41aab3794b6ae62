"""The compiled twins are the ones in use: a silent fallback to pure Python fails here.

voidbox/ring.py, voidbox/net/fastpath.py, voidbox/net/tcpcore.py, voidbox/net/udpfast.py and
voidbox/eventloop.py pick the pure twin when their extension does not
import (a source checkout without build_ext, or a broken build). Every other test would still
pass on the pure twins, so this is the test that notices. Under VOIDBOX_PURE=1 the run asked
for the pure twins, and it checks that they, not the extensions, are in use.
"""

import importlib

import pytest

from tests.twins import pure_only

# selector module, its compiled module, its pure twin, a name all three share
SELECTORS = [
    ("voidbox.ring", "voidbox._ring", "voidbox._ring_py", "Virtqueue"),
    ("voidbox.ring", "voidbox._ring", "voidbox._ring_py", "Chain"),
    ("voidbox.ring", "voidbox._ring", "voidbox._ring_py", "vring_need_event"),
    ("voidbox.net.fastpath", "voidbox._slirp", "voidbox.net._slirp_py", "FramePort"),
    ("voidbox.net.fastpath", "voidbox._slirp", "voidbox.net._slirp_py", "seq_lt"),
    ("voidbox.net.fastpath", "voidbox._slirp", "voidbox.net._slirp_py", "build_ipv4_tcp"),
    ("voidbox.virtio.rxstream", "voidbox._netrx", "voidbox.virtio._netrx_py", "RingStream"),
    ("voidbox.net.tcpcore", "voidbox._tcp", "voidbox.net.tcp", "TcpCore"),
    ("voidbox.net.tcpcore", "voidbox._tcp", "voidbox.net.tcp", "flow_key"),
    ("voidbox.net.udpfast", "voidbox._udp", "voidbox.net._udp_py", "guest_udp_split"),
    ("voidbox.net.udpfast", "voidbox._udp", "voidbox.net._udp_py", "build_ipv4_udp"),
    ("voidbox.eventloop", "voidbox._loop", "voidbox._loop_py", "EventLoop"),
    ("voidbox.eventloop", "voidbox._loop", "voidbox._loop_py", "Timer"),
]


@pytest.mark.parametrize("selector,compiled,pure,name", SELECTORS,
                         ids=[f"{s[0]}.{s[3]}" for s in SELECTORS])
def test_the_selector_uses_the_compiled_twin_unless_pure(selector, compiled, pure, name):
    chosen = getattr(importlib.import_module(selector), name)
    if pure_only():
        assert chosen is getattr(importlib.import_module(pure), name)
    else:
        # An ImportError here is the reason the selector would have fallen back.
        assert chosen is getattr(importlib.import_module(compiled), name), (
            f"{selector}.{name} is the pure twin: {compiled} did not load"
        )


def test_the_selectors_report_what_they_chose():
    from voidbox import ring
    from voidbox.net import fastpath

    assert ring.IMPLEMENTATION == ("pure" if pure_only() else "cython")
    assert fastpath.COMPILED is not pure_only()
    from voidbox.virtio import rxstream

    assert rxstream.COMPILED is not pure_only()
    from voidbox.net import tcpcore

    assert tcpcore.COMPILED is not pure_only()
    from voidbox.net import udpfast

    assert udpfast.COMPILED is not pure_only()
    from voidbox import eventloop

    assert eventloop.IMPLEMENTATION == ("pure" if pure_only() else "cython")
