"""kvm_run decoding: synthetic kvm_run buffers through the C and pure-Python decoders.

No /dev/kvm: each test builds a buffer laid out as struct kvm_run (linux/kvm.h) and
checks both decoders return the same, expected value, hostile layouts included.
"""

import ctypes
import errno
import importlib
import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.requires import missing
from tests.twins import pure_only
from voidbox import exits
from voidbox.errors import UsageError, VoidboxError
from voidbox.exits import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MalformedExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
)

# A missing build fails here unless VOIDBOX_PURE=1 asked for the pure twin alone.
_kvm = None if pure_only() else importlib.import_module("voidbox._kvm")

DECODERS = [pytest.param(exits.decode_exit, id="python")]
if _kvm is not None:
    DECODERS.append(pytest.param(_kvm.decode_exit, id="cython"))
else:
    DECODERS.append(pytest.param(None, id="cython", marks=pytest.mark.skip("VOIDBOX_PURE=1: pure twin only")))

RUN_SIZE = 3 * 4096  # KVM_GET_VCPU_MMAP_SIZE on x86_64: kvm_run, PIO page, coalesced MMIO
PIO_DATA_OFFSET = 4096  # where KVM puts the I/O data (KVM_PIO_PAGE_OFFSET pages)
PROT_NONE = 0  # <sys/mman.h>; the mmap module does not export it


def kvm_run(reason, size=RUN_SIZE):
    run = bytearray(size)
    struct.pack_into("<I", run, exits.KVM_RUN_EXIT_REASON, reason)
    return run


def io_run(direction, size, port, count, data_offset=PIO_DATA_OFFSET, data=b"", run_size=RUN_SIZE):
    run = kvm_run(exits.KVM_EXIT_IO, run_size)
    struct.pack_into("<BBHIQ", run, exits.KVM_RUN_IO_DIRECTION, direction, size, port, count, data_offset)
    if data:
        run[data_offset : data_offset + len(data)] = data
    return run


def mmio_run(addr, length, is_write, data=b""):
    run = kvm_run(exits.KVM_EXIT_MMIO)
    struct.pack_into("<Q", run, exits.KVM_RUN_MMIO_PHYS_ADDR, addr)
    run[exits.KVM_RUN_MMIO_DATA : exits.KVM_RUN_MMIO_DATA + len(data)] = data
    struct.pack_into("<IB", run, exits.KVM_RUN_MMIO_LEN, length, is_write)
    return run


@pytest.fixture(params=DECODERS)
def decode(request):
    return request.param


def test_kvm_error_is_typed_and_one_line():
    if _kvm is None:
        pytest.skip("VOIDBOX_PURE=1: pure twin only")
    error = _kvm.KvmError("KVM_CREATE_VM", errno.ENOMEM)
    assert (error.op, error.errno) == ("KVM_CREATE_VM", errno.ENOMEM)
    assert str(error) == f"KVM_CREATE_VM failed: {os.strerror(errno.ENOMEM)} (errno {errno.ENOMEM})"
    assert isinstance(error, VoidboxError)
    detail = _kvm.KvmError("KVM_SET_MSRS", 0, "MSR 0x10 rejected (0 of 1 set)")
    assert str(detail) == "KVM_SET_MSRS failed: MSR 0x10 rejected (0 of 1 set)"


def test_offsets_match_the_c_header():
    if _kvm is None:
        pytest.skip("VOIDBOX_PURE=1: pure twin only")
    for name, offset in _kvm.KVM_RUN_OFFSETS.items():
        assert getattr(exits, name) == offset, name


@pytest.mark.parametrize("size", [1, 2, 4])
def test_io_out(decode, size):
    data = bytes(range(1, size + 1))
    run = io_run(exits.KVM_EXIT_IO_OUT, size, 0x3F8, 1, data=data)
    assert decode(run) == IoExit(0x3F8, size, True, 1, data)


def test_io_out_string(decode):
    # rep outsw: count elements of size bytes, back to back in the data page.
    data = bytes(range(12))
    run = io_run(exits.KVM_EXIT_IO_OUT, 2, 0x1F0, 6, data=data)
    assert decode(run) == IoExit(0x1F0, 2, True, 6, data)


def test_io_in_has_no_data(decode):
    run = io_run(exits.KVM_EXIT_IO_IN, 4, 0xCFC, 1, data=b"junk")
    assert decode(run) == IoExit(0xCFC, 4, False, 1, b"")


def test_io_data_may_end_at_the_mapping_end(decode):
    run = io_run(exits.KVM_EXIT_IO_OUT, 4, 0x10, 2, data_offset=RUN_SIZE - 8, data=b"ABCDEFGH")
    assert decode(run) == IoExit(0x10, 4, True, 2, b"ABCDEFGH")


