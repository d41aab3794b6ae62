"""Hostile rings at random (hypothesis): only QueueError escapes, nothing outside is touched.

Each example writes a random descriptor table, indirect tables, available ring and
indexes into guest memory, then plays a device that pops, reads, writes and pushes.
Checked: no exception but QueueError; every segment lies in guest memory; read()
returns exactly `readable` bytes; the only bytes that change are in writable segments
of returned chains and the used ring; both twins give identical results. Under
VOIDBOX_PURE=1 the pure twin runs alone, against the same checks.
"""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import voidbox._ring_py as pure
from tests.twins import load_ring, pure_only
from tests.virtio_driver import Driver
from voidbox.layout import MIN_MEM, MiB
from voidbox.memory import GuestMemory
from voidbox.ring import QueueError, used_ring_size

MEM = MIN_MEM  # hostile rings: every byte is compared after each example
VALID_MEM = 32 * MiB  # the driver mock puts its buffers at 16 MiB
WINDOW = 0x5_0000  # rings and indirect tables live below this
SENTINEL = 0xA5
DESC, AVAIL, USED = 0x1_0000, 0x2_0000, 0x3_0000
TABLES = [0x4_0000 + 0x1000 * i for i in range(4)]
DATA = 0x10_0000
U64_MAX = (1 << 64) - 1

def mostly(valid, hostile, weight=3):
    """Valid values `weight` times out of weight+1, so chains get far enough to matter."""
    return st.sampled_from([True] * weight + [False]).flatmap(lambda ok: valid if ok else hostile)


addresses = mostly(
    st.one_of(st.integers(DATA, DATA + 0x1_0000), st.sampled_from(TABLES)),
    st.one_of(st.sampled_from([0, MEM - 16, MEM - 1, MEM, U64_MAX - 15, U64_MAX, 1 << 63]),
              st.integers(0, U64_MAX)),
)
lengths = mostly(
    st.one_of(st.integers(0, 4096), st.integers(1, 20).map(lambda n: 16 * n)),
    st.one_of(st.sampled_from([0, 16, 32, 48, 64, 0xFFFF_FFFF]), st.integers(0, 0xFFFF_FFFF)),
)
flags = mostly(st.integers(0, 3), st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)), weight=2)


def descriptors(size):
    nexts = mostly(st.integers(0, size - 1), st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF)))
    return st.lists(st.tuples(addresses, lengths, flags, nexts), min_size=size, max_size=size)


@st.composite
def scenarios(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    table_entries = st.lists(st.tuples(addresses, lengths, flags, st.integers(0, 20)), max_size=20)
    heads = mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF), weight=15)
    return {
        "size": size,
        "event_idx": draw(st.booleans()),
        "descs": draw(descriptors(size)),
        "tables": draw(st.lists(table_entries, min_size=len(TABLES), max_size=len(TABLES))),
        "ring": draw(st.lists(heads, min_size=size, max_size=size)),
        "avail_idx": draw(mostly(st.integers(0, size), st.integers(0, 0xFFFF), weight=7)),
        "used_event": draw(st.integers(0, 0xFFFF)),
        "pops": draw(st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 20)),
                                        st.sampled_from([0, 1, 2])), min_size=1, max_size=3)),
    }



def twins():
    """The ring modules this run exercises: compiled and pure, or the pure one alone."""
    return [pure] if pure_only() else [load_ring("cython"), pure]  # memories come in twos


