"""virtio-blk behind the virtio-mmio transport under a hostile driver (hypothesis).

Each example plays the guest only through the register file (virtio 1.2 §4.2.2) and
guest memory: it negotiates features (§3.1.1), sets up queue 0 (sometimes badly: a
QueueNum of 0, not a power of two or above QueueNumMax, rings misaligned, past the end
of RAM or near 2^64), writes random descriptor tables, indirect tables, available ring
entries and index and block requests (§5.2.6: IN, OUT, FLUSH, GET_ID, DISCARD,
WRITE_ZEROES and unknown types, sectors near the capacity and near 2^64), then kicks
with QueueNotify one to three times. Checked, for both ring twins:

- no exception escapes the transport;
- a queue set up badly, or a ring found corrupt at a kick, sets DEVICE_NEEDS_RESET and
  raises a configuration interrupt (§2.1.2), and nothing else does;
- every changed byte of guest memory lies in the used ring or in a device-writable
  segment of a chain the device was handed; each completion names a chain that was
  popped and claims no more bytes than the chain can take (§2.7.8.2);
- the image changes only through OUT, WRITE_ZEROES and DISCARD, only inside [0, size),
  never on a read-only disk, and its size never changes;
- the device never reads, writes or allocates more than MAX_REQUEST_BYTES for a request.

Also here: one buffer repeated to claim around the cap over a sparse 1 GiB image, random
register accesses of every width, and explicit cases from NET-LESSONS' virtqueue list.
"""

import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import voidbox._ring_py as pure
from tests.twins import load_ring
from tests.virtio_driver import Driver
from voidbox._ring_py import (
    RING_IDX_OFFSET,
    VIRTQ_AVAIL_ELEM_SIZE,
    VIRTQ_DESC_SIZE,
    VIRTQ_RING_HEADER_SIZE,
)
from voidbox.layout import MIN_MEM, KiB, MiB
from voidbox.memory import GuestMemory
from voidbox.ring import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from voidbox.virtio.blk import (
    DISCARD_SEGMENT,
    MAX_DISCARD_SECTORS,
    MAX_REQUEST_BYTES,
    QUEUE_SIZE,
    REQUEST_HEADER,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlockBackend,
    VirtioBlk,
)
from voidbox.virtio.device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
)
from voidbox.virtio.mmio import (
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
    VirtioMmioTransport,
)

MEM = MIN_MEM  # every byte is compared after each example: the smallest RAM allowed
SENTINEL = 0xA5
DESC, AVAIL, USED = 0x1_0000, 0x2_0000, 0x3_0000
TABLE_BYTES = 0x1000  # room for 256 indirect descriptors each
TABLES = [0x4_0000 + TABLE_BYTES * i for i in range(4)]
DATA = 0x10_0000  # request buffers, bump-allocated
DATA_STRIDE_MAX = 8 * KiB  # a fresh buffer takes at most this much of the data area
FUZZ_ENTRIES = 16  # descriptors and ring slots written per queue; the rest stay sentinel
IMAGE_SIZE = 64 * KiB
IMAGE_SECTORS = IMAGE_SIZE // SECTOR_SIZE
U16_MASK = 0xFFFF
U32 = 0xFFFFFFFF
U64_MAX = (1 << 64) - 1
WIDE = 1 << 64
# Alignment of each ring part (§2.7 table), and the order the model checks them in.
RING_ALIGN = {"desc": 16, "avail": 2, "used": 4}
RING_BYTES = {"desc": desc_table_size, "avail": avail_ring_size, "used": used_ring_size}
STATUS_UP_TO_FEATURES = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
UNOFFERED_FEATURE = 40  # a transport feature bit virtio-blk does not offer
KNOWN_TYPES = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
               VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES]
WRITING_TYPES = {"pwrite": {VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES},
                 "punch": {VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES}}
MAX_PUNCH_BYTES = MAX_DISCARD_SECTORS * SECTOR_SIZE
BLK_STATUSES = {VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP}
FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)


def sector_pattern(sector):
    """512 bytes that differ in every sector and every position."""
    return bytes((sector * 7 + i) & 0xFF for i in range(SECTOR_SIZE))


IMAGE = b"".join(sector_pattern(s) for s in range(IMAGE_SECTORS))


load_impl = load_ring


@pytest.fixture(params=["cython", "pure"])
def impl(request, monkeypatch):
    module = load_impl(request.param)
    if module is pure:
        # The pure twin builds its chains from the module global: every read and write
        # the device asks of a chain is then measured against the device's cap.
        monkeypatch.setattr(pure, "Chain", CappedChain)
    return module


@pytest.fixture(scope="module")
def memory():
    with GuestMemory(MEM) as mem:
        yield mem


@pytest.fixture(scope="module")
def image_dir():
    # tmpfs when there is one: FLUSH is an fdatasync and close() an fsync.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="voidbox-blk-fuzz-", dir=base)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


# -- spies --------------------------------------------------------------------------------


class CappedChain(pure.Chain):
    """The pure twin's Chain, recording every length the device reads or writes."""

    __slots__ = ()
    sizes: list[int] = []

    def read(self, offset=0, length=None):
        CappedChain.sizes.append(self.readable - offset if length is None else length)
        return super().read(offset, length)

    def write(self, data, offset=0):
        CappedChain.sizes.append(memoryview(data).nbytes)
        return super().write(data, offset)


