"""Split virtqueue, device side (virtio 1.2 §2.7), against a driver mock in guest memory.

Every test runs against both twins (compiled `_ring` and pure `_ring_py`). The cases
follow the virtqueue section of NET-LESSONS.md line by line.
"""

import mmap
import struct

import pytest

import voidbox._ring_py as pure
from tests.twins import load_ring
from tests.unit.conftest import RING_MEM_SIZE
from tests.virtio_driver import DATA_ADDR, Driver, RegionMemory
from voidbox.layout import MMIO_GAP_END, MMIO_GAP_START, MiB
from voidbox.memory import GuestMemory
from voidbox.ring import (
    REQUIRE_READABLE,
    REQUIRE_WRITABLE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    QueueError,
    avail_ring_size,
    used_ring_size,
)

U64_MAX = (1 << 64) - 1
MEM_SIZE = RING_MEM_SIZE  # the memory fixture's size (conftest.py)
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


load_impl = load_ring  # impl and memory fixtures: tests/unit/conftest.py


@pytest.fixture
def make(impl, memory):
    """make(size=..., event_idx=..., max_size=...) -> (driver, activated queue)."""

    def _make(size=16, event_idx=False, max_size=256, mem=None):
        mem = mem or memory
        drv = Driver(mem, size=size, event_idx=event_idx)
        return drv, drv.configure(impl.Virtqueue(mem, max_size=max_size))

    return _make


def retired_malformed(drv, q, head, before=0):
    """The chain at `head` went back with length 0, was counted, and does not replay."""
    assert drv.collect() == [(head, 0)]
    assert q.malformed == before + 1
    assert q.pop() == [] and drv.collect() == [] and q.malformed == before + 1


# -- the happy path -----------------------------------------------------------------------


def test_pop_read_write_push_round_trip(make):
    drv, q = make()
    head = drv.add_buffers(readable=[b"hello ", b"world"], writable=[4, 8])
    [chain] = q.pop()
    assert chain.head == head
    assert (chain.readable, chain.writable) == (11, 12)
    assert chain.read() == b"hello world"
    assert chain.read(3, 5) == b"lo wo"
    assert [w for _gpa, _n, w in chain.segments] == [False, False, True, True]
    assert chain.write(b"0123456789ab") == 12
    q.push(chain.head, 12)
    assert drv.collect() == [(head, 12)]
    gpa4, _, _ = chain.segments[2]
    gpa8, _, _ = chain.segments[3]
    assert drv.memory.read(gpa4, 4) + drv.memory.read(gpa8, 8) == b"0123456789ab"
    assert q.in_flight == 0 and q.malformed == 0
    assert q.pop() == []


def test_write_at_offset_spans_segments_and_touches_nothing_else(make):
    drv, q = make()
    sentinel = b"\xa5" * 64
    before = drv.alloc(64, sentinel)
    drv.add_buffers(writable=[3, 5])
    after = drv.alloc(64, sentinel)
    [chain] = q.pop()
    assert chain.write(b"xyz", offset=2) == 3
    (g1, n1, _), (g2, n2, _) = chain.segments
    assert drv.memory.read(g1, n1) + drv.memory.read(g2, n2) == b"\0\0xyz\0\0\0"
    assert drv.memory.read(before, 64) == sentinel and drv.memory.read(after, 64) == sentinel


def test_write_that_does_not_fit_fails_and_writes_nothing(make):
    drv, q = make()
    drv.add_buffers(readable=[b"hdr"], writable=[4])
    [chain] = q.pop()
    with pytest.raises(ValueError):
        chain.write(b"12345")
    with pytest.raises(ValueError):
        chain.write(b"123", offset=2)
    gpa, n, _ = chain.segments[1]
    assert drv.memory.read(gpa, n) == bytes(4)
    assert drv.memory.read(chain.segments[0][0], 3) == b"hdr"  # readable part never written


def test_read_past_the_readable_bytes_fails(make):
    drv, q = make()
    drv.add_buffers(readable=[b"abc", b"def"])
    [chain] = q.pop()
    with pytest.raises(ValueError):
        chain.read(0, 7)
    with pytest.raises(ValueError):
        chain.read(7)
    assert chain.read(6) == b""
    assert chain.read(2, 2) == b"cd"


def test_read_into_copies_what_fits(make):
    drv, q = make()
    drv.add_buffers(readable=[b"abc", b"defg"])
    [chain] = q.pop()
    small = bytearray(5)
    assert chain.read_into(small) == 5 and small == b"abcde"
    big = bytearray(10)
    assert chain.read_into(big, offset=1) == 6 and big[:6] == b"bcdefg"


def test_zero_length_descriptor_is_accepted(make):
    drv, q = make()
    head = drv.add_chain([(DATA_ADDR, 0, False), (drv.alloc(2, b"ok"), 2, False)])
    [chain] = q.pop()
    assert chain.head == head and chain.read() == b"ok"


def test_push_many_publishes_once_in_order(make):
    drv, q = make()
    heads = [drv.add_buffers(writable=[8]) for _ in range(5)]
    chains = q.pop()
    assert [c.head for c in chains] == heads
    q.push_many([(c.head, i) for i, c in enumerate(chains)])
    assert drv.used_idx == 5
    assert drv.collect() == [(h, i) for i, h in enumerate(heads)]
    assert q.in_flight == 0


def test_push_rejects_a_head_outside_the_queue(make):
    drv, q = make(size=8)
    with pytest.raises(ValueError):
        q.push(8, 0)
    with pytest.raises(ValueError):
        q.push_many([(1, 0), (9, 0)])
    assert drv.used_idx == 0  # nothing half-published


def test_max_chains_limits_a_pop(make):
    drv, q = make()
    heads = [drv.add_buffers(readable=[b"x"]) for _ in range(5)]
    assert [c.head for c in q.pop(max_chains=2)] == heads[:2]
    assert q.pop(max_chains=0) == []
    assert [c.head for c in q.pop()] == heads[2:]