def play(impl, mem, sc, changed):
    """Write the scenario into `mem` and run a device over it; returns what it saw.

    `changed` is a preallocated bool array of the memory's size.
    """
    mem.numpy().fill(SENTINEL)
    drv = Driver(mem, size=sc["size"], desc_addr=DESC, avail_addr=AVAIL, used_addr=USED,
                 event_idx=sc["event_idx"])
    mem.write(AVAIL, bytes(4 + 2 * sc["size"] + 2))
    mem.write(USED, bytes(used_ring_size(sc["size"])))
    for i, (addr, length, fl, nxt) in enumerate(sc["descs"]):
        drv.write_desc(i, addr, length, fl, nxt)
    for table, entries in zip(TABLES, sc["tables"], strict=True):
        for i, (addr, length, fl, nxt) in enumerate(entries):
            drv.write_desc(i, addr, length, fl, nxt, table=table)
    for slot, head in enumerate(sc["ring"]):
        drv.set_avail_slot(slot, head)
    drv.set_used_event(sc["used_event"])
    drv.set_avail_idx(sc["avail_idx"])
    window = mem.numpy()[:WINDOW].copy()  # everything above it holds the sentinel

    q = drv.configure(impl.Virtqueue(mem, max_size=16))
    seen = []
    allowed = [(USED, used_ring_size(sc["size"]))]
    for max_chains, require in sc["pops"]:
        try:
            chains = q.pop(max_chains, require)
        except QueueError as exc:
            seen.append(("QueueError", str(exc)))
            continue
        for chain in chains:
            assert 0 <= chain.head < sc["size"]
            total_r = total_w = 0
            for gpa, length, writable in chain.segments:
                assert 0 <= gpa and gpa + length <= MEM, "segment outside guest memory"
                if writable:
                    total_w += length
                    allowed.append((gpa, length))
                else:
                    assert total_w == 0, "readable segment after a writable one"
                    total_r += length
            assert (total_r, total_w) == (chain.readable, chain.writable)
            data = chain.read()
            assert len(data) == chain.readable
            pattern = bytes([chain.head + 1]) * chain.writable
            assert chain.write(pattern) == chain.writable
            seen.append((chain.head, chain.segments, data))
        q.push_many([(c.head, c.writable) for c in chains])
        seen.append(("notify", q.needs_notification()))
    assert q.in_flight == 0
    np.not_equal(mem.numpy(), SENTINEL, out=changed)
    np.not_equal(mem.numpy()[:WINDOW], window, out=changed[:WINDOW])
    for gpa, length in allowed:
        changed[gpa : gpa + length] = False
    assert not changed.any(), f"wrote outside writable segments at {np.flatnonzero(changed)[:4]}"
    used = mem.read(USED, used_ring_size(sc["size"]))
    return seen, used, q.malformed, q.last_avail_idx, q.used_idx


@pytest.fixture(scope="module")
def memories():
    with GuestMemory(MEM) as a, GuestMemory(MEM) as b:
        yield a, b


@pytest.fixture(scope="module")
def changed():
    return np.empty(MEM, bool)


@pytest.fixture(scope="module")
def valid_memories():
    with GuestMemory(VALID_MEM) as a, GuestMemory(VALID_MEM) as b:
        yield a, b


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_hostile_rings(memories, changed, sc):
    results = [play(impl, mem, sc, changed) for impl, mem in zip(twins(), memories, strict=False)]
    seen, _used, malformed, _avail, _used_idx = results[0]
    event(f"chains returned: {min(sum(1 for s in seen if isinstance(s[0], int)), 2)}+")
    event(f"malformed: {min(malformed, 2)}+")
    event(f"QueueError: {any(s[0] == 'QueueError' for s in seen)}")
    assert all(got == results[0] for got in results)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([1, 4, 16]), data=st.data())
def test_valid_chains_round_trip(valid_memories, size, data):
    """Well-formed random chains (direct and indirect) come back intact in both twins."""
    shapes = data.draw(st.lists(st.tuples(st.lists(st.integers(0, 300), max_size=3),
                                          st.lists(st.integers(0, 300), max_size=3),
                                          st.booleans()),
                                min_size=1, max_size=size))
    results = []
    for impl, mem in zip(twins(), valid_memories, strict=False):
        mem.numpy()[: 0x80_0000] = 0
        drv = Driver(mem, size=size, desc_addr=DESC, avail_addr=AVAIL, used_addr=USED)
        q = drv.configure(impl.Virtqueue(mem, max_size=16))
        expect = []
        for n, (rd, wr, indirect) in enumerate(shapes):
            if len(rd) + len(wr) == 0 or (not indirect and len(rd) + len(wr) > len(drv.free)):
                continue
            payload = [bytes([n + 1]) * k for k in rd]
            bufs = [(drv.alloc(len(p), p), len(p), False) for p in payload]
            bufs += [(drv.alloc(k), k, True) for k in wr]
            if indirect and len(bufs) <= size and drv.free:
                head = drv.add_indirect(bufs)
            elif not indirect:
                head = drv.add_chain(bufs)
            else:
                continue
            expect.append((head, b"".join(payload), sum(wr)))
        chains = q.pop()
        assert [(c.head, c.read(), c.writable) for c in chains] == expect
        for c in chains:
            c.write(b"\x7f" * c.writable)
        q.push_many([(c.head, c.writable) for c in chains])
        assert drv.collect() == [(h, w) for h, _, w in expect]
        assert q.malformed == 0
        results.append(expect)
    assert all(expect == results[0] for expect in results)


def test_struct_layout_assumed_by_the_fuzzer():
    # The fuzzer writes raw descriptors: keep its idea of the layout honest (§2.7.5).
    assert struct.calcsize("<QIHH") == 16