@pytest.mark.parametrize(
    "direction, size, count, data_offset, detail",
    [
        (2, 1, 1, PIO_DATA_OFFSET, "io direction 2"),
        (exits.KVM_EXIT_IO_OUT, 3, 1, PIO_DATA_OFFSET, "io size 3 count 1"),
        (exits.KVM_EXIT_IO_OUT, 8, 1, PIO_DATA_OFFSET, "io size 8 count 1"),
        (exits.KVM_EXIT_IO_OUT, 1, 0, PIO_DATA_OFFSET, "io size 1 count 0"),
        (exits.KVM_EXIT_IO_OUT, 4, 1, RUN_SIZE - 3, f"io data {RUN_SIZE - 3:#x}+0x4 outside kvm_run ({RUN_SIZE:#x})"),
        (exits.KVM_EXIT_IO_OUT, 1, 1, RUN_SIZE, f"io data {RUN_SIZE:#x}+0x1 outside kvm_run ({RUN_SIZE:#x})"),
        (exits.KVM_EXIT_IO_IN, 1, 1, 1 << 40, f"io data {1 << 40:#x}+0x1 outside kvm_run ({RUN_SIZE:#x})"),
        # data_offset + size*count wraps around 2**64: must not pass the bound check.
        (exits.KVM_EXIT_IO_OUT, 4, 0xFFFF_FFFF, (1 << 64) - 8,
         f"io data {(1 << 64) - 8:#x}+{4 * 0xFFFF_FFFF:#x} outside kvm_run ({RUN_SIZE:#x})"),
        # size*count far past the mapping.
        (exits.KVM_EXIT_IO_OUT, 4, 0xFFFF_FFFF, PIO_DATA_OFFSET,
         f"io data {PIO_DATA_OFFSET:#x}+{4 * 0xFFFF_FFFF:#x} outside kvm_run ({RUN_SIZE:#x})"),
        # The data area may not overlap the kvm_run header and exit union.
        (exits.KVM_EXIT_IO_OUT, 1, 1, 0, f"io data 0x0+0x1 outside kvm_run ({RUN_SIZE:#x})"),
        (exits.KVM_EXIT_IO_OUT, 1, 1, exits.KVM_RUN_EXIT_UNION_END - 1,
         f"io data {exits.KVM_RUN_EXIT_UNION_END - 1:#x}+0x1 outside kvm_run ({RUN_SIZE:#x})"),
    ],
)
def test_io_hostile(decode, direction, size, count, data_offset, detail):
    run = io_run(direction, size, 0x10, count, data_offset=data_offset)
    exit = decode(run)
    assert exit == MalformedExit(exits.KVM_EXIT_IO, detail)
    assert isinstance(exit, UnknownExit)  # callers that stop on UnknownExit stop here too


def _guarded_buffer(length):
    """`length` writable bytes that end exactly where a PROT_NONE page begins.

    An out-of-bounds read by the C decoder faults instead of passing silently.
    """
    page = mmap.PAGESIZE
    pages = (length + page - 1) // page + 1
    area = mmap.mmap(-1, pages * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(area))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.mprotect(address + (pages - 1) * page, page, PROT_NONE) != 0:
        missing("mprotect failed")
    start = (pages - 1) * page - length
    return area, memoryview(area)[start : start + length]


@pytest.mark.parametrize("data_offset", [exits.KVM_RUN_EXIT_UNION_END, 0x1F0, 0x1FE, 0x1FF, 0x200, 0x201])
def test_io_decode_stays_inside_a_guarded_mapping(decode, data_offset):
    run_size = 0x200
    area, view = _guarded_buffer(run_size)
    view[:] = io_run(exits.KVM_EXIT_IO_OUT, 2, 0x10, 1, data_offset=0, run_size=run_size)
    struct.pack_into("<Q", view, exits.KVM_RUN_IO_DATA_OFFSET, data_offset)
    exit = decode(view)
    if data_offset + 2 <= run_size:
        assert exit == IoExit(0x10, 2, True, 1, bytes(view[data_offset : data_offset + 2]))
    else:
        assert type(exit) is MalformedExit
    view.release()
    area.close()


@pytest.mark.parametrize("length", [1, 2, 4, 8])
def test_mmio_write(decode, length):
    data = bytes(range(0xA0, 0xA0 + length))
    assert decode(mmio_run(0xD000_0050, length, 1, data)) == MmioExit(0xD000_0050, length, True, data)