def test_require_direction(make):
    drv, q = make()
    tx_bad = drv.add_buffers(readable=[b"a"], writable=[1])
    tx_ok = drv.add_buffers(readable=[b"b"])
    assert [c.head for c in q.pop(require=REQUIRE_READABLE)] == [tx_ok]
    retired_malformed(drv, q, tx_bad)
    rx_bad = drv.add_buffers(readable=[b"c"], writable=[1])
    rx_ok = drv.add_buffers(writable=[1])
    assert [c.head for c in q.pop(require=REQUIRE_WRITABLE)] == [rx_ok]
    retired_malformed(drv, q, rx_bad, before=1)


# -- configuration (NET-LESSONS: QueueNum, ring addresses) ---------------------------------


@pytest.mark.parametrize("size", [0, 3, 24, 512, 1 << 16])
def test_activate_rejects_bad_sizes(impl, memory, size):
    drv = Driver(memory, size=16)
    q = impl.Virtqueue(memory, max_size=256)
    with pytest.raises(QueueError):
        drv.configure(q, size=size)
    with pytest.raises(QueueError):
        q.pop()


def test_max_size_must_be_a_power_of_two(impl, memory):
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            impl.Virtqueue(memory, max_size=bad)


def test_not_activated_queue_is_unusable(impl, memory):
    q = impl.Virtqueue(memory)
    with pytest.raises(QueueError):
        q.pop()
    with pytest.raises(QueueError):
        q.push(0, 0)


@pytest.mark.parametrize("field,addr", [
    ("desc_addr", 0x10_0008),  # 16-byte alignment (§2.7)
    ("avail_addr", 0x20_0001),
    ("used_addr", 0x30_0002),
])
def test_activate_rejects_misaligned_rings(impl, memory, field, addr):
    drv = Driver(memory, size=16)
    q = impl.Virtqueue(memory)
    with pytest.raises(QueueError):
        drv.configure(q, **{field: addr})


@pytest.mark.parametrize("size", [16, 256])
@pytest.mark.parametrize("field,length,align", [
    ("desc_addr", lambda n: 16 * n, 16),
    ("avail_addr", avail_ring_size, 2),
    ("used_addr", used_ring_size, 4),
])
def test_rings_must_fit_at_full_size_including_event_fields(impl, memory, size, field, length,
                                                            align):
    drv = Driver(memory, size=size)
    q = impl.Virtqueue(memory)
    # As close to the end of memory as alignment allows: fits.
    last = (MEM_SIZE - length(size)) & ~(align - 1)
    assert MEM_SIZE - (last + length(size)) < align
    drv.configure(q, **{field: last})
    # One alignment unit further: the last field (used_event / avail_event) is outside.
    with pytest.raises(QueueError):
        drv.configure(q, **{field: last + align})


@pytest.mark.parametrize("addr", [U64_MAX - 15, (1 << 64) - 4096, MMIO_GAP_START, 1 << 63])
@pytest.mark.parametrize("field", ["desc_addr", "avail_addr", "used_addr"])
def test_ring_addresses_near_2_64_or_outside_memory(impl, memory, field, addr):
    drv = Driver(memory, size=16)
    q = impl.Virtqueue(memory)
    with pytest.raises(QueueError):
        drv.configure(q, **{field: addr & ~15})


def test_two_regions_around_the_mmio_gap(impl):
    size = MMIO_GAP_START + 16 * MiB  # sparse memfd: costs nothing until touched
    with GuestMemory(size) as mem:
        assert len(mem.regions) == 2
        drv = Driver(mem, size=16, desc_addr=MMIO_GAP_END, avail_addr=MMIO_GAP_END + 0x1000,
                     used_addr=MMIO_GAP_END + 0x2000)
        q = drv.configure(impl.Virtqueue(mem))
        high = MMIO_GAP_END + 0x10000
        mem.write(high, b"high")
        low = drv.alloc(3, b"low")
        good = drv.add_chain([(low, 3, False), (high, 4, False)])
        in_gap = drv.add_chain([(MMIO_GAP_START, 16, False)])
        # Straddles the end of low RAM into the gap: a partial read is a failure.
        straddle = drv.add_chain([(MMIO_GAP_START - 8, 16, False)])
        [chain] = q.pop()
        assert chain.head == good and chain.read() == b"lowhigh"
        assert drv.collect() == [(in_gap, 0), (straddle, 0)]
        # A ring inside the gap cannot be activated.
        with pytest.raises(QueueError):
            drv.configure(q, used_addr=MMIO_GAP_START + 0x1000)


def test_activate_takes_the_whole_configuration_in_one_call(impl, memory):
    drv = Driver(memory, size=16, event_idx=True)
    q = impl.Virtqueue(memory)
    assert not q.ready and q.size == 0
    q.activate(16, drv.desc_addr, drv.avail_addr, drv.used_addr, True)  # positional
    assert (q.size, q.desc_addr, q.avail_addr, q.used_addr, q.event_idx, q.ready) == (
        16, drv.desc_addr, drv.avail_addr, drv.used_addr, True, True)
    head = drv.add_buffers(readable=[b"a"])
    assert [c.head for c in q.pop()] == [head]
    assert drv.avail_event == 1
    # A bad configuration leaves the queue inactive, the old one forgotten.
    with pytest.raises(QueueError):
        q.activate(size=16, desc_addr=drv.desc_addr + 8, avail_addr=drv.avail_addr,
                   used_addr=drv.used_addr)
    assert (q.size, q.desc_addr, q.ready, q.event_idx) == (0, 0, False, False)
    with pytest.raises(QueueError):
        q.pop()
    # Activating again keeps the ring indexes (reset() is what zeroes them).
    q.activate(used_addr=drv.used_addr, avail_addr=drv.avail_addr, desc_addr=drv.desc_addr,
               size=16)
    assert not q.event_idx and q.last_avail_idx == 1 and q.in_flight == 1
    q.push(head, 0)
    assert drv.collect() == [(head, 0)]


@pytest.mark.parametrize("override", [
    {"size": -16}, {"size": 1 << 40}, {"desc_addr": -16}, {"avail_addr": 1 << 64},
    {"used_addr": (1 << 64) + 0x30_0000}, {"desc_addr": 1 << 70},
])
def test_activate_refuses_values_no_register_holds(impl, memory, override):
    drv = Driver(memory, size=16)
    q = impl.Virtqueue(memory)
    with pytest.raises(QueueError):
        drv.configure(q, **override)
    with pytest.raises(TypeError):
        drv.configure(q, desc_addr=float(drv.desc_addr))
    assert not q.ready