class SpyBackend(BlockBackend):
    """Records every image access with the request type being served."""

    def __init__(self, path, readonly):
        super().__init__(path, readonly)
        self.kind = None
        self.log = []

    def pread(self, length, offset):
        self.log.append(("pread", self.kind, offset, length))
        return super().pread(length, offset)

    def pwrite(self, data, offset):
        self.log.append(("pwrite", self.kind, offset, memoryview(data).nbytes))
        super().pwrite(data, offset)

    def punch(self, offset, length, zero):
        self.log.append(("punch", self.kind, offset, length))
        super().punch(offset, length, zero)

    def flush(self):
        self.log.append(("flush", self.kind, 0, 0))
        super().flush()


class SpyBlk(VirtioBlk):
    """VirtioBlk telling its backend which request type it is serving."""

    def _execute(self, chain, kind, sector, data_out, data_in):
        self.backend.kind = kind
        try:
            return super()._execute(chain, kind, sector, data_out, data_in)
        finally:
            self.backend.kind = None


def spy_ring_factory(impl):
    """A ring_factory for the transport whose rings record what they hand the device."""

    class SpyQueue(impl.Virtqueue):
        def pop(self, max_chains=None, require=pure.REQUIRE_ANY):
            chains = super().pop(max_chains, require)
            for c in chains:
                self.outstanding.append((c.head, c.readable, c.writable, c.segments))
                self.segments += c.segments
            self.popped += len(chains)
            return chains

        def push_many(self, completions):
            completions = list(completions)
            segments = []
            for head, written in completions:
                match = [o for o in self.outstanding if o[0] == head]
                assert match, f"completion for head {head}, which the device does not hold"
                _head, readable, writable, segments = match[0]
                self.outstanding.remove(match[0])
                assert written <= writable, f"head {head}: {written} bytes claimed of {writable}"
                # A request with a header and a status byte always reports the status byte;
                # anything else is consumed with nothing written (§5.2.6).
                well_formed = readable >= REQUEST_HEADER.size and writable >= 1
                assert (written >= 1) == well_formed, (head, readable, writable, written)
            if completions and completions[-1][1]:
                # The last request served wrote its status byte last: the last writable
                # byte of its chain (an earlier one may be overwritten by a later request).
                gpa, length, _w = [seg for seg in segments if seg[2] and seg[1]][-1]
                assert self.memory.read(gpa + length - 1, 1)[0] in BLK_STATUSES
            super().push_many(completions)

        def push(self, head, written):
            self.push_many([(head, written)])

    made = []

    def factory(memory, max_size):
        ring = SpyQueue(memory, max_size)
        ring.outstanding, ring.segments, ring.popped = [], [], 0
        made.append(ring)
        return ring

    factory.made = made
    return factory


class Guest:
    """The driver's side of the register file: 32-bit accesses (§4.2.2.2)."""

    def __init__(self, transport):
        self.t = transport

    def r(self, offset):
        return self.t.read(offset, 4)

    def w(self, offset, value):
        self.t.write(offset, 4, value)

    def negotiate(self, features):
        """§3.1.1 steps 1-6; returns the status read back after FEATURES_OK."""
        self.w(VIRTIO_MMIO_STATUS, 0)
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.w(VIRTIO_MMIO_STATUS, STATUS_UP_TO_FEATURES)
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, features >> 32)
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, features & U32)
        self.w(VIRTIO_MMIO_STATUS, STATUS_UP_TO_FEATURES | VIRTIO_CONFIG_S_FEATURES_OK)
        return self.r(VIRTIO_MMIO_STATUS)

    def setup_queue(self, size, desc, avail, used):
        self.w(VIRTIO_MMIO_QUEUE_SEL, 0)
        assert self.r(VIRTIO_MMIO_QUEUE_NUM_MAX) == QUEUE_SIZE
        self.w(VIRTIO_MMIO_QUEUE_NUM, size)
        for low, high, addr in ((VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, desc),
                                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, avail),
                                (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, used)):
            self.w(low, addr & U32)
            self.w(high, addr >> 32)
        self.w(VIRTIO_MMIO_QUEUE_READY, 1)
        return self.r(VIRTIO_MMIO_QUEUE_READY)

    def driver_ok(self):
        self.w(VIRTIO_MMIO_STATUS, self.r(VIRTIO_MMIO_STATUS) | VIRTIO_CONFIG_S_DRIVER_OK)
        return self.r(VIRTIO_MMIO_STATUS)


class Signals:
    """The interrupt line: records InterruptStatus each time an interrupt is signalled."""

    def __init__(self):
        self.transport = None
        self.seen = []

    def __call__(self):
        self.seen.append(self.transport.read(VIRTIO_MMIO_INTERRUPT_STATUS, 4))


def ring_config_valid(size, addrs):
    """The model of §2.7's rules the transport must enforce at QueueReady."""
    if not 1 <= size <= QUEUE_SIZE or size & (size - 1):
        return False
    return all(addrs[part] % RING_ALIGN[part] == 0 and addrs[part] + RING_BYTES[part](size) <= MEM
               for part in RING_ALIGN)


# -- strategies ---------------------------------------------------------------------------


def mostly(valid, hostile, weight=3):
    """Valid values `weight` times out of weight+1, so requests get far enough to matter."""
    return st.sampled_from([True] * weight + [False]).flatmap(lambda ok: valid if ok else hostile)


# Mostly room for several requests: a chain may not be longer than the queue (§2.7.5.3.1).
good_sizes = st.sampled_from([16, 8, 16, 4, 16, 2, 1])
any_sizes = st.one_of(good_sizes, st.sampled_from([0, 3, 12, QUEUE_SIZE, QUEUE_SIZE * 2, 1 << 15,
                                                   1 << 16, U32]))


