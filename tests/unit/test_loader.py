"""load_kernel end to end on synthetic kernels: placement, memory contents, BootPlan."""

import os
import random
import struct

import pytest

from tests.default_guest import require_default_guest
from tests.unit.test_bzimage import PAYLOAD, make_bzimage
from tests.unit.test_elf import KERNEL_VADDR, make_elf, note, pvh_note
from voidbox import layout
from voidbox.boot import bootparams as bp
from voidbox.boot import load_kernel, pvh
from voidbox.boot.e820 import E820_RAM
from voidbox.errors import UsageError
from voidbox.kvm_types import Sregs
from voidbox.memory import GuestMemory

MEM_SIZE = 64 << 20


@pytest.fixture
def mem():
    with GuestMemory(MEM_SIZE) as m:
        yield m


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def zero_page(mem):
    return mem.read(layout.ZERO_PAGE_ADDR, bp.BOOT_PARAMS_SIZE)


def u(page, fmt, offset):
    return struct.unpack_from(fmt, page, offset)[0]


def linux_elf(**kwargs):
    code = b"\x48\x31\xc0" + b"\x90" * 0x900
    return make_elf(segments=[(0x1000000, KERNEL_VADDR, code, 0x10000)], entry=0x1000000,
                    notes=note(b"Xen", 6, b"linux\0") + pvh_note(0x1000850), **kwargs)


def test_freestanding_elf(mem, tmp_path):
    path = write(tmp_path, "guest", make_elf(segments=[(0x100000, 0x100000, b"\xf4code", 0x2000)], entry=0x100000))
    plan = load_kernel(mem, path, "console=ttyS0")
    assert plan.entry_mode == "elf64"
    assert plan.entry == 0x100000
    assert (plan.regs.rip, plan.regs.rsi, plan.regs.rsp) == (0x100000, layout.ZERO_PAGE_ADDR, layout.BOOT_STACK_ADDR)
    assert plan.kernel_end == 0x102000
    assert plan.initrd is None
    assert mem.read(0x100000, 5) == b"\xf4code"
    assert mem.read(layout.CMDLINE_ADDR, 14) == b"console=ttyS0\0"
    page = zero_page(mem)
    assert page[0x202:0x206] == b"HdrS" and u(page, "<I", 0x228) == layout.CMDLINE_ADDR
    assert u(page, "<Q", 0x070) == layout.ACPI_ADDR
    assert page[0x1E8] == len(plan.e820) == 3
    assert u(page, "<I", 0x238) == layout.CMDLINE_MAX - 1
    sregs = plan.sregs_update(Sregs(cr0=0x60000010))
    assert (sregs.cr0, sregs.cr3, sregs.cs.l) == (0x80000011, layout.PML4_ADDR, 1)


def test_vmlinux_prefers_pvh(mem, tmp_path):
    path = write(tmp_path, "vmlinux", linux_elf())
    plan = load_kernel(mem, path, "root=/dev/vda", rsdp_addr=0xE0000)
    assert plan.entry_mode == "pvh"
    assert plan.entry == plan.regs.rip == 0x1000850
    assert plan.regs.rbx == layout.PVH_START_INFO_ADDR
    assert plan.kernel_end == 0x1010000
    info = pvh.HVM_START_INFO.unpack(mem.read(layout.PVH_START_INFO_ADDR, pvh.HVM_START_INFO.size))
    assert info == (0x336EC578, 1, 0, 0, 0, layout.CMDLINE_ADDR, 0xE0000, layout.PVH_MEMMAP_ADDR, 3, 0)
    memmap = mem.read(layout.PVH_MEMMAP_ADDR, 3 * 24)
    assert [pvh.HVM_MEMMAP_TABLE_ENTRY.unpack_from(memmap, 24 * i)[:3] for i in range(3)] == [
        tuple(e) for e in plan.e820]
    sregs = plan.sregs_update(Sregs())
    assert (sregs.cr0, sregs.efer, sregs.cs.db, sregs.cs.l) == (0x11, 0, 1, 0)