def test_reset_returns_to_the_initial_state(make):
    drv, q = make()
    drv.add_buffers(readable=[b"a"])
    q.pop()
    q.reset()
    assert (q.last_avail_idx, q.used_idx, q.malformed, q.in_flight) == (0, 0, 0, 0)
    assert (q.size, q.desc_addr, q.avail_addr, q.used_addr, q.event_idx, q.ready) == (
        0, 0, 0, 0, False, False)
    with pytest.raises(QueueError):
        q.pop()


# -- malformed chains (NET-LESSONS: loops, next, lengths, partial reads) --------------------


def test_self_referential_next_is_malformed_and_the_queue_carries_on(make):
    drv, q = make()
    buf = drv.alloc(16)
    drv.write_desc(0, buf, 16, NEXT, 0)
    drv.free.remove(0)
    drv.offer(0)
    good = drv.add_buffers(readable=[b"next"])
    [chain] = q.pop()
    assert chain.head == good and chain.read() == b"next"
    assert drv.collect() == [(0, 0)]
    assert q.malformed == 1


@pytest.mark.parametrize("cycle", [2, 5, 16])
def test_cycle_around_n_descriptors_is_malformed(make, cycle):
    drv, q = make(size=16)
    buf = drv.alloc(256, b"\x11" * 256)
    for i in range(cycle):
        drv.write_desc(i, buf, 256, NEXT, (i + 1) % cycle)
    drv.offer(0)
    assert q.pop() == []
    retired_malformed(drv, q, 0)


def test_cycle_of_zero_length_address_zero_descriptors_is_malformed(make):
    drv, q = make(size=16)
    for i in range(3):
        drv.write_desc(i, 0, 0, NEXT, (i + 1) % 3)
    drv.offer(1)
    assert q.pop() == []
    retired_malformed(drv, q, 1)


def test_one_descriptor_repeated_cannot_fabricate_data(make):
    # NET-LESSONS: one 256-byte descriptor repeated 256 times "assembles" 64 KiB.
    drv, q = make(size=256)
    buf = drv.alloc(256, b"\x22" * 256)
    drv.write_desc(7, buf, 256, NEXT, 7)
    drv.offer(7)
    assert q.pop() == []
    retired_malformed(drv, q, 7)


def test_chain_of_exactly_queue_size_descriptors_is_valid(make):
    drv, q = make(size=16)
    head = drv.add_chain([(drv.alloc(1, bytes([i])), 1, False) for i in range(16)])
    [chain] = q.pop()
    assert chain.head == head and chain.read() == bytes(range(16))


@pytest.mark.parametrize("nxt", [16, 17, 0xFFFF])
def test_next_outside_the_queue_is_malformed_and_the_prefix_is_not_returned(make, nxt):
    drv, q = make(size=16)
    drv.write_desc(0, drv.alloc(4, b"pref"), 4, NEXT, 1)
    drv.write_desc(1, drv.alloc(4, b"more"), 4, NEXT, nxt)
    drv.offer(0)
    assert q.pop() == []
    retired_malformed(drv, q, 0)


@pytest.mark.parametrize("size", [2, 16, 256])
def test_next_at_the_last_descriptor_is_valid_and_one_past_it_is_malformed(make, size):
    """virtio 1.2 §2.7.5: `next` indexes the table, so size-1 is its last valid value and
    size its first invalid one (the chain is dropped, its head still retired)."""
    drv, q = make(size=size)
    last = size - 1
    drv.write_desc(0, drv.alloc(4, b"head"), 4, NEXT, last)
    drv.write_desc(last, drv.alloc(4, b"tail"), 4, 0, 0)
    drv.offer(0)
    [chain] = q.pop()
    assert (chain.head, chain.read(), q.malformed) == (0, b"headtail", 0)
    q.push(chain.head, 0)
    assert drv.collect() == [(0, 0)]
    drv.write_desc(0, drv.alloc(4, b"head"), 4, NEXT, size)
    drv.offer(0)
    assert q.pop() == []
    retired_malformed(drv, q, 0)


@pytest.mark.parametrize("entries", [2, 16])
def test_indirect_next_at_the_last_entry_is_valid_and_one_past_it_is_malformed(make, entries):
    """§2.7.5.3.1: inside an indirect table `next` indexes the table's own entries."""
    drv, q = make(size=16)
    last = entries - 1
    for nxt, valid in ((last, True), (entries, False)):
        head, tail = drv.alloc(4, b"head"), drv.alloc(4, b"tail")
        table = [(head, 4, NEXT, nxt)] + [(tail, 4, 0, 0)] * last
        addr, nbytes = drv.indirect_table(table)
        drv.write_desc(0, addr, nbytes, INDIRECT)
        drv.offer(0)
        if valid:
            [chain] = q.pop()
            assert (chain.head, chain.read(), q.malformed) == (0, b"headtail", 0)
            q.push(chain.head, 0)
            assert drv.collect() == [(0, 0)]
        else:
            assert q.pop() == []
            retired_malformed(drv, q, 0)


@pytest.mark.parametrize("addr,length", [
    (MEM_SIZE, 1),  # just past the end
    (MEM_SIZE - 8, 16),  # straddles the end: a partial read is a failure
    (U64_MAX - 15, 32),  # addr + len overflows u64
    (U64_MAX, 1),
    (0, 0xFFFF_FFFF),  # a u32 length larger than memory
])
def test_descriptor_outside_memory_is_malformed(make, addr, length):
    drv, q = make()
    bad = drv.add_chain([(addr, length, False)])
    assert q.pop() == []
    retired_malformed(drv, q, bad)


def test_writable_descriptor_outside_memory_is_malformed(make):
    drv, q = make()
    bad = drv.add_chain([(drv.alloc(4), 4, False), (U64_MAX - 3, 4, True)])
    assert q.pop() == []
    retired_malformed(drv, q, bad)


def test_readable_after_writable_is_malformed(make):
    drv, q = make()
    bad = drv.add_chain([(drv.alloc(4), 4, True), (drv.alloc(4), 4, False)])
    assert q.pop() == []
    retired_malformed(drv, q, bad)


