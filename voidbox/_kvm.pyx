"""KVM ioctls and the vCPU run loop (Linux Documentation/virt/kvm/api.rst).

Three objects wrap the three kinds of KVM file descriptor: `Kvm` (/dev/kvm, system
ioctls), `VmFd` (KVM_CREATE_VM: memory slots, irqchip, eventfds) and `Vcpu`
(KVM_CREATE_VCPU: registers and KVM_RUN). Every ioctl's result is checked; a failure
raises `KvmError` carrying the errno and the ioctl's name.

`Vcpu.run()` enters KVM_RUN with the GIL released and decodes the exit from the
kvm_run mapping into a `voidbox.exits` value. `decode_exit` is the same decoder over
any buffer; `voidbox.exits.decode_exit` is its pure-Python twin.

Kicking (api.rst §4.10 KVM_RUN, `immediate_exit`): `Vcpu.kick()` sets
kvm_run->immediate_exit and sends KICK_SIGNAL to the thread in `run()`. The module
installs a handler for that signal that does nothing and omits SA_RESTART, so a
KVM_RUN in progress returns EINTR; a KVM_RUN entered after the kick sees
immediate_exit and returns EINTR at once. `run()` then clears immediate_exit and
returns InterruptedExit.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport E2BIG, EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.fcntl cimport O_CLOEXEC, O_RDWR, open as c_open
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport close as c_close

from voidbox.includes.kvm cimport (
    KVM_API_VERSION, KVM_CHECK_EXTENSION, KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2,
    KVM_CREATE_VCPU, KVM_CREATE_VM, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN, KVM_EXIT_SYSTEM_EVENT, KVM_GET_API_VERSION, KVM_GET_LAPIC,
    KVM_GET_MSRS, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_SUPPORTED_CPUID,
    KVM_GET_VCPU_MMAP_SIZE, KVM_IOEVENTFD, KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN, KVM_IOEVENTFD_FLAG_PIO, KVM_IRQ_LINE, KVM_IRQFD,
    KVM_IRQFD_FLAG_DEASSIGN, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY, KVM_RUN,
    KVM_SET_CPUID2, KVM_SET_FPU, KVM_SET_IDENTITY_MAP_ADDR, KVM_SET_LAPIC, KVM_SET_MSRS,
    KVM_SET_REGS, KVM_SET_SREGS, KVM_SET_TSS_ADDR, KVM_SET_USER_MEMORY_REGION, SIGRTMIN,
    ioctl, kvm_cpuid2, kvm_cpuid_entry2, kvm_dtable, kvm_fpu, kvm_ioeventfd, kvm_irq_level,
    kvm_irqfd, kvm_lapic_state, kvm_msr_entry, kvm_msrs, kvm_pit_config, kvm_regs,
    kvm_segment, kvm_sregs, kvm_userspace_memory_region, pthread_kill, pthread_self,
)

import os

from voidbox.errors import UsageError, VoidboxError
from voidbox.exits import (
    HLT_EXIT, INTERRUPTED_EXIT, SHUTDOWN_EXIT, FailEntryExit, InternalErrorExit, IoExit,
    MalformedExit, MmioExit, SystemEventExit, UnknownExit,
)
from voidbox.kvm_types import CpuidEntry, DTable, Regs, Segment, Sregs

cdef extern from *:
    """
    #include <stddef.h>
    #include <linux/kvm.h>
    #define VB_RUN_IMMEDIATE_EXIT offsetof(struct kvm_run, immediate_exit)
    #define VB_RUN_EXIT_REASON offsetof(struct kvm_run, exit_reason)
    #define VB_RUN_EXIT_UNION_END (offsetof(struct kvm_run, io) + 256)
    #define VB_RUN_IO_DIRECTION offsetof(struct kvm_run, io.direction)
    #define VB_RUN_IO_SIZE offsetof(struct kvm_run, io.size)
    #define VB_RUN_IO_PORT offsetof(struct kvm_run, io.port)
    #define VB_RUN_IO_COUNT offsetof(struct kvm_run, io.count)
    #define VB_RUN_IO_DATA_OFFSET offsetof(struct kvm_run, io.data_offset)
    #define VB_RUN_MMIO_PHYS_ADDR offsetof(struct kvm_run, mmio.phys_addr)
    #define VB_RUN_MMIO_DATA offsetof(struct kvm_run, mmio.data)
    #define VB_RUN_MMIO_LEN offsetof(struct kvm_run, mmio.len)
    #define VB_RUN_MMIO_IS_WRITE offsetof(struct kvm_run, mmio.is_write)
    #define VB_RUN_FAIL_ENTRY_REASON \
        offsetof(struct kvm_run, fail_entry.hardware_entry_failure_reason)
    #define VB_RUN_FAIL_ENTRY_CPU offsetof(struct kvm_run, fail_entry.cpu)
    #define VB_RUN_INTERNAL_SUBERROR offsetof(struct kvm_run, internal.suberror)
    #define VB_RUN_INTERNAL_NDATA offsetof(struct kvm_run, internal.ndata)
    #define VB_RUN_INTERNAL_DATA offsetof(struct kvm_run, internal.data)
    #define VB_RUN_SYSTEM_EVENT_TYPE offsetof(struct kvm_run, system_event.type)
    #define VB_RUN_SYSTEM_EVENT_FLAGS offsetof(struct kvm_run, system_event.flags)
    #define VB_RUN_MMIO_DATA_SIZE sizeof(((struct kvm_run *)0)->mmio.data)
    #define VB_RUN_INTERNAL_DATA_MAX \
        (sizeof(((struct kvm_run *)0)->internal.data) / sizeof(__u64))

    /* kick() and run() run in different threads: the immediate_exit byte is shared. */
    static inline void vb_store_u8(uint8_t *p, uint8_t v) {
        __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
    }

    /* The kick signal only has to interrupt the system call; its handler does nothing. */
    static void vb_kick_handler(int signum) { (void)signum; }

    static int vb_install_kick_handler(int signum) {
        struct sigaction action;
        memset(&action, 0, sizeof(action));
        action.sa_handler = vb_kick_handler;
        sigemptyset(&action.sa_mask);
        action.sa_flags = 0;  /* no SA_RESTART: KVM_RUN must return EINTR */
        return sigaction(signum, &action, NULL);
    }
    """
    size_t VB_RUN_IMMEDIATE_EXIT
    size_t VB_RUN_EXIT_REASON
    size_t VB_RUN_EXIT_UNION_END
    size_t VB_RUN_IO_DIRECTION
    size_t VB_RUN_IO_SIZE
    size_t VB_RUN_IO_PORT
    size_t VB_RUN_IO_COUNT
    size_t VB_RUN_IO_DATA_OFFSET
    size_t VB_RUN_MMIO_PHYS_ADDR
    size_t VB_RUN_MMIO_DATA
    size_t VB_RUN_MMIO_LEN
    size_t VB_RUN_MMIO_IS_WRITE
    size_t VB_RUN_FAIL_ENTRY_REASON
    size_t VB_RUN_FAIL_ENTRY_CPU
    size_t VB_RUN_INTERNAL_SUBERROR
    size_t VB_RUN_INTERNAL_NDATA
    size_t VB_RUN_INTERNAL_DATA
    size_t VB_RUN_SYSTEM_EVENT_TYPE
    size_t VB_RUN_SYSTEM_EVENT_FLAGS
    size_t VB_RUN_MMIO_DATA_SIZE
    size_t VB_RUN_INTERNAL_DATA_MAX
    void vb_store_u8(uint8_t *p, uint8_t v) noexcept nogil
    int vb_install_kick_handler(int signum) noexcept nogil

# struct kvm_run offsets from the C header, for checking voidbox.exits' constants.
KVM_RUN_OFFSETS = {
    "KVM_RUN_IMMEDIATE_EXIT": VB_RUN_IMMEDIATE_EXIT,
    "KVM_RUN_EXIT_REASON": VB_RUN_EXIT_REASON,
    "KVM_RUN_EXIT_UNION_END": VB_RUN_EXIT_UNION_END,
    "KVM_RUN_IO_DIRECTION": VB_RUN_IO_DIRECTION,
    "KVM_RUN_IO_SIZE": VB_RUN_IO_SIZE,
    "KVM_RUN_IO_PORT": VB_RUN_IO_PORT,
    "KVM_RUN_IO_COUNT": VB_RUN_IO_COUNT,
    "KVM_RUN_IO_DATA_OFFSET": VB_RUN_IO_DATA_OFFSET,
    "KVM_RUN_MMIO_PHYS_ADDR": VB_RUN_MMIO_PHYS_ADDR,
    "KVM_RUN_MMIO_DATA": VB_RUN_MMIO_DATA,
    "KVM_RUN_MMIO_LEN": VB_RUN_MMIO_LEN,
    "KVM_RUN_MMIO_IS_WRITE": VB_RUN_MMIO_IS_WRITE,
    "KVM_RUN_FAIL_ENTRY_REASON": VB_RUN_FAIL_ENTRY_REASON,
    "KVM_RUN_FAIL_ENTRY_CPU": VB_RUN_FAIL_ENTRY_CPU,
    "KVM_RUN_INTERNAL_SUBERROR": VB_RUN_INTERNAL_SUBERROR,
    "KVM_RUN_INTERNAL_NDATA": VB_RUN_INTERNAL_NDATA,
    "KVM_RUN_INTERNAL_DATA": VB_RUN_INTERNAL_DATA,
    "KVM_RUN_SYSTEM_EVENT_TYPE": VB_RUN_SYSTEM_EVENT_TYPE,
    "KVM_RUN_SYSTEM_EVENT_FLAGS": VB_RUN_SYSTEM_EVENT_FLAGS,
    "KVM_RUN_MMIO_DATA_SIZE": VB_RUN_MMIO_DATA_SIZE,
    "KVM_RUN_INTERNAL_DATA_MAX": VB_RUN_INTERNAL_DATA_MAX,
}

# The signal kick() sends to a vCPU thread. Real-time signals are unused by CPython and
# by glibc past SIGRTMIN; Firecracker kicks vCPUs with SIGRTMIN too.
KICK_SIGNAL = SIGRTMIN
if vb_install_kick_handler(KICK_SIGNAL) != 0:
    raise OSError(errno, f"sigaction({KICK_SIGNAL}): {os.strerror(errno)}")

# KVM_GET_SUPPORTED_CPUID: start with room for this many entries and double on E2BIG
# (api.rst §4.46) up to the cap; Linux's KVM_MAX_CPUID_ENTRIES is 256.
_CPUID_ENTRIES_FIRST = 64
_CPUID_ENTRIES_CAP = 4096

# Local APIC registers (Intel SDM vol. 3A §11.5.1, Figure 11-8 "Local Vector Table").
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_LVT_DELIVERY_MODE_MASK = 0x700
APIC_LVT_DELIVERY_MODE_SHIFT = 8
APIC_DELIVERY_MODE_NMI = 0b100
APIC_DELIVERY_MODE_EXTINT = 0b111
KVM_APIC_REG_SIZE = sizeof(kvm_lapic_state)

FPU_DEFAULT_FCW = 0x37F  # x87 FNINIT state: all exceptions masked, 64-bit precision
MXCSR_DEFAULT = 0x1F80  # SSE reset state: all exceptions masked (SDM vol. 1 §10.2.3.1)


class KvmError(VoidboxError):
    """A KVM ioctl (or opening /dev/kvm) failed.

    `op` names the call ("KVM_CREATE_VM", ...); `errno` is the errno it returned, or 0
    when the call succeeded but its answer was unusable (then `detail` says why).
    """

    def __init__(self, op, err=0, detail=""):
        self.op = op
        self.errno = err
        self.detail = detail
        message = f"{op} failed"
        if err:
            message += f": {os.strerror(err)} (errno {err})"
        if detail:
            message += f": {detail}"
        super().__init__(message)


cdef int _ioctl(int fd, unsigned long request, void *arg, str op) except -1:
    """ioctl(fd, request, arg) for a pointer argument; KvmError(op) on failure."""
    cdef int ret = ioctl(fd, request, arg)
    cdef int err = errno  # before any other call can change it
    if ret < 0:
        raise KvmError(op, err)
    return ret


cdef int _ioctl_value(int fd, unsigned long request, unsigned long arg, str op) except -1:
    """ioctl(fd, request, arg) for an integer argument; KvmError(op) on failure."""
    cdef int ret = ioctl(fd, request, arg)
    cdef int err = errno  # before any other call can change it
    if ret < 0:
        raise KvmError(op, err)
    return ret


# The set-up ioctls the kernel may sleep in (an SRCU grace period for each memory slot, a
# kthread for the PIT: milliseconds, more on a busy host) run without the GIL, so a thread
# building the VM lets the others run (voidbox.vm builds it beside the rest of the start-up).
# The others keep it: a short ioctl that let go of the GIL could wait to get it back.

cdef int _ioctl_nogil(int fd, unsigned long request, void *arg, str op) except -1:
    """_ioctl without the GIL."""
    cdef int ret, err
    with nogil:
        ret = ioctl(fd, request, arg)
        err = errno
    if ret < 0:
        raise KvmError(op, err)
    return ret


cdef int _ioctl_value_nogil(int fd, unsigned long request, unsigned long arg,
                            str op) except -1:
    """_ioctl_value without the GIL."""
    cdef int ret, err
    with nogil:
        ret = ioctl(fd, request, arg)
        err = errno
    if ret < 0:
        raise KvmError(op, err)
    return ret


# -- kvm_run decoding -------------------------------------------------------------------
# The readers copy with memcpy: a caller's buffer need not be aligned.

cdef inline uint8_t _u8(const uint8_t *run, size_t offset) noexcept nogil:
    return run[offset]


cdef inline uint16_t _u16(const uint8_t *run, size_t offset) noexcept nogil:
    cdef uint16_t value
    memcpy(&value, run + offset, sizeof(value))
    return value


cdef inline uint32_t _u32(const uint8_t *run, size_t offset) noexcept nogil:
    cdef uint32_t value
    memcpy(&value, run + offset, sizeof(value))
    return value


cdef inline uint64_t _u64(const uint8_t *run, size_t offset) noexcept nogil:
    cdef uint64_t value
    memcpy(&value, run + offset, sizeof(value))
    return value


cdef int _io_area(const uint8_t *run, size_t run_size, uint64_t *data_offset,
                  uint64_t *length) noexcept nogil:
    """Validate kvm_run.io; 0 with the data area's place, or -1 when it is impossible.

    Safe when run_size >= VB_RUN_EXIT_UNION_END (every caller checks it).
    """
    cdef uint8_t direction = _u8(run, VB_RUN_IO_DIRECTION)
    cdef uint8_t size = _u8(run, VB_RUN_IO_SIZE)
    cdef uint32_t count = _u32(run, VB_RUN_IO_COUNT)
    cdef uint64_t offset = _u64(run, VB_RUN_IO_DATA_OFFSET)
    # size <= 4 and count < 2**32: the product cannot overflow 64 bits.
    cdef uint64_t total = <uint64_t>size * count
    if direction != KVM_EXIT_IO_IN and direction != KVM_EXIT_IO_OUT:
        return -1
    if (size != 1 and size != 2 and size != 4) or count == 0:
        return -1
    # The data area lies after the exit union and inside the mapping; comparing
    # total with run_size - offset avoids overflowing offset + total.
    if offset < VB_RUN_EXIT_UNION_END or offset > run_size or total > run_size - offset:
        return -1
    data_offset[0] = offset
    length[0] = total
    return 0


cdef object _decode_io(const uint8_t *run, size_t run_size):
    cdef uint8_t direction = _u8(run, VB_RUN_IO_DIRECTION)
    cdef uint8_t size = _u8(run, VB_RUN_IO_SIZE)
    cdef uint16_t port = _u16(run, VB_RUN_IO_PORT)
    cdef uint32_t count = _u32(run, VB_RUN_IO_COUNT)
    cdef uint64_t offset = _u64(run, VB_RUN_IO_DATA_OFFSET)
    cdef uint64_t data_offset, length
    cdef uint64_t total = <uint64_t>size * count  # size < 256, count < 2**32: no overflow
    # Messages match voidbox.exits._io_exit word for word.
    if direction != KVM_EXIT_IO_IN and direction != KVM_EXIT_IO_OUT:
        return MalformedExit(KVM_EXIT_IO, f"io direction {direction}")
    if _io_area(run, run_size, &data_offset, &length) < 0:
        if (size != 1 and size != 2 and size != 4) or count == 0:
            return MalformedExit(KVM_EXIT_IO, f"io size {size} count {count}")
        return MalformedExit(
            KVM_EXIT_IO,
            f"io data {offset:#x}+{total:#x} outside kvm_run ({run_size:#x})",
        )
    if direction == KVM_EXIT_IO_OUT:
        # _io_area bounded [data_offset, data_offset + length) inside run_size.
        return IoExit(port, size, True, count,
                      PyBytes_FromStringAndSize(<const char *>run + data_offset, length))
    return IoExit(port, size, False, count, b"")


cdef object _decode(const uint8_t *run, size_t run_size):
    """Decode a kvm_run of run_size >= VB_RUN_EXIT_UNION_END bytes (callers check).

    Every fixed-offset read below lies before VB_RUN_EXIT_UNION_END; only the I/O data
    area is variable, and _io_area bounds it. Errors propagate as Python exceptions.
    """
    cdef uint32_t reason = _u32(run, VB_RUN_EXIT_REASON)
    cdef uint32_t size, ndata, i
    if reason == KVM_EXIT_IO:
        return _decode_io(run, run_size)
    if reason == KVM_EXIT_MMIO:
        size = _u32(run, VB_RUN_MMIO_LEN)
        if size < 1 or size > VB_RUN_MMIO_DATA_SIZE:
            return MalformedExit(KVM_EXIT_MMIO, f"mmio len {size}")
        if _u8(run, VB_RUN_MMIO_IS_WRITE):
            # size <= sizeof(mmio.data): the copy stays inside the exit union.
            return MmioExit(_u64(run, VB_RUN_MMIO_PHYS_ADDR), size, True,
                            PyBytes_FromStringAndSize(<const char *>run + VB_RUN_MMIO_DATA, size))
        return MmioExit(_u64(run, VB_RUN_MMIO_PHYS_ADDR), size, False, b"")
    if reason == KVM_EXIT_HLT:
        return HLT_EXIT
    if reason == KVM_EXIT_SHUTDOWN:
        return SHUTDOWN_EXIT
    if reason == KVM_EXIT_INTR:
        return INTERRUPTED_EXIT
    if reason == KVM_EXIT_SYSTEM_EVENT:
        return SystemEventExit(_u32(run, VB_RUN_SYSTEM_EVENT_TYPE),
                               _u64(run, VB_RUN_SYSTEM_EVENT_FLAGS))
    if reason == KVM_EXIT_INTERNAL_ERROR:
        # Clamped to the array's length, so every word read lies inside the exit union.
        ndata = min(_u32(run, VB_RUN_INTERNAL_NDATA), <uint32_t>VB_RUN_INTERNAL_DATA_MAX)
        return InternalErrorExit(
            _u32(run, VB_RUN_INTERNAL_SUBERROR),
            tuple([_u64(run, VB_RUN_INTERNAL_DATA + 8 * i) for i in range(ndata)]),
        )
    if reason == KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(_u64(run, VB_RUN_FAIL_ENTRY_REASON), _u32(run, VB_RUN_FAIL_ENTRY_CPU))
    return UnknownExit(reason)


def decode_exit(kvm_run_buffer):
    """Decode the exit in a buffer laid out as struct kvm_run (C twin of exits.decode_exit).

    The buffer's length stands for the kvm_run mapping size: I/O data outside it decodes
    to MalformedExit, never an out-of-bounds read.
    """
    cdef const uint8_t[::1] view = kvm_run_buffer
    if <size_t>view.shape[0] < VB_RUN_EXIT_UNION_END:
        raise UsageError(f"a kvm_run buffer needs at least {VB_RUN_EXIT_UNION_END} bytes, "
                         f"got {view.shape[0]}")
    return _decode(&view[0], view.shape[0])


# -- conversions to and from voidbox.kvm_types ------------------------------------------

cdef object _segment_to_py(const kvm_segment *seg):
    return Segment(seg.base, seg.limit, seg.selector, seg.type, seg.present, seg.dpl,
                   seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable)


cdef int _segment_from_py(object obj, kvm_segment *seg) except -1:
    seg.base = obj.base
    seg.limit = obj.limit
    seg.selector = obj.selector
    seg.type = obj.type
    seg.present = obj.present
    seg.dpl = obj.dpl
    seg.db = obj.db
    seg.s = obj.s
    # kvm_segment.l is the long-mode bit (named as in the header).
    seg.l, seg.g = obj.l, obj.g
    seg.avl = obj.avl
    seg.unusable = obj.unusable
    return 0


cdef object _dtable_to_py(const kvm_dtable *table):
    return DTable(table.base, table.limit)


cdef int _dtable_from_py(object obj, kvm_dtable *table) except -1:
    table.base = obj.base
    table.limit = obj.limit
    return 0


# -- /dev/kvm --------------------------------------------------------------------------

cdef class Kvm:
    """The KVM subsystem (/dev/kvm): capabilities, supported CPUID, VM creation."""

    def __cinit__(self):
        self.fd = -1

    def __init__(self, path="/dev/kvm"):
        cdef bytes encoded = os.fsencode(path)
        cdef int version, err
        self.fd = c_open(PyBytes_AS_STRING(encoded), O_RDWR | O_CLOEXEC)
        if self.fd < 0:
            err = errno  # before the f-string's calls can change it
            raise KvmError(f"open {path}", err)
        version = _ioctl_value(self.fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError("KVM_GET_API_VERSION", 0,
                           f"{path} speaks KVM API {version}, voidbox needs {KVM_API_VERSION}")
        self.api_version = version

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)

    cdef int _require_open(self) except -1:
        if self.fd < 0:
            raise UsageError("the /dev/kvm handle is closed")
        return 0

    def check_extension(self, int cap):
        """KVM_CHECK_EXTENSION: 0 when `cap` (a KVM_CAP_* number) is absent, else its value."""
        self._require_open()
        return _ioctl_value(self.fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self):
        """KVM_GET_VCPU_MMAP_SIZE: bytes of each vCPU's kvm_run mapping."""
        self._require_open()
        if self._mmap_size == 0:
            self._mmap_size = _ioctl_value(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0,
                                           "KVM_GET_VCPU_MMAP_SIZE")
        return self._mmap_size

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a list of CpuidEntry (api.rst §4.46)."""
        cdef kvm_cpuid2 *cpuid = NULL
        cdef uint32_t capacity = _CPUID_ENTRIES_FIRST
        cdef uint32_t i
        cdef kvm_cpuid_entry2 *entry
        cdef int err
        self._require_open()
        while True:
            cpuid = <kvm_cpuid2 *>calloc(1, sizeof(kvm_cpuid2)
                                         + capacity * sizeof(kvm_cpuid_entry2))
            if cpuid == NULL:
                raise MemoryError()
            cpuid.nent = capacity
            if ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, cpuid) >= 0:
                break
            err = errno
            free(cpuid)
            if err != E2BIG or capacity >= _CPUID_ENTRIES_CAP:
                raise KvmError("KVM_GET_SUPPORTED_CPUID", err)
            capacity *= 2
        try:
            result = []
            # The kernel set nent to the entries it wrote, at most capacity.
            for i in range(min(cpuid.nent, capacity)):
                entry = &cpuid.entries[i]
                result.append(CpuidEntry(entry.function, entry.index, entry.flags,
                                         entry.eax, entry.ebx, entry.ecx, entry.edx))
            return result
        finally:
            free(cpuid)

    def create_vm(self):
        """KVM_CREATE_VM (default machine type)."""
        cdef VmFd vm = VmFd.__new__(VmFd)
        cdef size_t run_size = self.vcpu_mmap_size()
        vm.fd = _ioctl_value_nogil(self.fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        vm.kvm = self
        vm.run_size = run_size
        return vm

    def close(self):
        """Close /dev/kvm (VMs already created stay usable); idempotent."""
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# -- VM --------------------------------------------------------------------------------

cdef class VmFd:
    """A VM file descriptor: memory slots, in-kernel irqchip and PIT, eventfds, vCPUs."""

    def __cinit__(self):
        self.fd = -1
        self._slots = {}

    def __init__(self):
        raise TypeError("VmFd objects come from Kvm.create_vm()")

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)

    cdef int _require_open(self) except -1:
        if self.fd < 0:
            raise UsageError("the VM is closed")
        return 0

    def set_tss_addr(self, uint64_t addr):
        """KVM_SET_TSS_ADDR: three pages of guest-physical space no RAM uses (api.rst §4.47)."""
        self._require_open()
        _ioctl_value(self.fd, KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, uint64_t addr):
        """KVM_SET_IDENTITY_MAP_ADDR: one page no RAM uses (api.rst §4.57)."""
        self._require_open()
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, &addr, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self):
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs."""
        self._require_open()
        _ioctl_value_nogil(self.fd, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self):
        """KVM_CREATE_PIT2 with a dummy speaker port, as Firecracker and QEMU's microvm do."""
        cdef kvm_pit_config config
        self._require_open()
        memset(&config, 0, sizeof(config))
        config.flags = KVM_PIT_SPEAKER_DUMMY
        _ioctl_nogil(self.fd, KVM_CREATE_PIT2, &config, "KVM_CREATE_PIT2")

    def set_user_memory_region(self, uint32_t slot, uint64_t gpa, uint64_t size, buffer,
                               uint64_t offset=0, uint32_t flags=0):
        """KVM_SET_USER_MEMORY_REGION: map [gpa, gpa+size) to buffer[offset:offset+size].

        `buffer` is any writable buffer (GuestMemory.mmap; read-only is enough with
        KVM_MEM_READONLY); the VM keeps a reference so the pages stay mapped. size 0
        deletes the slot. KVM checks alignment (EINVAL).
        """
        cdef uint8_t[::1] view
        cdef const uint8_t[::1] const_view
        cdef kvm_userspace_memory_region region
        cdef uintptr_t base = 0
        cdef uint64_t length = 0
        cdef object keep = None
        self._require_open()
        if size:
            try:
                if flags & KVM_MEM_READONLY:
                    const_view = buffer
                    keep = const_view
                    length = const_view.shape[0]
                    if length:
                        base = <uintptr_t>&const_view[0]
                else:
                    view = buffer
                    keep = view
                    length = view.shape[0]
                    if length:
                        base = <uintptr_t>&view[0]
            except (TypeError, ValueError, BufferError) as error:
                raise UsageError(f"memory slot {slot} needs a writable byte buffer: {error}") \
                    from None
            if offset > length or size > length - offset:
                raise UsageError(f"memory slot {slot}: {offset:#x}+{size:#x} is outside "
                                 f"the {length:#x}-byte buffer")
        memset(&region, 0, sizeof(region))
        region.slot = slot
        region.flags = flags
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = base + offset if size else 0
        _ioctl_nogil(self.fd, KVM_SET_USER_MEMORY_REGION, &region,
                     "KVM_SET_USER_MEMORY_REGION")
        if size:
            self._slots[slot] = keep
        else:
            self._slots.pop(slot, None)

    def irq_line(self, uint32_t irq, uint32_t level):
        """KVM_IRQ_LINE: drive a GSI of the in-kernel irqchip high (1) or low (0)."""
        cdef kvm_irq_level irq_level
        self._require_open()
        memset(&irq_level, 0, sizeof(irq_level))
        irq_level.irq = irq
        irq_level.level = level
        _ioctl(self.fd, KVM_IRQ_LINE, &irq_level, "KVM_IRQ_LINE")

    def register_ioeventfd(self, int efd, uint64_t addr, uint32_t length, bint pio=False,
                           datamatch=None, bint deassign=False):
        """KVM_IOEVENTFD: a guest write of `length` bytes at `addr` signals `efd`, no exit.

        `pio` selects the I/O-port space; `datamatch` restricts to one written value.
        """
        cdef kvm_ioeventfd event
        self._require_open()
        memset(&event, 0, sizeof(event))
        event.addr = addr
        event.len = length
        event.fd = efd
        if pio:
            event.flags |= KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            event.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
        if datamatch is not None:
            event.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
            event.datamatch = datamatch
        _ioctl(self.fd, KVM_IOEVENTFD, &event, "KVM_IOEVENTFD")

    def register_irqfd(self, uint32_t efd, uint32_t gsi, bint deassign=False):
        """KVM_IRQFD: a write to `efd` raises GSI `gsi` (edge) on the in-kernel irqchip."""
        cdef kvm_irqfd irqfd
        self._require_open()
        memset(&irqfd, 0, sizeof(irqfd))
        irqfd.fd = efd
        irqfd.gsi = gsi
        if deassign:
            irqfd.flags = KVM_IRQFD_FLAG_DEASSIGN
        _ioctl(self.fd, KVM_IRQFD, &irqfd, "KVM_IRQFD")

    def create_vcpu(self, uint32_t index):
        """KVM_CREATE_VCPU with APIC ID `index`, and map its kvm_run area."""
        cdef Vcpu vcpu = Vcpu.__new__(Vcpu)
        cdef void *area
        cdef int err
        self._require_open()
        vcpu.fd = _ioctl_value_nogil(self.fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        vcpu.index = index
        vcpu.vm = self
        area = mmap(NULL, self.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.fd, 0)
        if area == MAP_FAILED:
            err = errno
            raise KvmError("mmap kvm_run", err)
        vcpu.run_area = <uint8_t *>area
        vcpu.run_size = self.run_size
        return vcpu

    def close(self):
        """Close the VM fd and drop the memory slots' buffers; idempotent.

        vCPUs keep the VM alive in the kernel until they are closed too.
        """
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
        self._slots.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# -- vCPU ------------------------------------------------------------------------------

cdef class Vcpu:
    """A vCPU: registers, CPUID, MSRs, LAPIC, and KVM_RUN with its kvm_run mapping."""

    def __cinit__(self):
        self.fd = -1
        self.run_area = NULL

    def __init__(self):
        raise TypeError("Vcpu objects come from VmFd.create_vcpu()")

    def __dealloc__(self):
        self._close()

    cdef void _close(self) noexcept:
        if self.run_area != NULL:
            munmap(self.run_area, self.run_size)
            self.run_area = NULL
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    cdef int _require_open(self) except -1:
        if self.fd < 0 or self.close_pending:
            raise UsageError(f"vCPU {self.index} is closed")
        return 0

    # -- registers -----------------------------------------------------------------------

    def get_regs(self):
        """KVM_GET_REGS as voidbox.kvm_types.Regs."""
        cdef kvm_regs r
        self._require_open()
        _ioctl(self.fd, KVM_GET_REGS, &r, "KVM_GET_REGS")
        return Regs(r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp,
                    r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags)

    def set_regs(self, regs):
        """KVM_SET_REGS from voidbox.kvm_types.Regs."""
        cdef kvm_regs r
        self._require_open()
        r.rax, r.rbx, r.rcx, r.rdx = regs.rax, regs.rbx, regs.rcx, regs.rdx
        r.rsi, r.rdi, r.rsp, r.rbp = regs.rsi, regs.rdi, regs.rsp, regs.rbp
        r.r8, r.r9, r.r10, r.r11 = regs.r8, regs.r9, regs.r10, regs.r11
        r.r12, r.r13, r.r14, r.r15 = regs.r12, regs.r13, regs.r14, regs.r15
        r.rip, r.rflags = regs.rip, regs.rflags
        _ioctl(self.fd, KVM_SET_REGS, &r, "KVM_SET_REGS")

    def get_sregs(self):
        """KVM_GET_SREGS as voidbox.kvm_types.Sregs."""
        cdef kvm_sregs s
        self._require_open()
        _ioctl(self.fd, KVM_GET_SREGS, &s, "KVM_GET_SREGS")
        return Sregs(
            _segment_to_py(&s.cs), _segment_to_py(&s.ds), _segment_to_py(&s.es),
            _segment_to_py(&s.fs), _segment_to_py(&s.gs), _segment_to_py(&s.ss),
            _segment_to_py(&s.tr), _segment_to_py(&s.ldt),
            _dtable_to_py(&s.gdt), _dtable_to_py(&s.idt),
            s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base,
            PyBytes_FromStringAndSize(<const char *>s.interrupt_bitmap,
                                      sizeof(s.interrupt_bitmap)),
        )

    def set_sregs(self, sregs):
        """KVM_SET_SREGS from voidbox.kvm_types.Sregs."""
        cdef kvm_sregs s
        cdef const uint8_t[::1] bitmap = sregs.interrupt_bitmap
        self._require_open()
        if <size_t>bitmap.shape[0] != sizeof(s.interrupt_bitmap):
            raise UsageError(f"Sregs.interrupt_bitmap must be {sizeof(s.interrupt_bitmap)} "
                             f"bytes, got {bitmap.shape[0]}")
        memset(&s, 0, sizeof(s))
        _segment_from_py(sregs.cs, &s.cs)
        _segment_from_py(sregs.ds, &s.ds)
        _segment_from_py(sregs.es, &s.es)
        _segment_from_py(sregs.fs, &s.fs)
        _segment_from_py(sregs.gs, &s.gs)
        _segment_from_py(sregs.ss, &s.ss)
        _segment_from_py(sregs.tr, &s.tr)
        _segment_from_py(sregs.ldt, &s.ldt)
        _dtable_from_py(sregs.gdt, &s.gdt)
        _dtable_from_py(sregs.idt, &s.idt)
        s.cr0, s.cr2, s.cr3, s.cr4 = sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4
        s.cr8, s.efer, s.apic_base = sregs.cr8, sregs.efer, sregs.apic_base
        memcpy(s.interrupt_bitmap, &bitmap[0], sizeof(s.interrupt_bitmap))
        _ioctl(self.fd, KVM_SET_SREGS, &s, "KVM_SET_SREGS")

    def set_cpuid(self, entries):
        """KVM_SET_CPUID2 from a list of CpuidEntry (see voidbox.cpuid.filter_cpuid)."""
        cdef list items = list(entries)
        cdef size_t count = len(items)
        cdef size_t i
        cdef kvm_cpuid2 *cpuid
        cdef kvm_cpuid_entry2 *entry
        self._require_open()
        cpuid = <kvm_cpuid2 *>calloc(1, sizeof(kvm_cpuid2) + count * sizeof(kvm_cpuid_entry2))
        if cpuid == NULL:
            raise MemoryError()
        try:
            cpuid.nent = count
            for i in range(count):
                item = items[i]
                entry = &cpuid.entries[i]
                entry.function = item.function
                entry.index = item.index
                entry.flags = item.flags
                entry.eax, entry.ebx, entry.ecx, entry.edx = item.eax, item.ebx, item.ecx, item.edx
            _ioctl(self.fd, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")
        finally:
            free(cpuid)

    def set_msrs(self, msrs):
        """KVM_SET_MSRS from (index, value) pairs.

        KVM stops at the first MSR it rejects and returns how many it set; that raises
        KvmError with errno 0 naming the rejected MSR.
        """
        cdef list items = list(msrs)
        cdef size_t count = len(items)
        cdef size_t i
        cdef int done
        cdef kvm_msrs *buf
        self._require_open()
        buf = <kvm_msrs *>calloc(1, sizeof(kvm_msrs) + count * sizeof(kvm_msr_entry))
        if buf == NULL:
            raise MemoryError()
        try:
            buf.nmsrs = count
            for i in range(count):
                buf.entries[i].index, buf.entries[i].data = items[i]
            done = _ioctl(self.fd, KVM_SET_MSRS, buf, "KVM_SET_MSRS")
            if <size_t>done != count:
                raise KvmError("KVM_SET_MSRS", 0,
                               f"MSR {buf.entries[done].index:#x} rejected ({done} of {count} set)")
        finally:
            free(buf)

    def get_msrs(self, indices):
        """KVM_GET_MSRS: {index: value}; an MSR KVM cannot read raises KvmError (errno 0)."""
        cdef list items = list(indices)
        cdef size_t count = len(items)
        cdef size_t i
        cdef int done
        cdef kvm_msrs *buf
        self._require_open()
        buf = <kvm_msrs *>calloc(1, sizeof(kvm_msrs) + count * sizeof(kvm_msr_entry))
        if buf == NULL:
            raise MemoryError()
        try:
            buf.nmsrs = count
            for i in range(count):
                buf.entries[i].index = items[i]
            done = _ioctl(self.fd, KVM_GET_MSRS, buf, "KVM_GET_MSRS")
            if <size_t>done != count:
                raise KvmError(
                    "KVM_GET_MSRS", 0,
                    f"MSR {buf.entries[done].index:#x} unreadable ({done} of {count} read)")
            return {buf.entries[i].index: buf.entries[i].data for i in range(count)}
        finally:
            free(buf)

    def set_fpu(self, uint16_t fcw=FPU_DEFAULT_FCW, uint32_t mxcsr=MXCSR_DEFAULT):
        """KVM_SET_FPU: x87 control word and MXCSR, everything else zero."""
        cdef kvm_fpu fpu
        self._require_open()
        memset(&fpu, 0, sizeof(fpu))
        fpu.fcw = fcw
        fpu.mxcsr = mxcsr
        _ioctl(self.fd, KVM_SET_FPU, &fpu, "KVM_SET_FPU")

    def get_lapic(self):
        """KVM_GET_LAPIC: the local APIC register page (needs the in-kernel irqchip)."""
        cdef kvm_lapic_state state
        self._require_open()
        _ioctl(self.fd, KVM_GET_LAPIC, &state, "KVM_GET_LAPIC")
        return PyBytes_FromStringAndSize(state.regs, sizeof(state.regs))

    def set_lapic(self, data):
        """KVM_SET_LAPIC from KVM_APIC_REG_SIZE bytes."""
        cdef kvm_lapic_state state
        cdef const uint8_t[::1] view = data
        self._require_open()
        if <size_t>view.shape[0] != sizeof(state.regs):
            raise UsageError(f"a LAPIC state is {sizeof(state.regs)} bytes, got {view.shape[0]}")
        memcpy(state.regs, &view[0], sizeof(state.regs))
        _ioctl(self.fd, KVM_SET_LAPIC, &state, "KVM_SET_LAPIC")

    def setup_lapic(self):
        """Program LVT LINT0 as ExtINT (the PIC's output) and LINT1 as NMI.

        That is how a PC's BIOS leaves them (MP spec §5.1, virtual wire mode); Firecracker
        and QEMU do the same. Needs the in-kernel irqchip."""
        regs = bytearray(self.get_lapic())
        for register, mode in ((APIC_LVT_LINT0, APIC_DELIVERY_MODE_EXTINT),
                               (APIC_LVT_LINT1, APIC_DELIVERY_MODE_NMI)):
            value = int.from_bytes(regs[register:register + 4], "little")
            value = (value & ~APIC_LVT_DELIVERY_MODE_MASK) | (mode << APIC_LVT_DELIVERY_MODE_SHIFT)
            regs[register:register + 4] = value.to_bytes(4, "little")
        self.set_lapic(bytes(regs))

    # -- running -------------------------------------------------------------------------

    def run(self):
        """KVM_RUN until the next exit, with the GIL released; returns a voidbox.exits value.

        A kick (or any signal) gives InterruptedExit; Python signal handlers run first, so
        KeyboardInterrupt surfaces here when the vCPU loop is on the main thread.
        """
        cdef int ret, err = 0
        self._require_open()
        if self.running:
            raise UsageError(f"vCPU {self.index} is already running in another thread")
        # Set with the GIL held, before the ioctl: a kick() that sees running == 0
        # happened before this point, so its immediate_exit store is already visible.
        self.thread = pthread_self()
        self.running = True
        with nogil:
            ret = ioctl(self.fd, KVM_RUN, 0)
            if ret < 0:
                err = errno
        self.running = False
        if self.close_pending:
            self._close()
            return INTERRUPTED_EXIT
        if ret < 0:
            if err != EINTR:
                raise KvmError("KVM_RUN", err)
            vb_store_u8(self.run_area + VB_RUN_IMMEDIATE_EXIT, 0)
            PyErr_CheckSignals()
            return INTERRUPTED_EXIT
        return _decode(self.run_area, self.run_size)

    def kick(self):
        """Make the current or next run() return InterruptedExit promptly; any thread."""
        if self.run_area == NULL or self.close_pending:
            return
        vb_store_u8(self.run_area + VB_RUN_IMMEDIATE_EXIT, 1)
        if self.running:
            # The handler does nothing; the signal only ends KVM_RUN with EINTR. A
            # signal landing just before or after the ioctl is harmless:
            # immediate_exit, set above, stops the next KVM_RUN.
            pthread_kill(self.thread, KICK_SIGNAL)  # ESRCH cannot happen: running

    def complete_io_in(self, data):
        """Answer the last KVM_EXIT_IO IN exit with exactly size*count bytes.

        They are copied into kvm_run's I/O data area; KVM hands them to the guest's
        register (or string buffer) on the next run()."""
        cdef const uint8_t[::1] view = data
        cdef uint64_t data_offset, length
        self._require_open()
        if (_u32(self.run_area, VB_RUN_EXIT_REASON) != KVM_EXIT_IO
                or _u8(self.run_area, VB_RUN_IO_DIRECTION) != KVM_EXIT_IO_IN
                or _io_area(self.run_area, self.run_size, &data_offset, &length) < 0):
            raise UsageError(f"vCPU {self.index}: the last exit is not a port IN")
        if <uint64_t>view.shape[0] != length:
            raise UsageError(f"vCPU {self.index}: the port IN wants {length} bytes, "
                             f"got {view.shape[0]}")
        # _io_area bounded [data_offset, data_offset + length) inside the mapping.
        if length:
            memcpy(self.run_area + data_offset, &view[0], length)

    def complete_mmio_read(self, data):
        """Answer the last KVM_EXIT_MMIO read: exactly mmio.len bytes into kvm_run->mmio.data."""
        cdef const uint8_t[::1] view = data
        cdef uint32_t length
        self._require_open()
        length = _u32(self.run_area, VB_RUN_MMIO_LEN)
        if (_u32(self.run_area, VB_RUN_EXIT_REASON) != KVM_EXIT_MMIO
                or _u8(self.run_area, VB_RUN_MMIO_IS_WRITE)
                or length < 1 or length > VB_RUN_MMIO_DATA_SIZE):
            raise UsageError(f"vCPU {self.index}: the last exit is not an MMIO read")
        if <uint64_t>view.shape[0] != length:
            raise UsageError(f"vCPU {self.index}: the MMIO read wants {length} bytes, "
                             f"got {view.shape[0]}")
        memcpy(self.run_area + VB_RUN_MMIO_DATA, &view[0], length)

    def close(self):
        """Unmap kvm_run and close the vCPU fd; idempotent.

        From another thread while run() is in KVM_RUN: kicks it, and run() closes on
        its way out (so the mapping never disappears under the ioctl).
        """
        if self.running:
            self.kick()
            self.close_pending = True
            return
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