@st.composite
def ring_address(draw, part, size):
    standard = {"desc": DESC, "avail": AVAIL, "used": USED}[part]
    align = RING_ALIGN[part]
    at_end = (MEM - RING_BYTES[part](size)) % WIDE & ~(align - 1)  # the last place it fits
    choice = draw(st.sampled_from(["standard"] * 3 + ["end", "past-end", "misaligned", "2^64",
                                                       "wild"]))
    if choice == "standard":
        return standard
    if choice == "end":
        return at_end
    if choice == "past-end":
        return (at_end + align) % WIDE
    if choice == "misaligned":
        return standard + draw(st.integers(1, align - 1))
    if choice == "2^64":
        return draw(st.sampled_from([WIDE - 16, WIDE - 4096, 1 << 63, 1 << 32, WIDE - align]))
    return draw(st.integers(0, U64_MAX))


hostile_addresses = st.one_of(
    st.sampled_from([0, MEM - 1, MEM - 16, MEM - SECTOR_SIZE, MEM, U64_MAX - 15, U64_MAX,
                     DESC, AVAIL, USED, TABLES[0]]),
    st.integers(0, MEM),
    st.integers(0, U64_MAX),
)
sectors = mostly(
    st.one_of(st.integers(0, IMAGE_SECTORS + 1), st.sampled_from([IMAGE_SECTORS - 1, IMAGE_SECTORS])),
    st.one_of(st.sampled_from([U64_MAX, 1 << 55, 1 << 63, (U64_MAX >> 9) - 1, WIDE - IMAGE_SECTORS]),
              st.integers(0, U64_MAX)),
)
sector_lengths = st.integers(1, 4).map(lambda n: n * SECTOR_SIZE)
data_lengths = mostly(
    sector_lengths,
    st.one_of(st.sampled_from([0, 1, SECTOR_SIZE - 1, SECTOR_SIZE + 1, 12 * MiB, U32]),
              st.integers(0, 2 * SECTOR_SIZE)),
)
discard_counts = mostly(st.integers(0, 8), st.sampled_from([MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS + 1,
                                                            IMAGE_SECTORS + 1, U32]))
discard_flags = mostly(st.sampled_from([0, 1]), st.integers(0, U32))


@st.composite
def segment(draw, length, writable, fill=None):
    """One data descriptor: (gpa or None for a fresh buffer, length, writable, contents)."""
    addr = draw(mostly(st.none(), hostile_addresses, weight=9))
    return (addr, length, writable, fill)


@st.composite
def request(draw):
    """The descriptors of one request (§5.2.6), mostly well formed."""
    kind = draw(mostly(st.sampled_from(KNOWN_TYPES), st.integers(0, U32), weight=9))
    header = REQUEST_HEADER.pack(kind, draw(mostly(st.just(0), st.integers(0, U32), weight=5)),
                                 draw(sectors))
    header_len = draw(mostly(st.just(REQUEST_HEADER.size), st.sampled_from([0, 8, 12, 15, 17, 32]),
                             weight=7))
    header = header.ljust(header_len, b"\x5c")[:header_len]
    descs = [draw(segment(len(header), False, header))] if header_len else []
    readable, writable = [], []
    if kind == VIRTIO_BLK_T_OUT:
        fill = bytes([draw(st.integers(0, 0xFF))])
        readable = draw(mostly(st.lists(sector_lengths, min_size=1, max_size=3),
                               st.lists(data_lengths, max_size=3)))
        descs += [draw(segment(n, False, fill * min(n, DATA_STRIDE_MAX))) for n in readable]
    elif kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        segs = draw(mostly(st.just(1), st.sampled_from([0, 2])))
        payload = b"".join(DISCARD_SEGMENT.pack(draw(sectors), draw(discard_counts), draw(discard_flags))
                           for _ in range(segs))
        payload = payload[: draw(mostly(st.just(len(payload)), st.integers(0, len(payload))))]
        cut = draw(mostly(st.just(len(payload)), st.integers(0, len(payload))))  # one or two descriptors
        descs += [draw(segment(len(part), False, part)) for part in (payload[:cut], payload[cut:]) if part]
    else:
        descs += [draw(segment(n, False)) for n in draw(mostly(st.just([]), st.lists(data_lengths,
                                                                                      max_size=2)))]
    if kind == VIRTIO_BLK_T_IN:
        writable = draw(mostly(st.lists(sector_lengths, min_size=1, max_size=3),
                               st.lists(data_lengths, max_size=3)))
    elif kind == VIRTIO_BLK_T_GET_ID:
        writable = draw(mostly(st.just([VIRTIO_BLK_ID_BYTES]), st.lists(st.integers(0, 64), max_size=2)))
    else:
        writable = draw(mostly(st.just([]), st.lists(data_lengths, max_size=2)))
    descs += [draw(segment(n, True)) for n in writable]
    status_len = draw(mostly(st.just(1), st.sampled_from([0, 2, 4]), weight=7))
    if status_len:
        descs.append(draw(segment(status_len, True, b"\xaa" * status_len)))
    return {"kind": kind, "descs": descs, "indirect": draw(mostly(st.just(False), st.just(True)))}


raw_descriptor = st.tuples(
    mostly(st.integers(DATA, DATA + 64 * KiB), hostile_addresses),
    mostly(st.integers(0, 4 * SECTOR_SIZE), st.sampled_from([0, 16, 32, 0xFFFF_FFFF])),
    st.one_of(st.integers(0, 7), st.integers(0, U16_MASK)),
    st.one_of(st.integers(0, FUZZ_ENTRIES + 1), st.integers(0, U16_MASK)),
)