def test_malformed_retirement_is_published_and_notifies(make):
    drv, q = make()
    drv.write_desc(3, 0, 0, NEXT, 3)
    drv.offer(3)
    q.pop()
    assert drv.used_idx == 1 and drv.used_entry(0) == (3, 0)
    assert q.needs_notification()


# -- indirect descriptors (§2.7.5.3) ---------------------------------------------------------


def test_indirect_table_mixed_directions(make):
    drv, q = make()
    head = drv.add_indirect([(drv.alloc(3, b"abc"), 3, False), (drv.alloc(8, bytes(8)), 8, True)])
    [chain] = q.pop()
    assert chain.head == head and chain.read() == b"abc" and chain.writable == 8
    chain.write(b"12345678")
    q.push(head, 8)
    assert drv.collect() == [(head, 8)]


def test_indirect_ignores_write_flag_on_the_pointer(make):
    drv, q = make()
    table, nbytes = drv.indirect_table([(drv.alloc(2, b"hi"), 2, 0, 0)])
    drv.write_desc(0, table, nbytes, INDIRECT | WRITE)
    drv.offer(0)
    [chain] = q.pop()
    assert chain.read() == b"hi" and chain.writable == 0


def test_direct_prefix_then_indirect(make):
    # §2.7.5.3.2: zero or more normal descriptors followed by one indirect one.
    drv, q = make()
    table, nbytes = drv.indirect_table([(drv.alloc(3, b"def"), 3, NEXT, 1),
                                        (drv.alloc(4), 4, WRITE, 0)])
    drv.write_desc(0, drv.alloc(3, b"abc"), 3, NEXT, 1)
    drv.write_desc(1, table, nbytes, INDIRECT)
    drv.offer(0)
    [chain] = q.pop()
    assert chain.read() == b"abcdef" and chain.writable == 4


def test_indirect_entries_may_follow_next_in_any_order(make):
    drv, q = make()
    table, nbytes = drv.indirect_table([(drv.alloc(1, b"a"), 1, NEXT, 2),
                                        (drv.alloc(1, b"c"), 1, 0, 0),
                                        (drv.alloc(1, b"b"), 1, NEXT, 1)])
    drv.write_desc(0, table, nbytes, INDIRECT)
    drv.offer(0)
    [chain] = q.pop()
    assert chain.read() == b"abc"


def _bad_indirect(drv, entries=None, addr=None, length=None, flags=INDIRECT, nxt=0):
    if entries is not None:
        table, nbytes = drv.indirect_table(entries)
    addr = table if addr is None else addr
    length = nbytes if length is None else length
    drv.write_desc(0, addr, length, flags, nxt)
    drv.write_desc(1, drv.alloc(1), 1, 0, 0)
    drv.offer(0)


@pytest.mark.parametrize("case", [
    "nested", "with_next", "len_not_multiple", "zero_len", "outside", "overflow",
    "too_many_entries", "loop_in_table", "next_past_table", "readable_after_writable",
    "entry_outside",
])
def test_malformed_indirect_tables(make, case):
    drv, q = make(size=16)
    buf = drv.alloc(16)
    one = [(buf, 16, 0, 0)]
    if case == "nested":
        inner, n = drv.indirect_table(one)
        _bad_indirect(drv, [(inner, n, INDIRECT, 0)])
    elif case == "with_next":
        _bad_indirect(drv, one, flags=INDIRECT | NEXT, nxt=1)
    elif case == "len_not_multiple":
        _bad_indirect(drv, one + one, length=24)
    elif case == "zero_len":
        _bad_indirect(drv, one, length=0)
    elif case == "outside":
        _bad_indirect(drv, addr=MEM_SIZE - 16, length=32)
    elif case == "overflow":
        _bad_indirect(drv, addr=U64_MAX - 15, length=32)
    elif case == "too_many_entries":
        _bad_indirect(drv, [(buf, 1, NEXT, i + 1) for i in range(16)] + [(buf, 1, 0, 0)])
    elif case == "loop_in_table":
        _bad_indirect(drv, [(buf, 16, NEXT, 1), (buf, 16, NEXT, 0)])
    elif case == "next_past_table":
        _bad_indirect(drv, [(buf, 16, NEXT, 1), (buf, 16, NEXT, 2)])
    elif case == "readable_after_writable":
        _bad_indirect(drv, [(buf, 16, NEXT | WRITE, 1), (buf, 16, 0, 0)])
    elif case == "entry_outside":
        _bad_indirect(drv, [(buf, 16, NEXT, 1), (MEM_SIZE - 4, 16, 0, 0)])
    assert q.pop() == []
    retired_malformed(drv, q, 0)


def test_indirect_table_of_queue_size_entries_is_valid(make):
    drv, q = make(size=16)
    head = drv.add_indirect([(drv.alloc(1, bytes([i])), 1, False) for i in range(16)])
    [chain] = q.pop()
    assert chain.head == head and chain.read() == bytes(range(16))


def test_direct_prefix_plus_indirect_longer_than_queue_is_malformed(make):
    drv, q = make(size=16)
    table, nbytes = drv.indirect_table([(drv.alloc(1), 1, NEXT, i + 1) for i in range(15)]
                                       + [(drv.alloc(1), 1, 0, 0)])
    drv.write_desc(0, drv.alloc(1), 1, NEXT, 1)
    drv.write_desc(1, table, nbytes, INDIRECT)
    drv.offer(0)
    assert q.pop() == []
    retired_malformed(drv, q, 0)


# -- ring indexes (NET-LESSONS: 65535 new entries, head out of range, wraparound) ------------


def test_head_out_of_range_makes_the_queue_unusable(make):
    drv, q = make(size=16)
    good = drv.add_buffers(readable=[b"ok"])
    drv.offer(16)
    drv.add_buffers(readable=[b"later"])
    # The chains before the bad head are still handed over; the next pop raises.
    assert [c.head for c in q.pop()] == [good]
    with pytest.raises(QueueError, match="head 16"):
        q.pop()
    with pytest.raises(QueueError):
        q.pop()
    # A device reset and a fresh activation recover it.
    q.reset()
    drv2 = Driver(drv.memory, size=16, desc_addr=0x50_0000, avail_addr=0x60_0000,
                  used_addr=0x70_0000)  # fresh, zeroed rings
    drv2.configure(q)
    assert q.pop() == []
    head = drv2.add_buffers(readable=[b"again"])
    assert [c.read() for c in q.pop()] == [b"again"] and head == 0