def test_vmlinux_64bit_entry_when_pvh_not_preferred(mem, tmp_path):
    path = write(tmp_path, "vmlinux", linux_elf())
    plan = load_kernel(mem, path, "quiet", prefer_pvh=False)
    assert plan.entry_mode == "linux64"
    assert plan.entry == 0x1000000 and plan.regs.rsi == layout.ZERO_PAGE_ADDR
    assert mem.read(0x1000000, 3) == b"\x48\x31\xc0"


def test_bzimage(mem, tmp_path):
    data = make_bzimage()
    path = write(tmp_path, "bzImage", data)
    plan = load_kernel(mem, path, "console=ttyS0")
    assert plan.entry_mode == "linux64"
    assert plan.entry == layout.KERNEL_LOAD_ADDR + 0x200
    assert mem.read(layout.KERNEL_LOAD_ADDR, len(PAYLOAD)) == PAYLOAD
    assert mem.read(plan.entry, 10) == b"STARTUP_64"
    assert plan.kernel_end == layout.KERNEL_LOAD_ADDR + 0x200000  # init_size beats the file size
    page = zero_page(mem)
    assert page[0x1F1:0x210] == data[0x1F1:0x210]  # copied header
    assert u(page, "<H", 0x236) == bp.XLF_KERNEL_64 | bp.XLF_CAN_BE_LOADED_ABOVE_4G
    assert page[0x210] == 0xFF and page[0x211] & bp.CAN_USE_HEAP
    assert u(page, "<I", 0x228) == layout.CMDLINE_ADDR
    assert u(page, "<I", 0x214) == layout.KERNEL_LOAD_ADDR
    assert page[0x264 + 4 : 0x264 + 8] == b"TAIL"


def test_initrd_goes_high_and_page_aligned(mem, tmp_path):
    kernel = write(tmp_path, "vmlinux", linux_elf())
    initrd = write(tmp_path, "initrd", b"\x07" * 5000)
    plan = load_kernel(mem, kernel, "", initrd_path=initrd)
    gpa, size = plan.initrd
    assert size == 5000 and gpa % 4096 == 0
    assert gpa + size <= MEM_SIZE and gpa + size + 4096 > MEM_SIZE
    assert mem.read(gpa, size) == b"\x07" * 5000
    page = zero_page(mem)
    assert (u(page, "<I", 0x218), u(page, "<I", 0x21C)) == (gpa, size)
    info = pvh.HVM_START_INFO.unpack(mem.read(layout.PVH_START_INFO_ADDR, pvh.HVM_START_INFO.size))
    assert (info[3], info[4]) == (1, pvh.PVH_MODLIST_ADDR)
    assert pvh.HVM_MODLIST_ENTRY.unpack(mem.read(pvh.PVH_MODLIST_ADDR, 32)) == (gpa, size, 0, 0)


def test_initrd_respects_initrd_addr_max(mem, tmp_path):
    kernel = write(tmp_path, "bzImage", make_bzimage(initrd_addr_max=0x1FFFFFF))
    initrd = write(tmp_path, "initrd", b"\x01" * 10000)
    plan = load_kernel(mem, kernel, "", initrd_path=initrd)
    gpa, size = plan.initrd
    assert gpa + size <= 0x2000000 and gpa == (0x2000000 - size) & ~0xFFF
    assert gpa >= plan.kernel_end


def test_initrd_that_does_not_fit(mem, tmp_path):
    kernel = write(tmp_path, "bzImage", make_bzimage(initrd_addr_max=0x1FFFFFF))
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(0x2000000 - layout.KERNEL_LOAD_ADDR)  # overlaps the kernel's init_size
    with pytest.raises(UsageError, match="initrd"):
        load_kernel(mem, kernel, "", initrd_path=str(initrd))