@st.composite
def scenarios(draw, hostile_setup=False, readonly=False):
    size = draw(any_sizes if hostile_setup else good_sizes)
    if hostile_setup:
        addrs = {part: draw(ring_address(part, size)) for part in RING_ALIGN}
    else:
        addrs = {"desc": DESC, "avail": AVAIL, "used": USED}
    offered_extra = draw(st.sampled_from([0, 1 << VIRTIO_F_EVENT_IDX]))
    unoffered = draw(mostly(st.just(0), st.just(1 << UNOFFERED_FEATURE), weight=15))
    # Each kick moves avail->idx: to the number of requests written, then by 0, 1 or a
    # whole lap; sometimes anywhere.
    first = draw(mostly(st.just("count"), st.integers(0, U16_MASK), weight=7))
    kicks = [first] + draw(st.lists(mostly(st.sampled_from(["+0", "+size", "+1", "count"]),
                                           st.one_of(st.integers(0, U16_MASK), st.just("+size+1"))),
                                    max_size=2))
    return {
        "size": size,
        "features": (1 << VIRTIO_F_VERSION_1) | offered_extra | unoffered,
        "readonly": readonly,
        "addrs": addrs,
        "requests": draw(st.lists(request(), min_size=1, max_size=6)),
        # (table: None for the queue's own, else an indirect table number; index; descriptor)
        "mutations": draw(st.lists(st.tuples(st.one_of(st.none(), st.integers(0, len(TABLES) - 1)),
                                             st.integers(0, FUZZ_ENTRIES - 1), raw_descriptor),
                                   max_size=3)),
        "filler_heads": draw(st.lists(mostly(st.integers(0, max(min(size, FUZZ_ENTRIES) - 1, 0)),
                                             st.integers(0, U16_MASK), weight=31),
                                      min_size=FUZZ_ENTRIES, max_size=FUZZ_ENTRIES)),
        "avail_flags": draw(st.sampled_from([0, VIRTQ_AVAIL_F_NO_INTERRUPT])),
        "used_event": draw(st.integers(0, U16_MASK)),
        "kicks": kicks,
    }


# -- one example ----------------------------------------------------------------------------


class Shadow:
    """Guest memory as the driver last wrote it: the device may change only allowed bytes."""

    def __init__(self, memory):
        self.memory = memory
        self.before = memory.numpy().copy()

    def write(self, gpa, data):
        self.memory.write(gpa, data)
        self.before[gpa : gpa + len(data)] = np.frombuffer(data, np.uint8)


def write_requests(drv, sc):
    """Lay out the scenario's requests as chains; returns their heads in order."""
    entries = min(drv.size, FUZZ_ENTRIES)
    next_free = 0
    tables = list(TABLES)
    data_next = DATA
    heads = []
    for req in sc["requests"]:
        placed = []
        for addr, length, writable, fill in req["descs"]:
            if addr is None:
                addr = data_next
                data_next += (min(max(length, 1), DATA_STRIDE_MAX) + 15) & ~15
                if fill:
                    drv.memory.write(addr, fill[:length])
            placed.append((addr, length, writable))
        if not placed:
            continue
        if req["indirect"] and tables:
            if next_free >= entries:
                break
            table = tables.pop(0)
            table_entries = []
            for i, (addr, length, writable) in enumerate(placed):
                last = i == len(placed) - 1
                flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if writable else 0)
                table_entries.append((addr, length, flags, 0 if last else i + 1))
            for i, entry in enumerate(table_entries):
                drv.write_desc(i, *entry, table=table)
            drv.write_desc(next_free, table, VIRTQ_DESC_SIZE * len(table_entries),
                           VIRTQ_DESC_F_INDIRECT)
            heads.append(next_free)
            next_free += 1
            continue
        if next_free + len(placed) > entries:
            continue  # a smaller request may still fit
        for i, (addr, length, writable) in enumerate(placed):
            last = i == len(placed) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if writable else 0)
            drv.write_desc(next_free + i, addr, length, flags, 0 if last else next_free + i + 1)
        heads.append(next_free)
        next_free += len(placed)
    for table, index, (addr, length, flags, nxt) in sc["mutations"]:
        if index < entries or table is not None:
            drv.write_desc(index, addr, length, flags, nxt, table=None if table is None else TABLES[table])
    return heads


def kick_index(value, previous, count, size):
    if isinstance(value, int):
        return value
    if value == "count":
        return count
    return (previous + {"+0": 0, "+1": 1, "+size": size, "+size+1": size + 1}[value]) & U16_MASK


def check_image(path, backend, readonly):
    """The image changed only where a write-type request inside it wrote."""
    assert os.path.getsize(path) == IMAGE_SIZE, "the image changed size"
    mutated = []
    for op, kind, offset, length in backend.log:
        assert 0 <= offset and offset + length <= IMAGE_SIZE, f"{op} outside the image: {offset}+{length}"
        if op == "pread":
            assert kind == VIRTIO_BLK_T_IN and length <= MAX_REQUEST_BYTES
        elif op == "flush":
            assert kind == VIRTIO_BLK_T_FLUSH and not readonly
        else:
            assert not readonly, f"{op} on a read-only image"
            assert kind in WRITING_TYPES[op], f"{op} while serving request type {kind}"
            assert length <= (MAX_REQUEST_BYTES if op == "pwrite" else MAX_PUNCH_BYTES)
            mutated.append((offset, length))
    after = np.frombuffer(Path(path).read_bytes(), np.uint8)
    changed = after != np.frombuffer(IMAGE, np.uint8)
    for offset, length in mutated:
        changed[offset : offset + length] = False
    assert not changed.any(), f"image bytes changed outside any write: {np.flatnonzero(changed)[:4]}"
    return len(mutated)


