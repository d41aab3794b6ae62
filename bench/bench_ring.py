"""Split virtqueue throughput, device side: `.venv/bin/pytest bench/bench_ring.py --benchmark-only -q`.

The ring is pre-filled once (descriptor table and available slots); each round the
"driver" only moves avail->idx forward (re-offering the chains just retired), so the time is the device's:
pop, read (TX) or write (RX), push. Compiled batch path (Cython caller of _ring.pxd),
compiled Python-level API and the pure-Python twin run in the same session, as does a
64 KiB scatter-gather copy beside a plain 64 KiB memcpy.
"""

import struct

import pytest

import voidbox._ring_py as pure
from tests.virtio_driver import DATA_ADDR, Driver
from voidbox.layout import MiB
from voidbox.memory import GuestMemory
from voidbox.ring import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

QUEUE_SIZE = 256
SEG_BYTES = 64  # bytes per descriptor in the throughput runs
ROUNDS = 64  # batches per benchmark call (Cython batch path)
SG_SEGMENTS = 16
SG_BYTES = 64 * 1024
_U16 = struct.Struct("<H")


def compiled():
    try:
        import voidbox._ring as module
    except ImportError:
        pytest.skip("voidbox._ring is not built")
    return module


def impl_named(name):
    return compiled() if name == "cython" else pure


def prefill(memory, impl, ndesc, layout, writable=False):
    """A queue whose every avail slot names a ready chain of `ndesc` descriptors.

    Returns (driver, queue, batch): `batch` distinct chains are offered per round.
    """
    drv = Driver(memory, size=QUEUE_SIZE)
    flag = VIRTQ_DESC_F_WRITE if writable else 0
    if layout == "direct":
        batch = QUEUE_SIZE // ndesc
        for c in range(batch):
            for k in range(ndesc):
                i = c * ndesc + k
                last = k == ndesc - 1
                drv.write_desc(i, DATA_ADDR + SEG_BYTES * i, SEG_BYTES,
                               flag | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1)
        heads = [c * ndesc for c in range(batch)]
    else:  # one indirect table of ndesc entries per head (§2.7.5.3), as Linux does
        batch = QUEUE_SIZE
        for c in range(batch):
            entries = []
            for k in range(ndesc):
                last = k == ndesc - 1
                entries.append((DATA_ADDR + SEG_BYTES * (c * ndesc + k), SEG_BYTES,
                                flag | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else k + 1))
            table, nbytes = drv.indirect_table(entries)
            drv.write_desc(c, table, nbytes, VIRTQ_DESC_F_INDIRECT)
        heads = list(range(batch))
    for slot in range(QUEUE_SIZE):
        drv.set_avail_slot(slot, heads[slot % batch])
    q = drv.configure(impl.Virtqueue(memory, max_size=QUEUE_SIZE))
    return drv, q, batch


@pytest.fixture
def memory():
    with GuestMemory(64 * MiB) as mem:
        yield mem