def test_missing_or_empty_initrd(mem, tmp_path):
    kernel = write(tmp_path, "vmlinux", linux_elf())
    with pytest.raises(UsageError, match="cannot open initrd"):
        load_kernel(mem, kernel, "", initrd_path=str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="empty"):
        load_kernel(mem, kernel, "", initrd_path=write(tmp_path, "empty", b""))


def test_cmdline_limits(mem, tmp_path):
    bz = write(tmp_path, "bzImage", make_bzimage(cmdline_size=16))
    assert load_kernel(mem, bz, "x" * 16).cmdline == "x" * 16
    assert mem.read(layout.CMDLINE_ADDR, 17) == b"x" * 16 + b"\0"
    with pytest.raises(UsageError, match="at most 16"):
        load_kernel(mem, bz, "x" * 17)
    guest = write(tmp_path, "guest", make_elf())
    load_kernel(mem, guest, "y" * (layout.CMDLINE_MAX - 1))
    with pytest.raises(UsageError, match="command line"):
        load_kernel(mem, guest, "y" * layout.CMDLINE_MAX)
    with pytest.raises(UsageError, match="NUL"):
        load_kernel(mem, guest, "a\0b")
    vmlinux = write(tmp_path, "vmlinux", linux_elf())
    load_kernel(mem, vmlinux, "z" * 2047)
    assert u(zero_page(mem), "<I", 0x238) == 2047
    with pytest.raises(UsageError, match="at most 2047"):
        load_kernel(mem, vmlinux, "z" * 2048)


@pytest.mark.parametrize("data", [b"", b"#!/bin/sh\necho hi\n", bytes(4096), b"\x7fEL"])
def test_not_a_kernel(mem, tmp_path, data):
    with pytest.raises(UsageError, match="is not a bzImage or x86-64 ELF kernel|truncated"):
        load_kernel(mem, write(tmp_path, "k", data), "")


def test_missing_kernel(mem, tmp_path):
    with pytest.raises(UsageError, match="cannot open kernel"):
        load_kernel(mem, str(tmp_path / "nope"), "")


@pytest.mark.parametrize(
    "segment, message",
    [
        ((MEM_SIZE - 0x1000, MEM_SIZE - 0x1000, b"x", 0x2000), "does not fit in guest RAM"),
        ((0x8000, 0x8000, b"x", 0x1000), "boot area"),
        ((layout.MMIO_GAP_START, layout.MMIO_GAP_START, b"x", 1), "does not fit in guest RAM"),
    ],
)
def test_segment_outside_ram(mem, tmp_path, segment, message):
    path = write(tmp_path, "k", make_elf(segments=[segment], entry=segment[0]))
    with pytest.raises(UsageError, match=message):
        load_kernel(mem, path, "")


def test_bzimage_too_big_for_ram(tmp_path):
    with GuestMemory(16 << 20) as small:
        with pytest.raises(UsageError, match="does not fit in guest RAM"):
            load_kernel(small, write(tmp_path, "bzImage", make_bzimage()), "")


def test_e820_in_zero_page_matches_plan(mem, tmp_path):
    plan = load_kernel(mem, write(tmp_path, "guest", make_elf()), "")
    page = zero_page(mem)
    table = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(page[0x1E8])]
    assert table == [tuple(e) for e in plan.e820]
    assert table[-1] == (layout.HIMEM_ADDR, MEM_SIZE - layout.HIMEM_ADDR, E820_RAM)


@pytest.mark.parametrize("kind", ["elf", "bzimage"])
def test_hostile_files_give_usage_errors_only(mem, tmp_path, kind):
    """Truncations and byte flips of valid kernels load or fail with UsageError, nothing else."""
    good = linux_elf() if kind == "elf" else make_bzimage()
    rng = random.Random(1234)
    header_len = 0x400 if kind == "elf" else 0x300
    cases = [good[:n] for n in range(0, len(good), 37)]
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(header_len)] = rng.randrange(256)
        cases.append(bytes(data))
    path = tmp_path / "k"
    outcomes = {"loaded": 0, "rejected": 0}
    for data in cases:
        path.write_bytes(data)
        try:
            load_kernel(mem, str(path), "console=ttyS0")
            outcomes["loaded"] += 1
        except UsageError as e:
            assert "\n" not in str(e)
            outcomes["rejected"] += 1
    assert outcomes["loaded"] and outcomes["rejected"]