def test_mmio_read(decode):
    assert decode(mmio_run(0xFEC0_0000, 4, 0, b"\xff" * 8)) == MmioExit(0xFEC0_0000, 4, False, b"")


@pytest.mark.parametrize("length", [0, 9, 16, 0xFFFF_FFFF])
def test_mmio_hostile_length(decode, length):
    assert decode(mmio_run(0xD000_0000, length, 1)) == MalformedExit(exits.KVM_EXIT_MMIO, f"mmio len {length}")


@pytest.mark.parametrize(
    "reason, expected",
    [
        (exits.KVM_EXIT_HLT, HltExit()),
        (exits.KVM_EXIT_SHUTDOWN, ShutdownExit()),
        (exits.KVM_EXIT_INTR, InterruptedExit()),
        (exits.KVM_EXIT_UNKNOWN, UnknownExit(exits.KVM_EXIT_UNKNOWN)),
        (exits.KVM_EXIT_DEBUG, UnknownExit(exits.KVM_EXIT_DEBUG)),
        (0xFFFF_FFFF, UnknownExit(0xFFFF_FFFF)),
    ],
)
def test_simple_exits(decode, reason, expected):
    assert decode(kvm_run(reason)) == expected


def test_system_event(decode):
    run = kvm_run(exits.KVM_EXIT_SYSTEM_EVENT)
    struct.pack_into("<IIQ", run, exits.KVM_RUN_SYSTEM_EVENT_TYPE, exits.KVM_SYSTEM_EVENT_RESET, 1, 0xF00D)
    assert decode(run) == SystemEventExit(exits.KVM_SYSTEM_EVENT_RESET, 0xF00D)


@pytest.mark.parametrize("ndata, kept", [(0, 0), (3, 3), (16, 16), (17, 16), (0xFFFF_FFFF, 16)])
def test_internal_error_clamps_ndata(decode, ndata, kept):
    run = kvm_run(exits.KVM_EXIT_INTERNAL_ERROR)
    words = tuple(0x1111 * (i + 1) for i in range(exits.KVM_RUN_INTERNAL_DATA_MAX))
    struct.pack_into("<II16Q", run, exits.KVM_RUN_INTERNAL_SUBERROR, exits.KVM_INTERNAL_ERROR_EMULATION,
                     ndata, *words)
    assert decode(run) == InternalErrorExit(exits.KVM_INTERNAL_ERROR_EMULATION, words[:kept])


def test_fail_entry(decode):
    run = kvm_run(exits.KVM_EXIT_FAIL_ENTRY)
    struct.pack_into("<QI", run, exits.KVM_RUN_FAIL_ENTRY_REASON, 0x8000_0021, 3)
    assert decode(run) == FailEntryExit(0x8000_0021, 3)


@pytest.mark.parametrize("size", [0, 1, exits.KVM_RUN_EXIT_UNION_END - 1])
def test_short_buffer_is_a_usage_error(decode, size):
    with pytest.raises(UsageError):
        decode(bytes(size))


def test_decoders_accept_read_only_buffers(decode):
    run = bytes(io_run(exits.KVM_EXIT_IO_OUT, 1, 0x10, 1, data=b"x"))
    assert decode(run) == IoExit(0x10, 1, True, 1, b"x")


INTERESTING_REASONS = [
    exits.KVM_EXIT_IO, exits.KVM_EXIT_MMIO, exits.KVM_EXIT_INTERNAL_ERROR, exits.KVM_EXIT_SYSTEM_EVENT,
    exits.KVM_EXIT_FAIL_ENTRY, exits.KVM_EXIT_HLT, exits.KVM_EXIT_INTR, exits.KVM_EXIT_SHUTDOWN,
]


@pytest.mark.skipif(_kvm is None, reason="VOIDBOX_PURE=1: pure twin only")
@settings(max_examples=400, deadline=None)
@given(
    reason=st.sampled_from(INTERESTING_REASONS) | st.integers(0, 0xFFFF_FFFF),
    union=st.binary(min_size=256, max_size=256),
    tail=st.binary(max_size=64),
    data_offset=st.integers(0, 0x200) | st.integers(0, (1 << 64) - 1),
)
def test_decoders_agree_on_random_kvm_runs(reason, union, tail, data_offset):
    run = bytearray(exits.KVM_RUN_EXIT_UNION) + bytearray(union) + bytearray(tail)
    struct.pack_into("<I", run, exits.KVM_RUN_EXIT_REASON, reason)
    if reason == exits.KVM_EXIT_IO:
        struct.pack_into("<Q", run, exits.KVM_RUN_IO_DATA_OFFSET, data_offset)
    assert _kvm.decode_exit(run) == exits.decode_exit(run)
