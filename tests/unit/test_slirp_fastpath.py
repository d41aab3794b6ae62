"""The NAT's per-packet hot path: the compiled voidbox._slirp and its pure twin agree.

Every test runs against both modules; the compiled one is skipped (with the reason) only
when it has not been built.
"""

import importlib
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.twins import load_compiled, pure_only
from voidbox.net import _slirp_py

# A missing build fails here unless VOIDBOX_PURE=1 asked for the pure twin alone.
_compiled = None if pure_only() else importlib.import_module("voidbox._slirp")

IMPLS = [
    pytest.param(_slirp_py, id="pure"),
    pytest.param(_compiled, id="cython",
                 marks=pytest.mark.skipif(_compiled is None, reason="VOIDBOX_PURE=1: pure twin only")),
]

SRC = bytes([10, 0, 2, 2])
DST = bytes([10, 0, 2, 15])


def reference_checksum(data: bytes) -> int:
    """RFC 1071 written the slow, obvious way: big-endian words, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@pytest.fixture(params=IMPLS)
def m(request):
    return request.param


@pytest.mark.parametrize(("a", "b", "lt"), [
    (0, 1, True), (1, 0, False), (5, 5, False),
    (0xFFFFFFFF, 0, True),           # wraps: 2**32-1 is just before 0
    (0xFFFFFF00, 0x100, True),
    (0x100, 0xFFFFFF00, False),
    (0, 0x7FFFFFFF, True),           # the far edge of "before" (2**31 - 1 apart)
])
def test_seq_compare_wraps(m, a, b, lt):
    assert bool(m.seq_lt(a, b)) == lt
    assert bool(m.seq_gt(b, a)) == lt
    assert bool(m.seq_le(a, b)) == (lt or a == b)
    assert bool(m.seq_ge(b, a)) == (lt or a == b)
    assert bool(m.seq_le(a, a)) and bool(m.seq_ge(a, a))


SEQ_MOD = 1 << 32
SEQ_HALF = 1 << 31


def reference_order(a, b):
    """RFC 9293 §3.4, from the definition: (lt, le, gt, ge) of a against b, where a < b iff
    b is 1 to 2**31 - 1 ahead of a modulo 2**32; exactly 2**31 apart, neither is before."""
    ahead, behind = (b - a) % SEQ_MOD, (a - b) % SEQ_MOD
    return (0 < ahead < SEQ_HALF, ahead < SEQ_HALF, 0 < behind < SEQ_HALF, behind < SEQ_HALF)


def order(m, a, b):
    return tuple(bool(f(a, b)) for f in (m.seq_lt, m.seq_le, m.seq_gt, m.seq_ge))


@pytest.mark.parametrize("a", [0, 5, SEQ_HALF - 1, SEQ_HALF, SEQ_MOD - 1])
def test_seq_lt_is_strict_and_le_is_not(m, a):
    # Would fail if seq_lt were seq_le (or seq_gt seq_ge): only equality tells them apart.
    assert order(m, a, a) == (False, True, False, True)
    b = (a + 1) % SEQ_MOD
    assert order(m, a, b) == (True, True, False, False)
    assert order(m, b, a) == (False, False, True, True)


@pytest.mark.parametrize("a", [0, 5, SEQ_HALF - 1, SEQ_HALF, SEQ_MOD - 1])
@pytest.mark.parametrize(("distance", "expected"), [
    (SEQ_HALF - 1, (True, True, False, False)),     # the last distance that is "before"
    (SEQ_HALF, (False, False, False, False)),       # undefined: neither is before the other
    (SEQ_HALF + 1, (False, False, True, True)),     # b is 2**31 - 1 behind a
])
def test_seq_order_at_half_the_space(m, a, distance, expected):
    b = (a + distance) % SEQ_MOD
    assert order(m, a, b) == expected
    lt, le, gt, ge = expected
    assert order(m, b, a) == (gt, ge, lt, le)  # antisymmetric: swapping swaps lt and gt


seq_numbers = st.one_of(st.sampled_from([0, 1, SEQ_HALF - 1, SEQ_HALF, SEQ_MOD - 1]),
                        st.integers(0, SEQ_MOD - 1))
distances = st.one_of(st.sampled_from([0, 1, SEQ_HALF - 1, SEQ_HALF, SEQ_HALF + 1, SEQ_MOD - 1]),
                      st.integers(0, SEQ_MOD - 1))


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=seq_numbers, distance=distances)  # m, the module, is stateless
def test_seq_order_matches_the_definition_everywhere(m, a, distance):
    b = (a + distance) % SEQ_MOD
    lt, le, gt, ge = got = order(m, a, b)
    assert got == reference_order(a, b)
    assert not (lt and gt) and not (lt and bool(m.seq_lt(b, a)))
    assert (le and ge) == (a == b)
    assert m.seq_diff(b, a) in (distance, distance - SEQ_MOD)
    assert -SEQ_HALF <= m.seq_diff(b, a) < SEQ_HALF


def test_seq_add_and_diff_wrap(m):
    assert m.seq_add(0xFFFFFFF0, 0x20) == 0x10
    assert m.seq_add(0x10, -0x20) == 0xFFFFFFF0
    assert m.seq_diff(0x10, 0xFFFFFFF0) == 0x20
    assert m.seq_diff(0xFFFFFFF0, 0x10) == -0x20


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 20, 1459, 1460, 65515])
def test_inet_checksum_matches_reference(m, n):
    rng = random.Random(n)
    data = bytes(rng.getrandbits(8) for _ in range(n))
    assert m.inet_checksum(data) == reference_checksum(data)


def test_inet_checksum_carries(m):
    # All-ones words force repeated end-around carries.
    assert m.inet_checksum(b"\xff" * 1001) == reference_checksum(b"\xff" * 1001)
    assert m.inet_checksum(b"\x00\x01\xf2\x03\xf4\xf5\xf6\xf7") == 0x220D  # RFC 1071 §3


def test_tcp_checksum_is_pseudo_header_plus_segment(m):
    seg = bytes(range(37))
    pseudo = SRC + DST + struct.pack("!BBH", 0, 6, len(seg))
    assert m.tcp_checksum(SRC, DST, seg) == reference_checksum(pseudo + seg)


def test_tcp_checksum_rejects_bad_addresses(m):
    with pytest.raises(ValueError):
        m.tcp_checksum(b"\1\2\3", DST, b"x" * 20)


@pytest.mark.parametrize("payload", [b"", b"x", b"hello world", bytes(range(256)) * 5])
def test_build_ipv4_tcp_is_valid_and_identical(payload):
    outs = []
    for impl in (_slirp_py, _compiled or _slirp_py):
        out = bytearray(2000)
        n = impl.build_ipv4_tcp(out, SRC, DST, 0x1234, 80, 40000, 0xFFFFFFFE, 7, 0x18, 512,
                                b"\x02\x04\x05\xb4", payload)
        outs.append(bytes(out[:n]))
        pkt = out[:n]
        assert n == 20 + 24 + len(payload)
        assert reference_checksum(bytes(pkt[:20])) == 0
        ver_ihl, _tos, total, ip_id, frag, ttl, proto = struct.unpack_from("!BBHHHBB", pkt)
        assert (ver_ihl, total, ip_id, frag, ttl, proto) == (0x45, n, 0x1234, 0x4000, 64, 6)
        assert pkt[12:16] == SRC and pkt[16:20] == DST
        tcp = bytes(pkt[20:])
        pseudo = SRC + DST + struct.pack("!BBH", 0, 6, len(tcp))
        assert reference_checksum(pseudo + tcp) == 0
        sport, dport, seq, ack, off, flags, win = struct.unpack_from("!HHIIBBH", tcp)
        assert (sport, dport, seq, ack, off >> 4, flags, win) == (80, 40000, 0xFFFFFFFE, 7, 6,
                                                                  0x18, 512)
        assert tcp[24:] == payload
    assert outs[0] == outs[1]


def test_build_ipv4_tcp_rejects_bad_input(m):
    with pytest.raises(ValueError):
        m.build_ipv4_tcp(bytearray(30), SRC, DST, 0, 1, 2, 0, 0, 0, 0, b"", b"")  # too small
    with pytest.raises(ValueError):
        m.build_ipv4_tcp(bytearray(100), SRC, DST, 0, 1, 2, 0, 0, 0, 0, b"\x01\x01", b"")
    with pytest.raises(ValueError):
        m.build_ipv4_tcp(bytearray(100), SRC, DST, 0, 1, 2, 0, 0, 0, 0, b"\x01" * 44, b"")
    with pytest.raises(ValueError):
        m.build_ipv4_tcp(bytearray(100), SRC, DST, 0, 1, 2, 0, 0, 0, 0x10000, b"", b"")
    with pytest.raises(ValueError):
        m.build_ipv4_tcp(bytearray(70000), SRC, DST, 0, 1, 2, 0, 0, 0, 0, b"", b"x" * 65500)


def test_fastpath_selects_by_environment(monkeypatch):
    import voidbox.net.fastpath as fp
    monkeypatch.setenv("VOIDBOX_PURE", "1")
    try:
        pure = importlib.reload(fp)
        assert pure.impl is _slirp_py and not pure.COMPILED
        monkeypatch.delenv("VOIDBOX_PURE")
        chosen = importlib.reload(fp)
        try:
            built = importlib.import_module("voidbox._slirp")
        except ImportError:  # possible only under VOIDBOX_PURE=1: _compiled's import fails otherwise
            built = None
        assert chosen.impl is (built or _slirp_py) and chosen.COMPILED == (built is not None)
    finally:
        monkeypatch.undo()  # back to this run's own VOIDBOX_PURE before the module is
        importlib.reload(fp)  # reloaded, so later tests see the twin the run asked for


# -- the allocator under a turn's batches (keep_freed_heap) ---------------------------------

HEAP_TURNS = """
import importlib, resource, sys
twin = importlib.import_module(sys.argv[1])
block, count = int(sys.argv[3]), int(sys.argv[4])
if sys.argv[2] == "keep":
    from voidbox.net import engine
    assert twin.keep_freed_heap(engine.KEEP_FREED_HEAP, engine.HEAP_MMAP_THRESHOLD)