def test_head_out_of_range_first_raises_at_once(make):
    drv, q = make(size=16)
    drv.offer(0xFFFF)
    with pytest.raises(QueueError):
        q.pop()


@pytest.mark.parametrize("jump", [17, 0xFFFF, 0x8000])
def test_avail_index_jumping_past_the_queue_size_is_a_queue_error(make, jump):
    drv, q = make(size=16)
    drv.set_avail_idx(jump)
    with pytest.raises(QueueError, match="more than the queue size"):
        q.pop()
    assert drv.used_idx == 0


def test_a_full_queue_is_one_pop(make):
    drv, q = make(size=16)
    heads = [drv.add_buffers(readable=[bytes([i])]) for i in range(16)]
    chains = q.pop()
    assert [c.head for c in chains] == heads
    assert b"".join(c.read() for c in chains) == bytes(range(16))


@pytest.mark.parametrize("size,total,batch", [(256, 300, 7), (256, 257, 256), (4, 65536 + 40, 4)])
def test_indexes_wrap_modulo_queue_size_and_2_16(make, size, total, batch):
    # Corruption after exactly `size` packets, and at the 65535 -> 0 wrap of the indexes.
    drv, q = make(size=size, max_size=max(size, 256))
    done = 0
    while done < total:
        n = min(batch, total - done)
        heads = []
        for i in range(n):
            head = drv.free.pop(0)
            seq = (done + i) & 0xFFFFFFFF
            drv.write_desc(head, DATA_ADDR + 4 * head, 4, 0, 0)
            drv.memory.write(DATA_ADDR + 4 * head, struct.pack("<I", seq))
            drv.offer(head)
            heads.append(head)
        chains = q.pop()
        assert [c.head for c in chains] == heads
        assert [struct.unpack("<I", c.read())[0] for c in chains] == list(range(done, done + n))
        q.push_many([(c.head, c.head + 1) for c in chains])
        assert drv.collect(recycle=True) == [(h, h + 1) for h in heads]
        done += n
    assert q.last_avail_idx == total & 0xFFFF == q.used_idx == drv.used_idx
    assert q.in_flight == 0 and q.malformed == 0


# -- notifications (§2.7.7, §2.7.10) ------------------------------------------------------


def test_no_interrupt_flag_without_event_idx(make):
    drv, q = make()
    assert not q.needs_notification()  # nothing pushed
    q.push(drv.add_buffers(readable=[b"a"]), 0)
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing new since
    drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.push(0, 0)
    assert not q.needs_notification()


def test_used_event_with_event_idx(make):
    drv, q = make(event_idx=True)
    drv.set_used_event(0)
    q.push(0, 0)  # used idx 0 -> 1 passes used_event 0
    assert q.needs_notification()
    q.push(0, 0)
    assert not q.needs_notification()
    drv.set_used_event(3)
    q.push_many([(0, 0), (0, 0)])  # 2 -> 4 passes 3
    assert q.needs_notification()
    # The lower bit of avail flags is ignored with EVENT_IDX (§2.7.7.2).
    drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    drv.set_used_event(4)
    q.push(0, 0)
    assert q.needs_notification()


