"""Load a kernel (bzImage, Linux vmlinux or freestanding ELF) and plan the boot vCPU's entry.

`load_kernel` writes everything the guest needs into guest memory (kernel, initrd,
command line, boot_params, PVH start info, GDT, page tables) and returns a BootPlan;
the VM applies `regs` and `sregs_update(current_sregs)` to vCPU 0 only.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from .. import layout
from .._records import dataclass
from ..errors import GuestMemoryError, UsageError
from ..kvm_types import Regs, Sregs
from . import bootparams, bzimage, elf, pvh
from .cpu_state import (
    ENTRY_ELF64,
    ENTRY_LINUX64,
    ENTRY_PVH,
    entry_regs,
    entry_sregs,
    write_boot_tables,
)
from .e820 import E820Entry, build_e820

PAGE_SIZE = 0x1000
DEFAULT_INITRD_ADDR_MAX = bzimage.DEFAULT_INITRD_ADDR_MAX
# COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h), the buffer every x86 Linux copies
# the command line into: a vmlinux carries no cmdline_size, and a longer line would be
# cut silently.
LINUX_COMMAND_LINE_SIZE = 2048


@dataclass
class BootPlan:
    """How to enter the loaded kernel: apply `regs` and `sregs_update(vcpu0.get_sregs())`
    to the boot vCPU only (the others wait for INIT/SIPI, see cpu_state)."""

    entry_mode: str  # "linux64", "pvh" or "elf64"
    entry: int  # guest-physical entry point
    regs: Regs
    sregs_update: Callable[[Sregs], Sregs]  # current sregs of vCPU 0 -> sregs to set
    cmdline: str
    e820: list[E820Entry]
    kernel_end: int  # first free byte after the kernel image (page aligned)
    initrd: tuple[int, int] | None  # (gpa, size)


def _page_up(value: int) -> int:
    return (value + PAGE_SIZE - 1) & -PAGE_SIZE


def _low_ram_end(memory) -> int:
    return next(r.end for r in memory.regions if r.gpa <= layout.HIMEM_ADDR < r.end)


def _check_fits(memory, path: str, gpa: int, size: int, what: str) -> None:
    if gpa < layout.HIMEM_ADDR:
        raise UsageError(
            f"{path}: {what} at {gpa:#x} overlaps voidbox's boot area below {layout.HIMEM_ADDR:#x}"
        )
    if not memory.contains(gpa, size):
        raise UsageError(
            f"{path}: {what} [{gpa:#x}, {gpa + size:#x}) does not fit in guest RAM"
            f" ({memory.size >> 20} MiB); give the VM more memory"
        )


def _open(path: str, what: str):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot open {what} {path}: {e.strerror}") from None
    return f


def encode_cmdline(cmdline: str, limit: int) -> bytes:
    """The command line as the kernel reads it: bytes, at most `limit` long, NUL terminated."""
    # surrogateescape: bytes that came in through argv undecoded go out unchanged.
    data = cmdline.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise UsageError("kernel command line contains a NUL byte")
    if len(data) > limit:
        raise UsageError(f"kernel command line is {len(data)} bytes; this kernel accepts at most {limit}")
    return data + b"\0"


def place_initrd(memory, size: int, kernel_end: int, addr_max: int) -> int:
    """The highest page-aligned address in low RAM where `size` bytes end at or below
    `addr_max` (inclusive, as initrd_addr_max) and start at or after `kernel_end`."""
    top = min(_low_ram_end(memory), addr_max + 1)
    gpa = (top - size) & -PAGE_SIZE
    if size <= 0 or gpa < kernel_end:
        raise UsageError(
            f"initrd of {size} bytes does not fit between the kernel's end ({kernel_end:#x})"
            f" and {top:#x}; give the VM more memory"
        )
    return gpa


def _load_initrd(memory, path: str, kernel_end: int, addr_max: int) -> tuple[int, int]:
    with _open(path, "initrd") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise UsageError(f"initrd {path} is empty")
        gpa = place_initrd(memory, size, kernel_end, addr_max)
        elf.read_exact(f, 0, memory.view(gpa, size), path)
    return gpa, size



@dataclass
class _Loaded:
    """What loading the kernel image decided, before the shared boot structures."""

    mode: str
    entry: int
    kernel_end: int
    setup_header: bytes | None  # a bzImage's, copied into boot_params
    code32_start: int
    cmdline_limit: int  # longest command line, excluding the NUL
    initrd_addr_max: int


def _load_elf(memory, f, file_size: int, path: str, prefer_pvh: bool) -> _Loaded:
    kernel = elf.parse_elf(f, file_size, path)
    for seg in kernel.segments:
        _check_fits(memory, path, seg.paddr, seg.memsz, "segment")
    if prefer_pvh and kernel.pvh_entry is not None:
        mode, entry = ENTRY_PVH, kernel.pvh_entry
        if not kernel.holds(entry):
            raise UsageError(f"{path}: PVH entry {entry:#x} is not in any loadable segment")
    else:
        mode = ENTRY_LINUX64 if kernel.is_linux else ENTRY_ELF64
        entry = kernel.physical_entry()
    elf.load_segments(memory, f, kernel)
    return _Loaded(
        mode=mode,
        entry=entry,
        kernel_end=_page_up(kernel.end),
        setup_header=None,
        code32_start=min(seg.paddr for seg in kernel.segments),
        cmdline_limit=(LINUX_COMMAND_LINE_SIZE if kernel.is_linux else layout.CMDLINE_MAX) - 1,
        initrd_addr_max=DEFAULT_INITRD_ADDR_MAX,
    )


def _load_bzimage(memory, f, head: bytes, file_size: int, path: str) -> _Loaded:
    image = bzimage.parse_bzimage(head, file_size, path)
    load_addr = image.load_address(layout.KERNEL_LOAD_ADDR)
    _check_fits(memory, path, load_addr, image.memory_size(), "kernel")
    elf.read_exact(f, image.payload_offset, memory.view(load_addr, image.payload_size), path)
    return _Loaded(
        mode=ENTRY_LINUX64,
        entry=load_addr + bzimage.STARTUP_64_OFFSET,
        kernel_end=_page_up(load_addr + image.memory_size()),
        setup_header=image.setup_header,
        code32_start=load_addr,
        cmdline_limit=min(image.cmdline_size, layout.CMDLINE_MAX - 1),
        initrd_addr_max=image.initrd_addr_max,
    )


def probe_initrd(path: str) -> None:
    """UsageError, as _load_initrd would give, for an initrd another loader (QEMU's) is
    handed: one that cannot be opened or is empty."""
    with _open(path, "initrd") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise UsageError(f"initrd {path} is empty")


def probe_kernel(kernel_path: str) -> str:
    """"elf" or "bzimage" for a kernel file another loader will load (QEMU's, with
    --accel qemu); UsageError, as load_kernel would give, for anything else."""
    with _open(kernel_path, "kernel") as f:
        try:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(bzimage.HEADER_READ_SIZE)
            # The same header and segment checks load_kernel makes (a truncated or corrupt
            # kernel, an ELF for another machine), without loading anything.
            if head.startswith(elf.ELFMAG):
                kernel = elf.parse_elf(f, file_size, kernel_path)
                # QEMU enters an ELF kernel at its PVH entry when it has one.
                if kernel.pvh_entry is not None and not kernel.holds(kernel.pvh_entry):
                    raise UsageError(f"{kernel_path}: PVH entry {kernel.pvh_entry:#x} is "
                                     "not in any loadable segment")
                return "elf"
            if bzimage.is_bzimage(head):
                bzimage.parse_bzimage(head, file_size, kernel_path)
                return "bzimage"
        except OSError as e:
            raise UsageError(f"cannot read kernel {kernel_path}: {e.strerror or e}") from None
    raise UsageError(f"{kernel_path} is not a bzImage or x86-64 ELF kernel")


def load_kernel(
    memory,
    kernel_path: str,
    cmdline: str,
    initrd_path: str | None = None,
    rsdp_addr: int = layout.ACPI_ADDR,
    prefer_pvh: bool = True,
) -> BootPlan:
    """Load `kernel_path` into `memory` and return how to enter it.

    bzImage: the protected-mode kernel goes at KERNEL_LOAD_ADDR (relocatable) or
    code32_start, entered in 64-bit mode at +0x200 ("linux64"). ELF: PT_LOAD segments
    at p_paddr; a Linux vmlinux with a XEN_ELFNOTE_PHYS32_ENTRY note is entered through
    PVH when `prefer_pvh`, otherwise at its ELF entry in 64-bit mode ("linux64", or
    "elf64" for a freestanding program). boot_params, the PVH start info and the e820
    map are written in every mode.
    """
    with _open(kernel_path, "kernel") as f:
        try:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(bzimage.HEADER_READ_SIZE)
            if head.startswith(elf.ELFMAG):
                loaded = _load_elf(memory, f, file_size, kernel_path, prefer_pvh)
            elif bzimage.is_bzimage(head):
                loaded = _load_bzimage(memory, f, head, file_size, kernel_path)
            else:
                raise UsageError(f"{kernel_path} is not a bzImage or x86-64 ELF kernel")
        except OSError as e:
            raise UsageError(f"cannot read kernel {kernel_path}: {e.strerror or e}") from None
        except GuestMemoryError as e:
            raise UsageError(f"{kernel_path} does not fit in guest RAM: {e}") from None
    mode, entry, kernel_end = loaded.mode, loaded.entry, loaded.kernel_end

    cmdline_bytes = encode_cmdline(cmdline, loaded.cmdline_limit)
    memory.write(layout.CMDLINE_ADDR, cmdline_bytes)

    initrd = None
    if initrd_path is not None:
        try:
            initrd = _load_initrd(memory, initrd_path, kernel_end, loaded.initrd_addr_max)
        except OSError as e:
            raise UsageError(f"cannot read initrd {initrd_path}: {e.strerror or e}") from None

    rsdp_addr = rsdp_addr or 0  # None or 0: no RSDP, the kernel scans the legacy areas
    e820 = build_e820(memory)
    memory.write(
        layout.ZERO_PAGE_ADDR,
        bootparams.build_boot_params(
            setup_header=loaded.setup_header,
            cmdline_addr=layout.CMDLINE_ADDR,
            cmdline_size=loaded.cmdline_limit,
            e820=e820,
            initrd=initrd,
            rsdp_addr=rsdp_addr,
            code32_start=loaded.code32_start,
        ),
    )
    pvh.write_start_info(
        memory, cmdline_addr=layout.CMDLINE_ADDR, rsdp_addr=rsdp_addr, e820=e820, initrd=initrd
    )
    # Guest memory is complete after loading; the entry Sregs are then a pure function.
    sregs_update = functools.partial(entry_sregs, mode, write_boot_tables(memory, mode))
    return BootPlan(
        entry_mode=mode,
        entry=entry,
        regs=entry_regs(mode, entry),
        sregs_update=sregs_update,
        cmdline=cmdline,
        e820=e820,
        kernel_end=kernel_end,
        initrd=initrd,
    )