def mean(benchmark):
    """Median time of one call: this host is noisy (2 shared cores), so not the mean."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats else None


CASES = [(1, "direct"), (4, "direct"), (16, "direct"), (4, "indirect"), (16, "indirect")]


@pytest.mark.parametrize("ndesc,layout", CASES)
def test_cython_batch_tx(benchmark, memory, ring_bench, record, ndesc, layout):
    _, q, batch = prefill(memory, compiled(), ndesc, layout)
    scratch = bytearray(SEG_BYTES * ndesc)
    chains, nbytes = benchmark(ring_bench.run_tx, q, ROUNDS, batch, scratch)
    assert chains >= ROUNDS and nbytes == chains * SEG_BYTES * ndesc
    assert q.malformed == 0 and q.in_flight == 0
    if mean(benchmark):
        record(f"cython pop_batch TX {ndesc} desc {layout}", chains / mean(benchmark), "chains/s")


@pytest.mark.parametrize("ndesc,layout", CASES[:1] + CASES[3:])
def test_cython_batch_rx(benchmark, memory, ring_bench, record, ndesc, layout):
    _, q, batch = prefill(memory, compiled(), ndesc, layout, writable=True)
    frame = bytes(range(256)) * (SEG_BYTES * ndesc // 256) or bytes(SEG_BYTES * ndesc)
    chains, nbytes = benchmark(ring_bench.run_rx, q, ROUNDS, batch, frame)
    assert chains >= ROUNDS and nbytes == chains * len(frame)
    if mean(benchmark):
        record(f"cython pop_batch RX {ndesc} desc {layout}", chains / mean(benchmark), "chains/s")


@pytest.mark.parametrize("impl_name", ["cython", "pure"])
@pytest.mark.parametrize("ndesc,layout", CASES)
def test_python_api_tx(benchmark, memory, record, impl_name, ndesc, layout):
    drv, q, batch = prefill(memory, impl_named(impl_name), ndesc, layout)
    scratch = bytearray(SEG_BYTES * ndesc)
    view = memoryview(memory.mmap)
    idx_off = drv.avail_addr + 2  # gpa == mapping offset in the low region
    state = {"idx": 0}

    def one_batch():
        state["idx"] = (state["idx"] + batch) & 0xFFFF
        _U16.pack_into(view, idx_off, state["idx"])
        chains = q.pop()
        for chain in chains:
            chain.read_into(scratch)
        q.push_many([(chain.head, 0) for chain in chains])
        return len(chains)

    assert benchmark(one_batch) == batch
    assert q.malformed == 0 and q.in_flight == 0
    view.release()
    if mean(benchmark):
        record(f"{impl_name} pop() TX {ndesc} desc {layout}", batch / mean(benchmark), "chains/s")


@pytest.fixture(scope="module")
def sg_chain_memory():
    with GuestMemory(64 * MiB) as mem:
        drv = Driver(mem, size=QUEUE_SIZE)
        seg = SG_BYTES // SG_SEGMENTS
        drv.add_chain([(drv.alloc(seg, bytes([i]) * seg), seg, False) for i in range(SG_SEGMENTS)])
        yield mem, drv


@pytest.mark.parametrize("impl_name", ["cython", "pure"])
def test_sg_read_into_64k(benchmark, sg_chain_memory, record, impl_name):
    mem, drv = sg_chain_memory
    q = Driver(mem, size=QUEUE_SIZE).configure(impl_named(impl_name).Virtqueue(mem))
    [chain] = q.pop()
    dst = bytearray(SG_BYTES)
    assert benchmark(chain.read_into, dst) == SG_BYTES
    assert dst == b"".join(bytes([i]) * (SG_BYTES // SG_SEGMENTS) for i in range(SG_SEGMENTS))
    if mean(benchmark):
        record(f"{impl_name} Chain.read_into 64 KiB, 16 segments", SG_BYTES / mean(benchmark) / MiB,
               "MiB/s")


def test_memcpy_64k(benchmark, sg_chain_memory, record):
    mem, _ = sg_chain_memory
    src = memoryview(mem.mmap)[DATA_ADDR : DATA_ADDR + SG_BYTES]
    dst = bytearray(SG_BYTES)

    def copy():
        dst[:] = src

    benchmark(copy)
    src.release()
    if mean(benchmark):
        record("memcpy 64 KiB (bytearray slice assignment)", SG_BYTES / mean(benchmark) / MiB,
               "MiB/s")


def test_cython_chain_read_vs_memcpy_64k(benchmark, sg_chain_memory, ring_bench, record):
    """C-level: chain_read of a 16-segment chain vs one memcpy, 100 copies per call."""
    mem, _ = sg_chain_memory
    q = Driver(mem, size=QUEUE_SIZE).configure(compiled().Virtqueue(mem))
    assert len(ring_bench.pop_batch_summary(q, 1, 0)) == 1  # leaves the chain in q.chains[0]
    dst = bytearray(SG_BYTES)
    assert benchmark(ring_bench.gather_loop, q, dst, 100) == SG_BYTES
    if mean(benchmark):
        record("cython chain_read 64 KiB, 16 segments (C loop)", 100 * SG_BYTES / mean(benchmark) / MiB,
               "MiB/s")


def test_c_memcpy_64k(benchmark, sg_chain_memory, ring_bench, record):
    mem, _ = sg_chain_memory
    src = bytes(memoryview(mem.mmap)[DATA_ADDR : DATA_ADDR + SG_BYTES])
    dst = bytearray(SG_BYTES)
    benchmark(ring_bench.memcpy_loop, dst, src, 100)
    if mean(benchmark):
        record("memcpy 64 KiB (C loop)", 100 * SG_BYTES / mean(benchmark) / MiB, "MiB/s")