def model_kicks(memory, size, last_avail, avail_idx, ring_addr):
    """-> (new last_avail, broken) for one kick, as §2.7 allows the device to see it."""
    pending = (avail_idx - last_avail) & U16_MASK
    if pending > size:
        return last_avail, True
    for _ in range(pending):
        slot = ring_addr + VIRTQ_RING_HEADER_SIZE + VIRTQ_AVAIL_ELEM_SIZE * (last_avail & (size - 1))
        if struct.unpack("<H", memory.read(slot, 2))[0] >= size:
            return last_avail, True
        last_avail = (last_avail + 1) & U16_MASK
    return last_avail, False


def play(impl, memory, image_dir, sc):
    memory.numpy().fill(SENTINEL)
    path = image_dir / "disk.img"
    path.write_bytes(IMAGE)
    backend = SpyBackend(str(path), readonly=sc["readonly"])
    factory = spy_ring_factory(impl)
    signals = Signals()
    device = SpyBlk(backend)
    transport = VirtioMmioTransport(device, memory, signals, ring_factory=factory)
    signals.transport = transport
    guest = Guest(transport)
    CappedChain.sizes.clear()
    try:
        size, addrs = sc["size"], sc["addrs"]
        features_ok = bool(guest.negotiate(sc["features"]) & VIRTIO_CONFIG_S_FEATURES_OK)
        assert features_ok == (sc["features"] & ~device.features == 0)
        ready = guest.setup_queue(size, addrs["desc"], addrs["avail"], addrs["used"])
        valid = ring_config_valid(size, addrs)
        assert ready == valid, f"QueueReady {ready} for size {size} at {addrs}"
        if not valid:
            event("queue refused")
            assert guest.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
            assert signals.seen and signals.seen[-1] & VIRTIO_MMIO_INT_CONFIG
            assert transport.queue_errors == 1 and transport.last_error
        drv, heads = None, []
        if valid:
            drv = Driver(memory, size=size, desc_addr=addrs["desc"], avail_addr=addrs["avail"],
                         used_addr=addrs["used"])
            memory.write(addrs["avail"], bytes(avail_ring_size(size)))
            memory.write(addrs["used"], bytes(used_ring_size(size)))
            heads = write_requests(drv, sc)
            slots = heads + sc["filler_heads"][len(heads):]
            for slot, head in enumerate(slots[: min(size, FUZZ_ENTRIES)]):
                drv.set_avail_slot(slot, head)
            drv.set_avail_flags(sc["avail_flags"])
            drv.set_used_event(sc["used_event"])
        status = guest.driver_ok()
        live = valid and features_ok
        assert bool(status & VIRTIO_CONFIG_S_DRIVER_OK) == live
        shadow = Shadow(memory)
        last_avail, broken, idx = 0, False, 0
        for value in sc["kicks"]:
            idx = kick_index(value, idx, len(heads), size)
            if valid:
                shadow.write(addrs["avail"] + RING_IDX_OFFSET, struct.pack("<H", idx))
            if live and not broken:
                last_avail, broken = model_kicks(memory, size, last_avail, idx, addrs["avail"])
            guest.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        rings = factory.made
        ring = rings[0] if valid else None
        if ring is not None:
            assert ring.outstanding == [], "chains popped and never completed"
            assert ring.in_flight == 0

        # Guest memory: only the used ring and writable segments handed to the device.
        changed = memory.numpy() != shadow.before
        if ring is not None:
            used_end = addrs["used"] + used_ring_size(size)
            avail_changed = changed[addrs["avail"] : addrs["avail"] + avail_ring_size(size)].any()
            # The driver's own avail->idx writes land in the used ring if the two overlap.
            used_clobbered = (addrs["avail"] < used_end
                              and addrs["used"] < addrs["avail"] + avail_ring_size(size))
            for gpa, length, writable in ring.segments:
                assert 0 <= gpa and gpa + length <= MEM, f"segment {gpa:#x}+{length:#x} outside RAM"
                if writable:
                    changed[gpa : gpa + length] = False
                    used_clobbered |= gpa < used_end and addrs["used"] < gpa + length
            changed[addrs["used"] : used_end] = False
            event(f"chains served: {min(ring.popped, 3)}+, malformed: {min(ring.malformed, 2)}+")
        assert not changed.any(), f"guest memory written outside: {np.flatnonzero(changed)[:4]}"

        # DEVICE_NEEDS_RESET exactly when the queue was refused or found corrupt (§2.1.2).
        needs_reset = bool(guest.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET)
        config_irq = bool(guest.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG)
        assert needs_reset == config_irq == (transport.queue_errors > 0)
        assert transport.queue_errors <= 1
        if ring is not None and not avail_changed:
            # The model read the ring the device read: the device wrote nothing into it.
            assert needs_reset == broken, f"model broken={broken}, {transport.last_error!r}"
        event(f"needs reset: {needs_reset}")
        if ring is not None and not used_clobbered:
            assert drv.used_idx == ring.used_idx == (ring.popped + ring.malformed) & U16_MASK
            # Without EVENT_IDX a completion notifies unless the driver suppressed it
            # (§2.7.7); a ring found corrupt stops the device before it notifies.
            if (not ring.event_idx and ring.used_idx and not avail_changed
                    and not sc["avail_flags"] and not needs_reset):
                assert VIRTIO_MMIO_INT_VRING & guest.r(VIRTIO_MMIO_INTERRUPT_STATUS)
        if not live:
            assert device.counters["requests"] == 0
    finally:
        backend.close()
    writes = check_image(path, backend, sc["readonly"])
    event(f"image writes: {min(writes, 2)}+")
    assert all(n <= MAX_REQUEST_BYTES for n in CappedChain.sizes)