def turn():
    # Written through, as a read(2) or a frame copy fills them (bytes(n) would be calloc's
    # untouched pages).
    batch = [b"\\x01" * block for _ in range(count)]
    del batch

turn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    turn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def heap_turn_faults(twin: str, mode: str, block: int, count: int) -> int:
    """Page faults of 20 turns that each allocate `count` blocks and free them."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", HEAP_TURNS, twin, mode, str(block), str(count)],
                         check=True, capture_output=True, text=True)
    return int(out.stdout)


@pytest.mark.parametrize("twin", ["voidbox._slirp", "voidbox.net._slirp_py"])
def test_keep_freed_heap_stops_every_turn_faulting_its_batch_back_in(twin):
    """By default glibc gives a turn's freed 4 MiB (64 frames of 64 KiB, batched for one
    sendmsg) back to the kernel and the next turn faults it in again, page by page
    (guest -> host bulk through a VM's card ran at half speed). With the Engine's
    settings the turns reuse it; so do larger blocks (a 1.25 MiB disk read, a 4 MiB
    peek), which the settings' fixed mmap threshold must not send back to mmap."""
    if twin == "voidbox._slirp":
        load_compiled(twin)
    # 64 frames of 64 KiB (a batch), 4 disk reads of 1.25 MiB, 2 peeks of 4 MiB.
    for block, count in ((64 << 10, 64), (1280 << 10, 4), (4 << 20, 2)):
        default, kept = (heap_turn_faults(twin, mode, block, count) for mode in ("default", "keep"))
        assert default > 20 * block * count // 4096 // 2, (block, default)  # the problem
        assert kept * 10 < default, (block, kept, default)
