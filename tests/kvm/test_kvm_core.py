"""voidbox._kvm against /dev/kvm with tiny real-mode guests written as machine code.

Each guest runs in 16-bit real mode from RAM_CODE with CS base 0 (no page tables), and
is a handful of instructions: this host's KVM emulates every guest instruction. Only
[0, RAM_SIZE) of guest-physical space is RAM, so addresses above it exit as MMIO.
"""

import errno
import os
import select
import threading
import time

import pytest

from voidbox import layout
from voidbox.errors import UsageError, VoidboxError
from voidbox.exits import HltExit, InterruptedExit, IoExit, MmioExit
from voidbox.kvm_types import Regs
from voidbox.memory import GuestMemory

pytestmark = pytest.mark.kvm

from voidbox import _kvm  # noqa: E402 - a missing build must fail, not skip

RAM_SIZE = 0x80000  # 512 KiB of the GuestMemory is a memory slot; the rest of the space is MMIO
RAM_CODE = 0x1000
RAM_DATA = 0x2000
STACK = 0x8000
# Pages outside RAM for KVM's real-mode helpers (api.rst KVM_SET_TSS_ADDR), as vm.py does.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
TEST_PORT = 0x10
KVM_CAP_IRQCHIP = 0  # linux/kvm.h
MSR_IA32_SYSENTER_CS = 0x174  # SDM vol. 4, table 2-2: plain read/write, no side effects
# Real-mode instruction bytes used below (Intel SDM vol. 2).
HLT = b"\xf4"
JMP_SELF = b"\xeb\xfe"  # jmp $
# A bound for waits on another thread; reaching it fails the test (not a timing assert).
WAIT_LIMIT = 60.0


def mov_al(value):
    return b"\xb0" + bytes([value])


def mov_ax(value):
    return b"\xb8" + value.to_bytes(2, "little")


def mov_eax(value):
    return b"\x66\xb8" + value.to_bytes(4, "little")


def mov_dx(value):
    return b"\xba" + value.to_bytes(2, "little")


def out_imm8(width, port):  # out imm8, al/ax/eax
    return {1: b"\xe6", 2: b"\xe7", 4: b"\x66\xe7"}[width] + bytes([port])


def out_dx(width):  # out dx, al/ax/eax
    return {1: b"\xee", 2: b"\xef", 4: b"\x66\xef"}[width]


def in_dx(width):  # in al/ax/eax, dx
    return {1: b"\xec", 2: b"\xed", 4: b"\x66\xed"}[width]


def store_es(width, addr):  # mov es:[addr], al/ax/eax
    return {1: b"\x26\xa2", 2: b"\x26\xa3", 4: b"\x26\x66\xa3"}[width] + addr.to_bytes(2, "little")


def load_ds(width, addr):  # mov al/ax/eax, ds:[addr]
    return {1: b"\xa0", 2: b"\xa1", 4: b"\x66\xa1"}[width] + addr.to_bytes(2, "little")


def store_imm_ds(width, addr, value):  # mov byte/word/dword ds:[addr], imm
    opcode = {1: b"\xc6\x06", 2: b"\xc7\x06", 4: b"\x66\xc7\x06"}[width]
    return opcode + addr.to_bytes(2, "little") + value.to_bytes(width, "little")


class Guest:
    """A VM with one vCPU in real mode at RAM_CODE; closes everything it opened."""

    def __init__(self, code, irqchip=False, ds_base=0):
        self.kvm = _kvm.Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        if irqchip:
            self.vm.create_irqchip()
        self.memory = GuestMemory(64 * layout.MiB)
        self.vm.set_user_memory_region(0, 0, RAM_SIZE, self.memory.mmap)
        self.memory.write(RAM_CODE, code)
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        # A real-mode segment base outside 1 MiB, as set_sregs allows (the hidden
        # descriptor cache), reaches the MMIO gap with 16-bit offsets.
        sregs.ds.base = ds_base
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(Regs(rip=RAM_CODE, rsp=STACK))

    def run(self):
        return self.vcpu.run()

    def close(self):
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.memory.close()


@pytest.fixture
def guest_factory():
    guests = []

    def make(code, **kwargs):
        guest = Guest(code, **kwargs)
        guests.append(guest)
        return guest

    yield make
    for guest in guests:
        guest.close()


def test_kvm_basics():
    with _kvm.Kvm() as kvm:
        assert kvm.api_version == 12
        assert kvm.vcpu_mmap_size() >= 4096
        assert kvm.check_extension(KVM_CAP_IRQCHIP) > 0
        cpuid = kvm.supported_cpuid()
        assert any(entry.function == 0 for entry in cpuid)
        assert any(entry.function == 0x4000_0000 for entry in cpuid)