@FUZZ_SETTINGS
@given(sc=scenarios())
def test_hostile_rings_and_requests(impl, memory, image_dir, sc):
    """A queue set up as the spec asks, with hostile rings and requests behind it."""
    play(impl, memory, image_dir, sc)


@settings(FUZZ_SETTINGS, max_examples=50)
@given(sc=scenarios(hostile_setup=True))
def test_hostile_queue_setup(impl, memory, image_dir, sc):
    """QueueNum and ring addresses at random too (0, not a power of two, near 2^64...)."""
    play(impl, memory, image_dir, sc)


@settings(FUZZ_SETTINGS, max_examples=50)
@given(sc=scenarios(readonly=True))
def test_readonly_disk_under_hostile_requests(impl, memory, image_dir, sc):
    """--readonly: no request, well formed or not, reaches a write, punch or flush."""
    play(impl, memory, image_dir, sc)


# -- the register file under random accesses ---------------------------------------------------

REGISTERS = [VIRTIO_MMIO_STATUS, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY,
             VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
             VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
             VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL,
             VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_CONFIG]
register_values = st.one_of(
    st.sampled_from([0, 1, 2, 8, 16, 0xF, 0x4F, 0xCF, DESC, AVAIL, USED, U32, 1 << 29]),
    st.integers(0, U32),
    st.integers(0, U64_MAX),
)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.booleans(),
                              st.one_of(st.sampled_from(REGISTERS), st.integers(0, 0x200)),
                              st.sampled_from([4, 4, 4, 1, 2, 8]), register_values),
                    max_size=40))
def test_random_register_accesses(impl, memory, image_dir, ops):
    """No access of any width, offset or value makes the transport raise; a reset recovers."""
    memory.numpy().fill(SENTINEL)
    path = image_dir / "regs.img"
    path.write_bytes(IMAGE)
    backend = SpyBackend(str(path), readonly=False)
    try:
        transport = VirtioMmioTransport(SpyBlk(backend), memory, lambda: None,
                                        ring_factory=impl.Virtqueue)
        for is_read, offset, width, value in ops:
            if is_read:
                assert 0 <= transport.read(offset, width) < 1 << (8 * width)
            else:
                transport.write(offset, width, value)
        transport.write(VIRTIO_MMIO_STATUS, 4, 0)
        assert transport.read(VIRTIO_MMIO_STATUS, 4) == 0
        assert transport.device.queues == () and transport.interrupt_status == 0
    finally:
        backend.close()
    check_image(path, backend, readonly=False)


# -- explicit cases from NET-LESSONS' virtqueue list ------------------------------------------


class Rig:
    """virtio-blk behind the transport, queue 0 live at the standard rings."""

    def __init__(self, impl, memory, path, size=QUEUE_SIZE, readonly=False):
        memory.numpy().fill(0)
        self.memory = memory
        self.backend = SpyBackend(str(path), readonly)
        self.signals = Signals()
        self.factory = spy_ring_factory(impl)
        self.device = SpyBlk(self.backend)
        self.transport = VirtioMmioTransport(self.device, memory, self.signals, ring_factory=self.factory)
        self.signals.transport = self.transport
        self.guest = Guest(self.transport)
        self.drv = Driver(memory, size=size, desc_addr=DESC, avail_addr=AVAIL, used_addr=USED)
        self.drv._data_next = DATA
        self.drv._indirect_next = TABLES[0]
        assert self.guest.negotiate(1 << VIRTIO_F_VERSION_1) & VIRTIO_CONFIG_S_FEATURES_OK
        assert self.guest.setup_queue(size, DESC, AVAIL, USED) == 1
        assert self.guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK

    def header(self, kind, sector=0):
        data = REQUEST_HEADER.pack(kind, 0, sector)
        return self.drv.alloc(len(data), data)

    def status_byte(self):
        return self.drv.alloc(1, b"\xaa")

    def kick(self):
        self.guest.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        return self.drv.collect()

    def close(self):
        self.backend.close()


@pytest.fixture
def rig(impl, memory, image_dir):
    path = image_dir / "explicit.img"
    path.write_bytes(IMAGE)
    rigs = []

    def _make(**kwargs):
        rigs.append(Rig(impl, memory, path, **kwargs))
        return rigs[-1]

    yield _make
    for r in rigs:
        r.close()
        check_image(path, r.backend, readonly=False)