@pytest.mark.parametrize("prefer_pvh", [True, False])
def test_real_vmlinux(prefer_pvh):
    vmlinux = require_default_guest().vmlinux
    with GuestMemory(256 << 20) as mem:
        plan = load_kernel(mem, os.fspath(vmlinux), "console=ttyS0", prefer_pvh=prefer_pvh)
        assert plan.entry_mode in (("pvh", "linux64") if prefer_pvh else ("linux64",))
        assert layout.KERNEL_LOAD_ADDR <= plan.entry < plan.kernel_end
        if plan.entry_mode == "pvh":
            assert mem.read(plan.entry, 1) == b"\xfc"  # pvh_start_xen begins with cld


def test_probe_initrd_refuses_what_the_loader_would(tmp_path):
    """--accel qemu hands the initrd to QEMU's loader: an empty or unopenable one is the
    same usage error voidbox's own loader gives, not a guest that panics."""
    from voidbox.boot.loader import probe_initrd
    from voidbox.errors import UsageError

    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match="is empty"):
        probe_initrd(str(empty))
    with pytest.raises(UsageError, match="cannot open initrd"):
        probe_initrd(str(tmp_path / "missing.img"))
    good = tmp_path / "initrd.img"
    good.write_bytes(b"070701")
    probe_initrd(str(good))


@pytest.mark.parametrize("kind", ["elf", "bzimage"])
def test_probe_kernel_refuses_what_the_loader_would(mem, tmp_path, kind):
    """--accel qemu hands the kernel to QEMU's loader: a truncated or corrupt one is the
    usage error voidbox's own loader gives (exit 2, one line), not QEMU failing to start.
    Each truncation of a good kernel: the probe refuses exactly what the loader refuses
    (the loader alone also knows guest RAM, which the probe cannot check)."""
    from voidbox.boot.loader import probe_kernel

    good = linux_elf() if kind == "elf" else make_bzimage()
    path = tmp_path / "k"
    refused = 0
    for n in list(range(0, 0x400, 7)) + list(range(0x400, len(good) + 1, 331)) + [len(good)]:
        path.write_bytes(good[:n])
        try:
            load_kernel(mem, str(path), "")
            loader_error = None
        except UsageError as e:
            loader_error = str(e)
        try:
            probe_kernel(str(path))
            probe_error = None
        except UsageError as e:
            probe_error = str(e)
        assert probe_error == loader_error, n
        refused += probe_error is not None
    assert 0 < refused
    path.write_bytes(good)
    assert probe_kernel(str(path)) == kind


def test_probe_kernel_refuses_a_pvh_entry_outside_the_kernel(mem, tmp_path):
    """QEMU enters an ELF kernel at its PVH entry: one outside every loadable segment is
    the loader's usage error under --accel qemu too, not a guest that jumps nowhere."""
    from voidbox.boot.loader import probe_kernel

    code = b"\x90" * 0x100
    path = write(tmp_path, "vmlinux", make_elf(
        segments=[(0x1000000, KERNEL_VADDR, code, 0x1000)], entry=0x1000000,
        notes=note(b"Xen", 6, b"linux\0") + pvh_note(0x2000000)))
    with pytest.raises(UsageError, match="PVH entry 0x2000000 is not in any loadable") as probed:
        probe_kernel(path)
    with pytest.raises(UsageError) as loaded:
        load_kernel(mem, path, "")
    assert str(probed.value) == str(loaded.value)