def test_supported_cpuid_grows_its_buffer_on_e2big(monkeypatch):
    with _kvm.Kvm() as kvm:
        expected = kvm.supported_cpuid()
        monkeypatch.setattr(_kvm, "_CPUID_ENTRIES_FIRST", 1)  # forces E2BIG, then doubling
        assert kvm.supported_cpuid() == expected


def test_kvm_error_on_missing_device(tmp_path):
    with pytest.raises(_kvm.KvmError) as info:
        _kvm.Kvm(str(tmp_path / "no-kvm"))
    assert info.value.errno == errno.ENOENT
    assert "\n" not in str(info.value)


def test_port_out_widths(guest_factory):
    code = (
        mov_al(0x11) + out_imm8(1, TEST_PORT)
        + mov_ax(0x2233) + out_imm8(2, TEST_PORT)
        + mov_eax(0x44556677) + out_imm8(4, TEST_PORT)
        + mov_dx(layout.SERIAL_COM1_PORT) + mov_al(ord("A")) + out_dx(1)
        + HLT
    )
    guest = guest_factory(code)
    assert guest.run() == IoExit(TEST_PORT, 1, True, 1, b"\x11")
    assert guest.run() == IoExit(TEST_PORT, 2, True, 1, (0x2233).to_bytes(2, "little"))
    assert guest.run() == IoExit(TEST_PORT, 4, True, 1, (0x44556677).to_bytes(4, "little"))
    assert guest.run() == IoExit(layout.SERIAL_COM1_PORT, 1, True, 1, b"A")
    assert guest.run() == HltExit()


@pytest.mark.parametrize("width", [1, 2, 4])
def test_port_in_gets_complete_io_in(guest_factory, width):
    code = mov_dx(layout.I8042_DATA_PORT) + in_dx(width) + store_es(width, RAM_DATA) + HLT
    guest = guest_factory(code)
    exit = guest.run()
    assert exit == IoExit(layout.I8042_DATA_PORT, width, False, 1, b"")
    answer = bytes(range(0xA1, 0xA1 + width))
    with pytest.raises(UsageError):
        guest.vcpu.complete_io_in(answer + b"\0")  # the wrong size is refused
    guest.vcpu.complete_io_in(answer)
    assert guest.run() == HltExit()
    assert guest.memory.read(RAM_DATA, width) == answer


def test_mmio_write_and_read_widths(guest_factory):
    base = layout.VIRTIO_MMIO_BASE
    code = (
        store_imm_ds(1, 0x10, 0xAB)
        + store_imm_ds(2, 0x20, 0xBEEF)
        + store_imm_ds(4, 0x30, 0x12345678)
        + load_ds(4, 0x40) + store_es(4, RAM_DATA)
        + HLT
    )
    guest = guest_factory(code, ds_base=base)
    assert guest.run() == MmioExit(base + 0x10, 1, True, b"\xab")
    assert guest.run() == MmioExit(base + 0x20, 2, True, (0xBEEF).to_bytes(2, "little"))
    assert guest.run() == MmioExit(base + 0x30, 4, True, (0x12345678).to_bytes(4, "little"))
    assert guest.run() == MmioExit(base + 0x40, 4, False, b"")
    with pytest.raises(UsageError):
        guest.vcpu.complete_io_in(b"\0\0\0\0")  # the last exit was MMIO, not port IN
    guest.vcpu.complete_mmio_read(b"\x0d\xf0\xad\x0b")
    assert guest.run() == HltExit()
    assert guest.memory.read(RAM_DATA, 4) == b"\x0d\xf0\xad\x0b"


def test_mmio_just_below_1mib_is_not_ram(guest_factory):
    # ds = 0xD000 in real mode: linear 0xD0000 + offset, above RAM_SIZE.
    guest = guest_factory(store_imm_ds(2, 0x8, 0x5A5A) + HLT, ds_base=0xD0000)
    assert guest.run() == MmioExit(0xD0008, 2, True, b"\x5a\x5a")


def _eventfd_count(efd):
    readable, _, _ = select.select([efd], [], [], 0)
    if not readable:
        return 0
    return os.eventfd_read(efd)