@pytest.mark.parametrize("shape", ["self", "pair", "indirect"])
def test_a_loop_over_one_sector_claiming_64k_writes_nothing(rig, shape):
    """One 512-byte buffer repeated by a cycle "assembles" 64 KiB: malformed, not written."""
    r = rig()
    drv, nxt = r.drv, VIRTQ_DESC_F_NEXT
    buffer = drv.alloc(SECTOR_SIZE, b"\xee" * SECTOR_SIZE)
    header = r.header(VIRTIO_BLK_T_OUT)
    if shape == "indirect":
        table, nbytes = drv.indirect_table([(header, REQUEST_HEADER.size, nxt, 1),
                                            (buffer, SECTOR_SIZE, nxt, 1)])
        drv.write_desc(0, table, nbytes, VIRTQ_DESC_F_INDIRECT)
    else:
        drv.write_desc(0, header, REQUEST_HEADER.size, nxt, 1)
        drv.write_desc(1, buffer, SECTOR_SIZE, nxt, 1 if shape == "self" else 2)
        drv.write_desc(2, buffer, SECTOR_SIZE, nxt, 1)
    drv.offer(0)
    assert r.kick() == [(0, 0)]
    assert r.device.counters["requests"] == 0 and r.factory.made[0].malformed == 1
    assert r.backend.log == []
    assert r.signals.seen == [VIRTIO_MMIO_INT_VRING]  # retired, and the driver told
    # The queue carries on.
    data_in = drv.alloc(SECTOR_SIZE)
    status = r.status_byte()
    drv.add_chain([(r.header(VIRTIO_BLK_T_IN, 3), REQUEST_HEADER.size, False),
                   (data_in, SECTOR_SIZE, True), (status, 1, True)])
    assert [n for _, n in r.kick()] == [SECTOR_SIZE + 1]
    assert r.memory.read(data_in, SECTOR_SIZE) == sector_pattern(3)


def test_next_beyond_the_queue_size_executes_no_prefix(rig):
    r = rig(size=8)
    drv = r.drv
    head = drv.free.pop(0)
    data = drv.alloc(SECTOR_SIZE, b"\x11" * SECTOR_SIZE)
    drv.write_desc(head, r.header(VIRTIO_BLK_T_OUT), REQUEST_HEADER.size, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, data, SECTOR_SIZE, VIRTQ_DESC_F_NEXT, 8 + 3)
    drv.offer(head)
    assert r.kick() == [(head, 0)]
    assert r.backend.log == [] and r.device.counters["requests"] == 0


def test_one_kick_claiming_65535_entries_serves_nothing_and_needs_reset(rig):
    r = rig(size=8)
    r.drv.add_chain([(r.header(VIRTIO_BLK_T_OUT), REQUEST_HEADER.size, False),
                     (r.drv.alloc(SECTOR_SIZE), SECTOR_SIZE, False), (r.status_byte(), 1, True)],
                    publish=False)
    r.drv.set_avail_idx(U16_MASK)
    used_before = r.memory.read(USED, used_ring_size(8))
    assert r.kick() == []
    assert r.guest.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert r.signals.seen == [VIRTIO_MMIO_INT_CONFIG]
    assert r.memory.read(USED, used_ring_size(8)) == used_before
    assert r.backend.log == []


def test_ring_offsets_wrap_modulo_the_queue_size(rig):
    """Three laps of a four-entry ring (indirect requests): every slot taken modulo the size."""
    size = 4  # an indirect table may hold at most `size` descriptors; a request takes three
    r = rig(size=size)
    for lap in range(3):
        reads = []
        for k in range(size):
            sector = lap * size + k
            data = r.drv.alloc(SECTOR_SIZE)
            reads.append((sector, data))
            r.drv.add_indirect([(r.header(VIRTIO_BLK_T_IN, sector), REQUEST_HEADER.size, False),
                                (data, SECTOR_SIZE, True), (r.status_byte(), 1, True)])
        assert [n for _, n in r.kick()] == [SECTOR_SIZE + 1] * size
        r.drv.free = list(range(size))
        for sector, data in reads:
            assert r.memory.read(data, SECTOR_SIZE) == sector_pattern(sector)


SPARSE_IMAGE_SIZE = 1 << 30  # large enough that only the cap refuses a big request
SPARSE_SECTORS = SPARSE_IMAGE_SIZE // SECTOR_SIZE
ALIAS_MAX = 12 * MiB  # one buffer, repeated: what fits in 16 MiB of RAM beside the rings


