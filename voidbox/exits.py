"""vCPU exits: the Exit value types and a pure-Python decoder of `struct kvm_run`.

`voidbox._kvm.decode_exit` is the C twin of `decode_exit` here; both read the same
layout (linux/kvm.h, struct kvm_run; api.rst §5 "The kvm_run structure") and must
return equal values for every buffer, hostile ones included (tests/unit/test_exits.py
runs both). The offsets below are checked against the C header through
`voidbox._kvm.KVM_RUN_OFFSETS` when the extension is built.

The kernel writes kvm_run, but the decoder still treats it as untrusted input: an I/O
exit whose data area does not lie inside the mapping, or whose size, count or direction
is not one the x86 I/O instructions produce, decodes to `MalformedExit` (an
`UnknownExit`) rather than a read out of bounds.
"""

from __future__ import annotations

import struct

from ._records import dataclass
from .errors import UsageError

# exit_reason values (linux/kvm.h)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

# kvm_run.io.direction
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

# kvm_run.internal.suberror
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# struct kvm_run byte offsets (x86_64). The exit union starts at 32 and is 256 bytes.
KVM_RUN_IMMEDIATE_EXIT = 1
KVM_RUN_EXIT_REASON = 8
KVM_RUN_EXIT_UNION = 32
KVM_RUN_EXIT_UNION_END = KVM_RUN_EXIT_UNION + 256
KVM_RUN_IO_DIRECTION = 32
KVM_RUN_IO_SIZE = 33
KVM_RUN_IO_PORT = 34
KVM_RUN_IO_COUNT = 36
KVM_RUN_IO_DATA_OFFSET = 40
KVM_RUN_MMIO_PHYS_ADDR = 32
KVM_RUN_MMIO_DATA = 40
KVM_RUN_MMIO_LEN = 48
KVM_RUN_MMIO_IS_WRITE = 52
KVM_RUN_FAIL_ENTRY_REASON = 32
KVM_RUN_FAIL_ENTRY_CPU = 40
KVM_RUN_INTERNAL_SUBERROR = 32
KVM_RUN_INTERNAL_NDATA = 36
KVM_RUN_INTERNAL_DATA = 40
KVM_RUN_SYSTEM_EVENT_TYPE = 32
KVM_RUN_SYSTEM_EVENT_FLAGS = 40

KVM_RUN_MMIO_DATA_SIZE = 8  # sizeof(kvm_run.mmio.data)
KVM_RUN_INTERNAL_DATA_MAX = 16  # entries in kvm_run.internal.data
# IN/OUT/INS/OUTS move 1, 2 or 4 bytes per element (Intel SDM vol. 2, IN and OUT).
IO_SIZES = (1, 2, 4)