def test_ioeventfd_signals_without_exit(guest_factory):
    base = layout.VIRTIO_MMIO_BASE
    notify = 0x50  # like VIRTIO_MMIO_QUEUE_NOTIFY, a 32-bit register
    pio_port = 0x20
    code = (
        store_imm_ds(4, notify, 1)  # ioeventfd: no exit
        + mov_ax(7) + out_imm8(2, pio_port)  # port ioeventfd matching 7: no exit
        + mov_ax(8) + out_imm8(2, pio_port)  # does not match: an exit
        + HLT
    )
    guest = guest_factory(code, ds_base=base)
    mmio_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    pio_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        guest.vm.register_ioeventfd(mmio_efd, base + notify, 4)
        guest.vm.register_ioeventfd(pio_efd, pio_port, 2, pio=True, datamatch=7)
        assert guest.run() == IoExit(pio_port, 2, True, 1, b"\x08\x00")
        assert _eventfd_count(mmio_efd) == 1
        assert _eventfd_count(pio_efd) == 1
        assert guest.run() == HltExit()
        guest.vm.register_ioeventfd(mmio_efd, base + notify, 4, deassign=True)
        with pytest.raises(_kvm.KvmError) as info:  # already gone
            guest.vm.register_ioeventfd(mmio_efd, base + notify, 4, deassign=True)
        assert info.value.op == "KVM_IOEVENTFD"
    finally:
        os.close(mmio_efd)
        os.close(pio_efd)


def test_kick_before_run_returns_promptly_then_clears(guest_factory):
    guest = guest_factory(mov_al(1) + out_imm8(1, TEST_PORT) + HLT)
    guest.vcpu.kick()
    assert guest.run() == InterruptedExit()
    # immediate_exit was cleared: the guest now runs to its OUT.
    assert guest.run() == IoExit(TEST_PORT, 1, True, 1, b"\x01")