@settings(FUZZ_SETTINGS, max_examples=50)
# Exactly the cap, one sector over it, and exactly the image's end: the boundaries.
@example(VIRTIO_BLK_T_IN, MAX_REQUEST_BYTES // 4, 4, False, 0)
@example(VIRTIO_BLK_T_OUT, MAX_REQUEST_BYTES // 4, 4, True, 0)
@example(VIRTIO_BLK_T_OUT, MAX_REQUEST_BYTES // 4 + SECTOR_SIZE // 4, 4, False, 0)
@example(VIRTIO_BLK_T_IN, 8 * MiB, 1, True, SPARSE_SECTORS - 8 * MiB // SECTOR_SIZE)
@example(VIRTIO_BLK_T_IN, 8 * MiB, 1, False, SPARSE_SECTORS - 8 * MiB // SECTOR_SIZE + 1)
@given(direction=st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT]),
       length=st.one_of(st.sampled_from([SECTOR_SIZE, 4 * KiB, MiB, 4 * MiB, 8 * MiB, ALIAS_MAX]),
                        st.integers(1, ALIAS_MAX)),
       copies=st.integers(1, 16),
       indirect=st.booleans(),
       sector=st.one_of(st.integers(0, 64), st.integers(SPARSE_SECTORS - 2 * ALIAS_MAX // SECTOR_SIZE,
                                                        SPARSE_SECTORS)))
def test_claims_around_the_request_cap(impl, memory, image_dir, direction, length, copies,
                                       indirect, sector):
    """One buffer repeated up to 16 times (NET-LESSONS: aliasing describes more than the
    guest has): served exactly when whole sectors, inside the image and at most
    MAX_REQUEST_BYTES; otherwise IOERR with no image access and nothing allocated."""
    path = image_dir / "sparse.img"
    path.write_bytes(b"")  # also frees what the last example wrote
    os.truncate(path, SPARSE_IMAGE_SIZE)
    total = copies * length
    fits = total % SECTOR_SIZE == 0 and total <= MAX_REQUEST_BYTES and (
        (sector << SECTOR_SHIFT) + total <= SPARSE_IMAGE_SIZE)
    r = Rig(impl, memory, path)
    try:
        CappedChain.sizes.clear()
        drv = r.drv
        big = drv.alloc(length)
        status = r.status_byte()
        writable = direction == VIRTIO_BLK_T_IN
        bufs = ([(r.header(direction, sector), REQUEST_HEADER.size, False)]
                + [(big, length, writable)] * copies + [(status, 1, True)])
        head = drv.add_indirect(bufs) if indirect else drv.add_chain(bufs)
        assert r.kick() == [(head, 1 + (total if fits and writable else 0))]
        assert memory.read(status, 1)[0] == (VIRTIO_BLK_S_OK if fits else VIRTIO_BLK_S_IOERR)
        op = "pread" if writable else "pwrite"
        assert r.backend.log == ([(op, direction, sector << SECTOR_SHIFT, total)] if fits else [])
        assert all(n <= MAX_REQUEST_BYTES for n in CappedChain.sizes)
    finally:
        r.close()
    assert os.path.getsize(path) == SPARSE_IMAGE_SIZE
    event(f"served: {fits}, {'over' if total > MAX_REQUEST_BYTES else 'under'} the cap")


@pytest.mark.parametrize("direction", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
def test_an_aliased_indirect_claim_beyond_the_cap_touches_neither_image_nor_memory(
        impl, memory, image_dir, direction):
    """Indirect descriptors repeating one 5 MiB buffer claim more than MAX_REQUEST_BYTES:
    refused with IOERR before any allocation, image access or guest write."""
    path = image_dir / "sparse.img"
    path.write_bytes(b"")
    os.truncate(path, 1 << 30)  # large enough that only the cap refuses the request
    alias = 5 * MiB
    copies = MAX_REQUEST_BYTES // alias + 1
    assert copies * alias > MAX_REQUEST_BYTES
    r = Rig(impl, memory, path)
    try:
        CappedChain.sizes.clear()
        drv = r.drv
        big = drv.alloc(alias)
        status = r.status_byte()
        writable = direction == VIRTIO_BLK_T_IN
        table, nbytes = drv.indirect_table(
            [(r.header(direction), REQUEST_HEADER.size, VIRTQ_DESC_F_NEXT, 1)]
            + [(big, alias, VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if writable else 0), i + 2)
               for i in range(copies)]
            + [(status, 1, VIRTQ_DESC_F_WRITE, 0)])
        head = drv.free.pop(0)
        drv.write_desc(head, table, nbytes, VIRTQ_DESC_F_INDIRECT)
        drv.offer(head)
        before = memory.numpy()[big : big + alias].copy()
        assert r.kick() == [(head, 1)]
        assert memory.read(status, 1)[0] == VIRTIO_BLK_S_IOERR
        assert r.backend.log == []
        assert (memory.numpy()[big : big + alias] == before).all()
        assert all(n <= MAX_REQUEST_BYTES for n in CappedChain.sizes)
    finally:
        r.close()
    assert os.path.getsize(path) == 1 << 30


@pytest.mark.parametrize("part", list(RING_ALIGN))
def test_rings_at_the_very_end_of_ram_work_and_one_step_further_needs_reset(
        impl, memory, image_dir, part):
    size = 8
    path = image_dir / "end.img"
    path.write_bytes(IMAGE)
    end = (MEM - RING_BYTES[part](size)) & ~(RING_ALIGN[part] - 1)
    for addr, usable in ((end, True), (end + RING_ALIGN[part], False)):
        addrs = {"desc": DESC, "avail": AVAIL, "used": USED, part: addr}
        memory.numpy().fill(0)
        backend = BlockBackend(str(path))
        signals = Signals()
        transport = VirtioMmioTransport(VirtioBlk(backend), memory, signals, ring_factory=impl.Virtqueue)
        signals.transport = transport
        guest = Guest(transport)
        try:
            guest.negotiate(1 << VIRTIO_F_VERSION_1)
            assert guest.setup_queue(size, addrs["desc"], addrs["avail"], addrs["used"]) == usable
            if not usable:
                assert guest.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
                assert signals.seen == [VIRTIO_MMIO_INT_CONFIG]
                continue
            assert guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK
            drv = Driver(memory, size=size, desc_addr=addrs["desc"], avail_addr=addrs["avail"],
                         used_addr=addrs["used"])
            drv._data_next = DATA  # the mock's default data area lies beyond 16 MiB
            header = REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, IMAGE_SECTORS - 1)
            data, status = drv.alloc(SECTOR_SIZE), drv.alloc(1)
            drv.add_chain([(drv.alloc(len(header), header), len(header), False),
                           (data, SECTOR_SIZE, True), (status, 1, True)])
            guest.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0)
            assert [n for _, n in drv.collect()] == [SECTOR_SIZE + 1]
            assert memory.read(data, SECTOR_SIZE) == sector_pattern(IMAGE_SECTORS - 1)
            assert signals.seen == [VIRTIO_MMIO_INT_VRING]
            guest.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
        finally:
            backend.close()