@dataclass(frozen=True, slots=True)
class IoExit:
    """KVM_EXIT_IO: port I/O of `count` elements of `size` bytes.

    `data` holds size*count bytes for OUT and b"" for IN (answer an IN with
    Vcpu.complete_io_in before the next run)."""

    port: int
    size: int
    is_write: bool
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MmioExit:
    """KVM_EXIT_MMIO: an access to guest-physical memory no slot backs.

    `data` holds `size` bytes for a write and b"" for a read (answer a read with
    Vcpu.complete_mmio_read)."""

    addr: int
    size: int
    is_write: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class HltExit:
    """KVM_EXIT_HLT (only seen without the in-kernel irqchip)."""


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted."""


@dataclass(frozen=True, slots=True)
class SystemEventExit:
    """KVM_EXIT_SYSTEM_EVENT: `type` is a KVM_SYSTEM_EVENT_* value."""

    type: int
    flags: int


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    """KVM_EXIT_INTERNAL_ERROR: `suberror` is a KVM_INTERNAL_ERROR_* value.

    `data` holds the first ndata u64 words, ndata clamped to KVM_RUN_INTERNAL_DATA_MAX."""

    suberror: int
    data: tuple


@dataclass(frozen=True, slots=True)
class FailEntryExit:
    """KVM_EXIT_FAIL_ENTRY: hardware_entry_failure_reason and the host CPU."""

    reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InterruptedExit:
    """KVM_RUN returned EINTR (a kick) or KVM_EXIT_INTR."""


@dataclass(frozen=True, slots=True)
class UnknownExit:
    """An exit reason voidbox does not decode."""

    reason: int


@dataclass(frozen=True, slots=True)
class MalformedExit(UnknownExit):
    """A kvm_run whose fields are impossible (I/O data outside the mapping, bad size).

    Decoded without touching the bad range; as an UnknownExit it stops the VM."""

    detail: str


Exit = (
    IoExit | MmioExit | HltExit | ShutdownExit | SystemEventExit | InternalErrorExit
    | FailEntryExit | InterruptedExit | UnknownExit
)

# Exits without fields are immutable: share one instance of each.
HLT_EXIT = HltExit()
SHUTDOWN_EXIT = ShutdownExit()
INTERRUPTED_EXIT = InterruptedExit()

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _io_exit(run, run_size: int) -> Exit:
    direction = _U8.unpack_from(run, KVM_RUN_IO_DIRECTION)[0]
    size = _U8.unpack_from(run, KVM_RUN_IO_SIZE)[0]
    port = _U16.unpack_from(run, KVM_RUN_IO_PORT)[0]
    count = _U32.unpack_from(run, KVM_RUN_IO_COUNT)[0]
    data_offset = _U64.unpack_from(run, KVM_RUN_IO_DATA_OFFSET)[0]
    if direction not in (KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT):
        return MalformedExit(KVM_EXIT_IO, f"io direction {direction}")
    if size not in IO_SIZES or count == 0:
        return MalformedExit(KVM_EXIT_IO, f"io size {size} count {count}")
    # The data area must lie after the exit union and inside the mapping.
    length = size * count
    if data_offset < KVM_RUN_EXIT_UNION_END or data_offset > run_size or length > run_size - data_offset:
        return MalformedExit(
            KVM_EXIT_IO, f"io data {data_offset:#x}+{length:#x} outside kvm_run ({run_size:#x})"
        )
    if direction == KVM_EXIT_IO_OUT:
        return IoExit(port, size, True, count, bytes(run[data_offset : data_offset + length]))
    return IoExit(port, size, False, count, b"")


def _mmio_exit(run) -> Exit:
    addr = _U64.unpack_from(run, KVM_RUN_MMIO_PHYS_ADDR)[0]
    size = _U32.unpack_from(run, KVM_RUN_MMIO_LEN)[0]
    is_write = _U8.unpack_from(run, KVM_RUN_MMIO_IS_WRITE)[0] != 0
    if not 1 <= size <= KVM_RUN_MMIO_DATA_SIZE:
        return MalformedExit(KVM_EXIT_MMIO, f"mmio len {size}")
    if is_write:
        return MmioExit(addr, size, True, bytes(run[KVM_RUN_MMIO_DATA : KVM_RUN_MMIO_DATA + size]))
    return MmioExit(addr, size, False, b"")


def decode_exit(run) -> Exit:
    """Decode the exit recorded in a buffer laid out as `struct kvm_run`.

    `run` is the vCPU's kvm_run mapping or a copy of it: its length is the mapping size
    the I/O data area is checked against. A buffer too short to hold the exit union is a
    caller error (UsageError); anything the kernel could have written decodes to a value.
    """
    run = memoryview(run).cast("B")
    run_size = len(run)
    if run_size < KVM_RUN_EXIT_UNION_END:
        raise UsageError(
            f"a kvm_run buffer needs at least {KVM_RUN_EXIT_UNION_END} bytes, got {run_size}"
        )
    reason = _U32.unpack_from(run, KVM_RUN_EXIT_REASON)[0]
    if reason == KVM_EXIT_IO:
        return _io_exit(run, run_size)
    if reason == KVM_EXIT_MMIO:
        return _mmio_exit(run)
    if reason == KVM_EXIT_HLT:
        return HLT_EXIT
    if reason == KVM_EXIT_SHUTDOWN:
        return SHUTDOWN_EXIT
    if reason == KVM_EXIT_INTR:
        return INTERRUPTED_EXIT
    if reason == KVM_EXIT_SYSTEM_EVENT:
        return SystemEventExit(
            _U32.unpack_from(run, KVM_RUN_SYSTEM_EVENT_TYPE)[0],
            _U64.unpack_from(run, KVM_RUN_SYSTEM_EVENT_FLAGS)[0],
        )
    if reason == KVM_EXIT_INTERNAL_ERROR:
        suberror = _U32.unpack_from(run, KVM_RUN_INTERNAL_SUBERROR)[0]
        ndata = min(_U32.unpack_from(run, KVM_RUN_INTERNAL_NDATA)[0], KVM_RUN_INTERNAL_DATA_MAX)
        data = struct.unpack_from(f"<{ndata}Q", run, KVM_RUN_INTERNAL_DATA)
        return InternalErrorExit(suberror, data)
    if reason == KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(
            _U64.unpack_from(run, KVM_RUN_FAIL_ENTRY_REASON)[0],
            _U32.unpack_from(run, KVM_RUN_FAIL_ENTRY_CPU)[0],
        )
    return UnknownExit(reason)