def test_used_event_across_the_16_bit_wrap(make):
    drv, q = make(size=4, event_idx=True)
    for _ in range(0xFFFF // 4):
        q.push_many([(0, 0)] * 4)
    q.push_many([(0, 0)] * 2)  # 16383 * 4 + 2 = 0xFFFE
    assert q.used_idx == 0xFFFE
    q.needs_notification()
    drv.set_used_event(0xFFFF)
    q.push(0, 0)
    assert not q.needs_notification()  # 0xFFFE -> 0xFFFF has not passed 0xFFFF yet
    q.push(0, 0)
    assert q.used_idx == 0
    assert q.needs_notification()  # 0xFFFF -> 0 passed it


@pytest.mark.parametrize("event_idx,new,old,expect", [
    (0, 1, 0, True), (0, 2, 1, False), (5, 7, 5, True), (5, 5, 3, False),
    (0xFFFF, 0, 0xFFFF, True), (0xFFFF, 1, 0xFFFE, True), (1, 0xFFFF, 0xFFFE, False),
])
def test_vring_need_event(impl, event_idx, new, old, expect):
    assert impl.vring_need_event(event_idx, new, old) is expect


def test_enable_disable_without_event_idx(make):
    drv, q = make()
    q.disable_notifications()
    assert drv.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert q.enable_notifications() is False
    assert drv.used_flags == 0
    drv.add_buffers(readable=[b"x"])
    q.disable_notifications()
    assert q.enable_notifications() is True  # buffers arrived while disabled: pop again


def test_enable_disable_with_event_idx(make):
    drv, q = make(event_idx=True)
    for _ in range(3):
        drv.add_buffers(readable=[b"x"])
    q.pop()
    assert drv.avail_event == 3  # notify when the driver fills slot 3
    assert drv.used_flags == 0  # §2.7.10: flags stay 0 with EVENT_IDX
    q.disable_notifications()
    drv.add_buffers(readable=[b"y"])
    q.pop()
    assert drv.avail_event == 3  # stays behind while disabled
    assert drv.used_flags == 0
    assert q.enable_notifications() is False
    assert drv.avail_event == 4


def test_in_flight_counts_return_to_zero(make):
    drv, q = make()
    for _ in range(4):
        drv.add_buffers(readable=[b"x"])
    chains = q.pop()
    assert q.in_flight == 4
    q.push(chains[0].head, 0)
    q.push_many([(c.head, 0) for c in chains[1:]])
    assert q.in_flight == 0


def test_both_twins_agree_on_a_mixed_ring(memory):
    """The same hostile ring gives the same chains and used ring in both twins."""
    compiled = load_impl("cython")
    results = []
    for impl in (compiled, pure):
        with GuestMemory(MEM_SIZE) as mem:
            drv = Driver(mem, size=8)
            q = drv.configure(impl.Virtqueue(mem))
            drv.add_buffers(readable=[b"a", b"bc"], writable=[3])
            drv.write_desc(drv.free.pop(0), 0, 0, NEXT, 7)  # cycle through 7 -> itself
            drv.write_desc(7, 0, 0, NEXT, 7)
            drv.offer(3)
            drv.add_indirect([(drv.alloc(2, b"zz"), 2, False)])
            chains = q.pop()
            q.push_many([(c.head, c.writable) for c in chains])
            results.append(([(c.head, c.read(), c.segments) for c in chains], drv.collect(),
                            q.malformed))
    assert results[0] == results[1]


def test_bad_completions_and_requirements_are_caller_errors(make):
    drv, q = make(size=8)
    for head, written in ((-1, 0), (0, -1), (0, 1 << 32), (8, 0)):
        with pytest.raises(ValueError):
            q.push(head, written)
    with pytest.raises(ValueError):
        q.pop(require=7)
    assert drv.used_idx == 0


def test_a_queue_of_long_chains_is_one_pop(make):
    # The compiled twin walks into a bounded scratch and refills it within one pop().
    drv, q = make(size=16, max_size=16)
    heads = [drv.add_indirect([(drv.alloc(1, bytes([n])), 1, False) for _ in range(16)])
             for n in range(16)]
    chains = q.pop()
    assert [c.head for c in chains] == heads
    assert [c.read() for c in chains] == [bytes([n]) * 16 for n in range(16)]


# -- regions with their own host memory (vhost-user maps one mmap per region) ----------------

# Three regions, each its own anonymous mmap: LOW holds the driver's default rings and
# indirect tables, HIGH its data buffers; NEXT follows HIGH with no gap in guest-physical
# space but is a different mapping. [8 MiB, 16 MiB) and everything above 32 MiB is a hole.
LOW, HIGH, NEXT_TO_HIGH, REGION = 0, 0x100_0000, 0x180_0000, 0x80_0000
SPLIT = [(LOW, REGION), (HIGH, REGION), (NEXT_TO_HIGH, REGION)]
HOLE = REGION


def split_queue(impl, mem, size=16, **addrs):
    drv = Driver(mem, size=size, **addrs)
    return drv, drv.configure(impl.Virtqueue(mem))


def test_a_chain_spans_regions_in_separate_mappings(impl):
    mem = RegionMemory(SPLIT)
    drv, q = split_queue(impl, mem)
    low, low_out = 0x50_0000, 0x60_0000
    mem.write(low, b"low")
    high = drv.alloc(4, b"high")
    nxt, nxt_out = NEXT_TO_HIGH + 0x100, NEXT_TO_HIGH + 0x200
    mem.write(nxt, b"nx")
    head = drv.add_chain([(low, 3, False), (high, 4, False), (nxt, 2, False),
                          (low_out, 5, True), (nxt_out, 6, True)])
    [chain] = q.pop()
    assert chain.head == head and (chain.readable, chain.writable) == (9, 11)
    assert chain.read() == b"lowhighnx"
    assert chain.read(2, 5) == b"whigh"
    out = bytearray(8)
    assert chain.read_into(out, offset=5) == 4 and out[:4] == b"ghnx"
    assert chain.write(b"0123456789a") == 11
    assert chain.write(b"XYZ", offset=4) == 3  # crosses from LOW into NEXT_TO_HIGH
    # Each byte landed in its own region's mapping.
    (_, _, low_area), _, (_, _, next_area) = mem.regions
    assert low_area[low_out : low_out + 5] == b"0123X"
    assert next_area[0x200 : 0x200 + 6] == b"YZ789a"
    q.push(chain.head, 11)
    assert drv.collect() == [(head, 11)] and q.in_flight == 0


def test_a_buffer_crossing_adjacent_regions_is_malformed(impl):
    # NEXT_TO_HIGH starts where HIGH ends, but the two are different mappings.
    mem = RegionMemory(SPLIT)
    drv, q = split_queue(impl, mem)
    mem.write(NEXT_TO_HIGH - 4, b"end.")
    mem.write(NEXT_TO_HIGH, b"next")
    crossing = drv.add_chain([(NEXT_TO_HIGH - 4, 8, False)])
    crossing_w = drv.add_chain([(NEXT_TO_HIGH - 1, 2, True)])
    edges = drv.add_chain([(NEXT_TO_HIGH - 4, 4, False), (NEXT_TO_HIGH, 4, False)])
    [chain] = q.pop()
    assert chain.head == edges and chain.read() == b"end.next"
    assert drv.collect() == [(crossing, 0), (crossing_w, 0)] and q.malformed == 2


@pytest.mark.parametrize("addr,length", [
    (HOLE, 16),                    # between LOW and HIGH
    (HOLE - 8, 16),                # starts in LOW, ends in the hole
    (HIGH - 8, 16),                # starts in the hole, ends in HIGH
    (NEXT_TO_HIGH + REGION, 1),    # past the last region
    (U64_MAX - 15, 16),            # near 2^64: no wrap into LOW
    (U64_MAX, 2),
])
def test_a_descriptor_in_no_region_is_malformed(impl, addr, length):
    mem = RegionMemory(SPLIT)
    drv, q = split_queue(impl, mem)
    bad = drv.add_chain([(drv.alloc(2, b"ok"), 2, False), (addr, length, False)])
    table = drv.add_indirect([(0x50_0000, 4, False)])
    drv.write_desc(table, addr, 16, INDIRECT)  # the indirect table itself outside
    good = drv.add_buffers(readable=[b"fine"])
    [chain] = q.pop()
    assert chain.head == good and chain.read() == b"fine"
    assert drv.collect() == [(bad, 0), (table, 0)] and q.malformed == 2


def test_an_indirect_table_in_one_region_pointing_into_others(impl):
    mem = RegionMemory(SPLIT)
    drv, q = split_queue(impl, mem)
    drv._indirect_next = NEXT_TO_HIGH + 0x1000  # tables in NEXT_TO_HIGH
    mem.write(0x50_0000, b"ab")
    head = drv.add_indirect([(0x50_0000, 2, False), (drv.alloc(2, b"cd"), 2, False),
                             (NEXT_TO_HIGH + 0x10, 3, True)])
    [chain] = q.pop()
    assert chain.head == head and chain.read() == b"abcd"
    assert chain.write(b"xyz") == 3 and mem.read(NEXT_TO_HIGH + 0x10, 3) == b"xyz"


@pytest.mark.parametrize("event_idx", [False, True])
def test_ring_parts_in_three_different_regions(impl, event_idx):
    mem = RegionMemory(SPLIT)
    # Descriptors in NEXT_TO_HIGH, available ring in LOW, used ring in HIGH.
    drv, q = split_queue(impl, mem, desc_addr=NEXT_TO_HIGH + 0x1000, avail_addr=0x20_0000,
                         used_addr=HIGH + 0x70_0000, event_idx=event_idx)
    heads = [drv.add_buffers(readable=[bytes([n]) * 3], writable=[2]) for n in range(3)]
    chains = q.pop()
    assert [c.head for c in chains] == heads
    assert [c.read() for c in chains] == [bytes([n]) * 3 for n in range(3)]
    for chain in chains:
        chain.write(b"ok")
    drv.set_used_event(1)
    q.push_many([(c.head, 2) for c in chains])
    assert drv.collect() == [(h, 2) for h in heads]
    assert q.needs_notification()
    if event_idx:
        assert drv.avail_event == 3  # written into the used ring's region
    q.disable_notifications()
    drv.add_buffers(readable=[b"more"])
    assert q.enable_notifications()
    assert [c.read() for c in q.pop()] == [b"more"]


@pytest.mark.parametrize("part,addr", [
    ("desc_addr", HOLE - 16 * 8),             # runs off LOW into the hole
    ("avail_addr", NEXT_TO_HIGH - 8),         # runs from HIGH into the next mapping
    ("used_addr", NEXT_TO_HIGH - 8),
    ("used_addr", HOLE),
    ("desc_addr", (1 << 64) - 256),
])
def test_a_ring_part_must_lie_in_one_region(impl, part, addr):
    mem = RegionMemory(SPLIT)
    with pytest.raises(QueueError):
        split_queue(impl, mem, **{part: addr})


def test_regions_are_validated_alike_by_both_twins(impl):
    area = mmap.mmap(-1, 0x4000)
    view = memoryview(area)
    bad = [
        [(0, 0x1000, bytes(0x1000))],                           # read-only
        [(0, 0x2000, view[:0x1000])],                           # buffer shorter than region
        [(0, 0x2000, view[:0x2000]), (0x1000, 0x1000, view[0x2000:0x3000])],  # overlap
        [(0, 0, view[:0])],                                     # empty
        [(0, 0x1000, view[8:0x1008])],                          # host not aligned like gpa
        [(0, 0x1000, view[::2])],                               # not contiguous
        [(-0x1000, 0x1000, view[:0x1000])],
        [((1 << 64) - 0x1000, 0x2000, view[:0x2000])],          # past 2^64
        [(i * 0x1000, 0x1000, view[:0x1000]) for i in range(pure.MAX_REGIONS + 1)],
    ]
    for regions in bad:
        with pytest.raises(ValueError):
            impl.Virtqueue(regions)
    # Aligned alike modulo 16 is enough; the last byte of a region may be at 2^64 - 1.
    impl.Virtqueue([(8, 0x1000, view[8:0x1008])])
    impl.Virtqueue([(i * 0x1000, 0x1000, view[:0x1000]) for i in range(pure.MAX_REGIONS)])
    top = (1 << 64) - 0x1000
    drv, q = split_queue(impl, _Top(top, area), desc_addr=top, avail_addr=top + 0x400,
                         used_addr=top + 0x800)
    area[0xFF0:0x1000] = b"0123456789abcdef"
    ok = drv.add_chain([(U64_MAX - 15, 16, False)])
    wraps = drv.add_chain([(U64_MAX - 15, 17, False)])
    [chain] = q.pop()
    assert chain.head == ok and chain.read() == b"0123456789abcdef"
    assert drv.collect() == [(wraps, 0)]


class _Top(RegionMemory):
    """One region whose last byte is at 2^64 - 1."""

    def __init__(self, gpa, area):
        self.regions = [(gpa, 0x1000, area)]


def test_both_twins_agree_over_separate_mappings():
    compiled = load_impl("cython")
    results = []
    for impl in (compiled, pure):
        mem = RegionMemory(SPLIT)
        drv, q = split_queue(impl, mem, size=8, avail_addr=NEXT_TO_HIGH + 0x1000)
        mem.write(0x50_0000, b"lo")
        drv.add_chain([(0x50_0000, 2, False), (drv.alloc(2, b"hi"), 2, False),
                       (NEXT_TO_HIGH + 0x10, 4, True)])
        drv.add_chain([(NEXT_TO_HIGH - 2, 4, False)])
        drv.add_chain([(HOLE, 1, True)])
        drv.add_indirect([(0x50_0000, 1, False), (NEXT_TO_HIGH, 3, True)])
        chains = q.pop()
        for c in chains:
            c.write(b"w" * c.writable)
        q.push_many([(c.head, c.writable) for c in chains])
        results.append(([(c.head, c.read(), c.segments) for c in chains], drv.collect(),
                        q.malformed, mem.read(NEXT_TO_HIGH, 0x14)))
    assert results[0] == results[1]


# -- the C-level batch path (a Cython caller of _ring.pxd) -----------------------------------


@pytest.fixture(scope="module")
def ring_bench(tmp_path_factory):
    """bench/_ring_bench.pyx, compiled: it cimports Virtqueue and calls pop_batch & co."""
    load_impl("cython")
    from tests import bench_scripts

    bench = bench_scripts.load("conftest.py", "bench_conftest")
    return bench.build_ring_bench(tmp_path_factory.mktemp("ring_bench"))


@pytest.mark.slow
def test_pop_batch_push_batch(ring_bench, memory):
    import voidbox._ring as compiled

    drv = Driver(memory, size=16)
    q = drv.configure(compiled.Virtqueue(memory, max_size=16))
    good = drv.add_buffers(readable=[b"ab", b"cd"], writable=[4])
    loop_a, loop_b = drv.free.pop(0), drv.free.pop(0)
    drv.write_desc(loop_a, 0, 0, NEXT, loop_b)  # a two-descriptor loop
    drv.write_desc(loop_b, 0, 0, NEXT, loop_a)
    drv.offer(loop_a)
    long_heads = [drv.add_indirect([(drv.alloc(1, b"z"), 1, False)] * 16) for _ in range(11)]
    # 128 scratch segments: the batch stops before a chain that might not fit.
    first = ring_bench.pop_batch_summary(q, 16, 0)
    assert first[0] == (good, 4, 4, 3, b"abcd")
    assert 1 < len(first) < 13 and q.malformed == 1
    rest = ring_bench.pop_batch_summary(q, 16, 0)
    assert [c[0] for c in first[1:] + rest] == long_heads
    assert all(c[1:] == (16, 0, 16, b"z" * 16) for c in first[1:] + rest)
    assert ring_bench.pop_batch_summary(q, 16, 0) == []
    ring_bench.push_batch(q, [(good, 4)] + [(h, 0) for h in long_heads])
    assert drv.collect() == [(loop_a, 0), (good, 4)] + [(h, 0) for h in long_heads]
    assert q.in_flight == 0
    with pytest.raises(ValueError):
        ring_bench.push_batch(q, [(16, 0)])


@pytest.mark.slow
def test_batch_loops_move_data(ring_bench, memory):
    import voidbox._ring as compiled

    drv = Driver(memory, size=8)
    q = drv.configure(compiled.Virtqueue(memory, max_size=8))
    for _ in range(4):
        drv.add_buffers(writable=[3, 5])
    frame = bytes(range(8))
    assert ring_bench.run_rx(q, 1, 4, frame) == (4, 32)
    used = drv.collect()
    assert [w for _h, w in used] == [8] * 4
    for head, _ in used:
        a, _l, _f, nxt = drv.read_desc(head)
        b, *_ = drv.read_desc(nxt)
        assert memory.read(a, 3) + memory.read(b, 5) == frame
    drv.set_avail_idx(0xFFFF)  # a jump of more than the queue size
    with pytest.raises(QueueError):
        ring_bench.pop_batch_summary(q, 8, 0)
    with pytest.raises(QueueError):  # and it stays unusable
        ring_bench.pop_batch_summary(q, 8, 0)


@pytest.mark.slow
def test_batch_path_over_separate_mappings(ring_bench):
    import voidbox._ring as compiled

    mem = RegionMemory(SPLIT)
    drv, q = split_queue(compiled, mem, size=8, used_addr=NEXT_TO_HIGH + 0x1000)
    mem.write(0x50_0000, b"ab")
    tx = drv.add_chain([(0x50_0000, 2, False), (drv.alloc(3, b"cde"), 3, False)])
    bad = drv.add_chain([(NEXT_TO_HIGH - 1, 2, False)])
    assert ring_bench.pop_batch_summary(q, 8, 0) == [(tx, 5, 0, 2, b"abcde")]
    ring_bench.push_batch(q, [(tx, 0)])
    assert drv.collect() == [(bad, 0), (tx, 0)]
    for _ in range(2):
        drv.add_chain([(0x60_0000, 3, True), (NEXT_TO_HIGH + 0x10, 5, True)])
    assert ring_bench.run_rx(q, 1, 2, bytes(range(8))) == (2, 16)
    assert mem.read(0x60_0000, 3) + mem.read(NEXT_TO_HIGH + 0x10, 5) == bytes(range(8))


def test_size_written_after_activate_changes_nothing(make):
    # A driver rewriting QueueNum on a live queue must not widen the validated rings:
    # the queue's configuration is read-only, and only activate() replaces it.
    drv, q = make(size=16)
    for field in ("size", "desc_addr", "avail_addr", "used_addr", "event_idx", "ready"):
        with pytest.raises(AttributeError):
            setattr(q, field, 256)
    heads = [drv.add_buffers(readable=[b"x"]) for _ in range(16)]
    assert [c.head for c in q.pop()] == heads
    drv.offer(17)  # in range for 256, not for the validated 16
    with pytest.raises(QueueError):
        q.pop()
    with pytest.raises(ValueError):
        q.push(200, 0)


def test_negative_offsets_are_caller_errors(make):
    drv, q = make()
    drv.add_buffers(readable=[b"abc"], writable=[4])
    [chain] = q.pop()
    for call in (lambda: chain.read(-1), lambda: chain.read(0, -1),
                 lambda: chain.read_into(bytearray(2), -1), lambda: chain.write(b"x", -1)):
        with pytest.raises(ValueError):
            call()


def test_aliased_descriptors_describe_more_than_memory_without_allocation(make):
    # NET-LESSONS: lengths come from the guest; never allocate what it asks for. Sixteen
    # descriptors over the same 48 MiB describe 768 MiB: pop() only records them.
    drv, q = make(size=16)
    whole = 48 * MiB
    head = drv.add_chain([(0x10_0000, whole, False)] * 16)
    [chain] = q.pop()
    assert chain.head == head and chain.readable == 16 * whole
    assert chain.read_into(bytearray(8), offset=whole - 4) == 8


def test_compiled_chains_come_only_from_pop():
    # A compiled Chain holds raw pointers into guest memory: none without a queue.
    with pytest.raises(TypeError):
        load_impl("cython").Chain()


def test_resume_continues_a_ring_another_device_used(make, impl, memory):
    """vhost-user SET_VRING_BASE: a new queue object over rings a previous backend used
    (2 chains taken and completed) takes the third chain next and completes it into the
    next used slot."""
    drv, first = make()
    heads = [drv.add_buffers(writable=[8]) for _ in range(3)]
    for chain in first.pop(2):
        first.push(chain.head, 1)
    assert drv.collect() == [(heads[0], 1), (heads[1], 1)]
    again = drv.configure(impl.Virtqueue(memory, max_size=256))
    again.resume(first.last_avail_idx)
    assert (again.last_avail_idx, again.used_idx) == (2, 2)
    [chain] = again.pop()
    assert chain.head == heads[2]
    again.push(chain.head, 5)
    assert drv.collect() == [(heads[2], 5)] and drv.used_idx == 3
    with pytest.raises(impl.QueueError):
        impl.Virtqueue(memory, max_size=256).resume(0)  # not active