def test_kick_from_another_thread_stops_a_spinning_guest(guest_factory):
    # inc word es:[RAM_DATA]; jmp back: the counter shows the guest is inside KVM_RUN.
    loop = b"\x26\xff\x06" + RAM_DATA.to_bytes(2, "little")
    code = loop + b"\xeb" + bytes([(-(len(loop) + 2)) & 0xFF])
    guest = guest_factory(code)
    results = []
    thread = threading.Thread(target=lambda: results.append(guest.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_LIMIT
    while guest.memory.read(RAM_DATA, 2) == b"\0\0" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guest.memory.read(RAM_DATA, 2) != b"\0\0", "the guest never ran"
    # Only the signal can end this run: immediate_exit is read once, on entry.
    guest.vcpu.kick()
    thread.join(WAIT_LIMIT)
    assert not thread.is_alive(), "kick() did not interrupt KVM_RUN"
    assert results == [InterruptedExit()]


def test_kick_spinning_jmp_self(guest_factory):
    guest = guest_factory(JMP_SELF)
    results = []
    started = threading.Event()

    def vcpu_thread():
        started.set()
        results.append(guest.run())

    thread = threading.Thread(target=vcpu_thread, daemon=True)
    thread.start()
    started.wait()
    guest.vcpu.kick()  # before or inside KVM_RUN: both must end run()
    thread.join(WAIT_LIMIT)
    assert not thread.is_alive()
    assert results == [InterruptedExit()]
    assert guest.vcpu.get_regs().rip == RAM_CODE


def test_kick_wakes_a_vcpu_halted_in_the_kernel(guest_factory):
    # With the in-kernel irqchip KVM handles HLT itself: KVM_RUN sleeps until an
    # interrupt, so only the kick can end it (how VM.stop reaches an idle guest).
    code = b"\xfa" + store_imm_ds(1, RAM_DATA, 1) + HLT  # cli; mov byte [RAM_DATA], 1; hlt
    guest = guest_factory(code, irqchip=True)
    results = []
    thread = threading.Thread(target=lambda: results.append(guest.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_LIMIT
    while guest.memory.read(RAM_DATA, 1) == b"\0" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guest.memory.read(RAM_DATA, 1) == b"\1", "the guest never ran"
    guest.vcpu.kick()
    thread.join(WAIT_LIMIT)
    assert not thread.is_alive(), "kick() did not end an in-kernel HLT"
    assert results == [InterruptedExit()]


def test_close_from_another_thread_during_run(guest_factory):
    guest = guest_factory(JMP_SELF)
    results = []
    started = threading.Event()

    def vcpu_thread():
        started.set()
        results.append(guest.run())

    thread = threading.Thread(target=vcpu_thread, daemon=True)
    thread.start()
    started.wait()
    guest.vcpu.close()
    thread.join(WAIT_LIMIT)
    assert not thread.is_alive()
    assert results == [InterruptedExit()]
    with pytest.raises(UsageError):
        guest.vcpu.run()


def test_irqchip_lines_lapic_and_irqfd(guest_factory):
    guest = guest_factory(HLT, irqchip=True)
    guest.vm.irq_line(layout.SERIAL_COM1_IRQ, 1)
    guest.vm.irq_line(layout.SERIAL_COM1_IRQ, 0)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        guest.vm.register_irqfd(efd, layout.VIRTIO_MMIO_FIRST_IRQ)
        guest.vm.register_irqfd(efd, layout.VIRTIO_MMIO_FIRST_IRQ, deassign=True)
    finally:
        os.close(efd)
    guest.vcpu.setup_lapic()
    lapic = guest.vcpu.get_lapic()
    assert len(lapic) == _kvm.KVM_APIC_REG_SIZE
    lint0 = int.from_bytes(lapic[_kvm.APIC_LVT_LINT0:_kvm.APIC_LVT_LINT0 + 4], "little")
    lint1 = int.from_bytes(lapic[_kvm.APIC_LVT_LINT1:_kvm.APIC_LVT_LINT1 + 4], "little")
    assert (lint0 >> 8) & 0b111 == _kvm.APIC_DELIVERY_MODE_EXTINT
    assert (lint1 >> 8) & 0b111 == _kvm.APIC_DELIVERY_MODE_NMI


def test_irq_line_without_irqchip_is_a_kvm_error(guest_factory):
    guest = guest_factory(HLT)
    with pytest.raises(_kvm.KvmError) as info:
        guest.vm.irq_line(layout.SERIAL_COM1_IRQ, 1)
    assert info.value.op == "KVM_IRQ_LINE"
    assert info.value.errno != 0


def test_register_state_round_trips(guest_factory):
    from voidbox.cpuid import filter_cpuid

    guest = guest_factory(HLT)
    vcpu = guest.vcpu
    regs = vcpu.get_regs()
    regs.rax, regs.r15 = 0x1122334455667788, 0xFFFF_FFFF_FFFF_FFFF
    vcpu.set_regs(regs)
    assert vcpu.get_regs() == regs
    sregs = vcpu.get_sregs()
    sregs.es.base = 0x12340
    sregs.es.selector = 0x1234
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, 0x1F
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs() == sregs
    vcpu.set_cpuid(filter_cpuid(guest.kvm.supported_cpuid(), 0, 1))
    vcpu.set_msrs([(MSR_IA32_SYSENTER_CS, 0x10)])
    assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS]) == {MSR_IA32_SYSENTER_CS: 0x10}
    vcpu.set_fpu()
    assert guest.run() == HltExit()


def test_kvm_error_carries_errno_and_op(guest_factory):
    guest = guest_factory(HLT)
    with pytest.raises(_kvm.KvmError) as info:
        # Not a multiple of the page size (api.rst: KVM_SET_USER_MEMORY_REGION).
        guest.vm.set_user_memory_region(1, 0x100000, 0x1001, guest.memory.mmap, 0x100000)
    error = info.value
    assert isinstance(error, VoidboxError)
    assert error.errno == errno.EINVAL
    assert error.op == "KVM_SET_USER_MEMORY_REGION"
    assert str(error).startswith("KVM_SET_USER_MEMORY_REGION failed")
    assert "\n" not in str(error)


def test_memory_region_outside_buffer_is_a_usage_error(guest_factory):
    guest = guest_factory(HLT)
    with pytest.raises(UsageError):
        guest.vm.set_user_memory_region(1, 0x100000, 0x2000, guest.memory.mmap,
                                        guest.memory.size - 0x1000)
    with pytest.raises(UsageError):
        guest.vm.set_user_memory_region(1, 0x100000, 0x1000, b"\0" * 0x2000)  # read-only


def test_close_is_idempotent_and_final(guest_factory):
    guest = guest_factory(HLT)
    for _ in range(2):
        guest.vcpu.close()
        guest.vm.close()
        guest.kvm.close()
    guest.vcpu.kick()  # a no-op once closed
    with pytest.raises(UsageError):
        guest.vcpu.run()
    with pytest.raises(UsageError):
        guest.vm.create_vcpu(1)
    with pytest.raises(UsageError):
        guest.kvm.create_vm()


def test_objects_are_made_by_their_parents():
    with pytest.raises(TypeError):
        _kvm.VmFd()
    with pytest.raises(TypeError):
        _kvm.Vcpu()


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _vcpu_mappings():
    with open("/proc/self/maps") as maps:
        return sum("kvm-vcpu" in line for line in maps)


@pytest.mark.parametrize("explicit_close", [True, False])
def test_fds_and_mappings_are_released(explicit_close):
    import gc

    gc.collect()
    fds, mappings = _open_fds(), _vcpu_mappings()
    guest = Guest(HLT)
    assert _open_fds() > fds
    assert _vcpu_mappings() == mappings + 1
    if explicit_close:
        guest.close()
    else:  # __dealloc__ closes what close() was never asked to
        guest.memory.close()
        del guest
        gc.collect()
    assert _open_fds() == fds
    assert _vcpu_mappings() == mappings
