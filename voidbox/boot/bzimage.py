"""Parse a bzImage for the 64-bit boot protocol.

Documentation/arch/x86/boot.rst: the real-mode setup (setup_sects + 1 sectors, the
setup header at 0x1f1) is followed by the protected-mode kernel, which is loaded
high and entered in 64-bit mode at its load address + 0x200 (startup_64 of the
decompressor, "64-bit BOOT PROTOCOL"). The real-mode code itself is never run.
"""

from __future__ import annotations

import struct

from .._records import dataclass
from ..errors import UsageError
from . import bootparams as bp

SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # boot.rst: "If this field is 0, the real value is 4."
MIN_PROTOCOL = 0x0206  # cmdline_size appears in 2.06; older kernels cannot be 64-bit booted
STARTUP_64_OFFSET = 0x200  # 64-bit entry, relative to the protected-mode kernel's load address
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # boot.rst, for protocols before 2.03
DEFAULT_CMDLINE_SIZE = 255  # boot.rst, for protocols before 2.06
# Bytes at the file's start that hold the whole header whatever its declared length.
HEADER_READ_SIZE = bp.EDD_MBR_SIG_BUFFER
MAX_KERNEL_ALIGNMENT = 1 << 30


@dataclass
class BzImage:
    """A parsed bzImage: its setup header and protected-mode kernel."""

    path: str
    version: int
    setup_header: bytes  # file bytes [0x1f1, 0x202 + byte at 0x201): copied into boot_params
    payload_offset: int  # file offset of the protected-mode kernel
    payload_size: int
    loadflags: int
    xloadflags: int
    code32_start: int
    relocatable: bool
    kernel_alignment: int
    initrd_addr_max: int
    cmdline_size: int
    init_size: int  # bytes the kernel needs from its load address while decompressing

    def load_address(self, default: int) -> int:
        """Where to put the protected-mode kernel.

        A relocatable kernel goes at `default` (KERNEL_LOAD_ADDR) rounded up to its
        kernel_alignment; a non-relocatable one must go at code32_start, where it
        was linked to run.
        """
        if self.relocatable:
            return (default + self.kernel_alignment - 1) & -self.kernel_alignment
        return self.code32_start

    def memory_size(self) -> int:
        """Bytes reserved from the load address (boot.rst: init_size, 2.10+)."""
        return max(self.payload_size, self.init_size)


def is_bzimage(head: bytes) -> bool:
    return len(head) >= bp.HEADER + 4 and head[bp.HEADER : bp.HEADER + 4] == bp.HEADER_MAGIC


def parse_bzimage(head: bytes, file_size: int, path: str) -> BzImage:
    """Validate the setup header in `head` (the file's first bytes, at least HEADER_READ_SIZE
    when the file is that long) and describe the image."""
    if not is_bzimage(head) or len(head) < bp.SETUP_HEADER_END:
        raise UsageError(f"{path} is not a bzImage or x86-64 ELF kernel (setup header truncated)")

    def get(fmt: str, offset: int) -> int:
        return bp.get(head, fmt, offset)

    version = get("<H", bp.VERSION)
    if version < MIN_PROTOCOL:
        raise UsageError(
            f"{path} uses boot protocol {version >> 8}.{version & 0xFF:02d}; voidbox needs 2.06 or later"
        )
    header_end = bp.JUMP + 2 + head[bp.JUMP + 1]
    if header_end < bp.CMDLINE_SIZE + 4 or header_end > bp.EDD_MBR_SIG_BUFFER:
        raise UsageError(f"{path} is corrupt: setup header length {header_end - bp.SETUP_HEADER:#x}")

    def field(fmt: str, offset: int, default: int = 0) -> int:
        # Fields past the declared header end are absent, not whatever bytes follow.
        return get(fmt, offset) if offset + struct.calcsize(fmt) <= header_end else default

    setup_sects = head[bp.SETUP_SECTS] or DEFAULT_SETUP_SECTS
    payload_offset = (setup_sects + 1) * SECTOR_SIZE
    if payload_offset >= file_size:
        raise UsageError(f"{path} is truncated: no protected-mode kernel after {setup_sects} setup sectors")

    loadflags = get("<B", bp.LOADFLAGS)
    if not loadflags & bp.LOADED_HIGH:
        raise UsageError(f"{path} is a zImage (loaded low); voidbox needs a bzImage")
    xloadflags = field("<H", bp.XLOADFLAGS)
    if not xloadflags & bp.XLF_KERNEL_64:
        raise UsageError(f"{path} has no 64-bit entry point (XLF_KERNEL_64 is clear in xloadflags)")

    kernel_alignment = get("<I", bp.KERNEL_ALIGNMENT)
    relocatable = bool(get("<B", bp.RELOCATABLE_KERNEL))
    if relocatable and (
        kernel_alignment == 0
        or kernel_alignment & (kernel_alignment - 1)
        or kernel_alignment > MAX_KERNEL_ALIGNMENT
    ):
        raise UsageError(f"{path} is corrupt: kernel_alignment {kernel_alignment:#x}")
    return BzImage(
        path=path,
        version=version,
        setup_header=bytes(head[bp.SETUP_HEADER : header_end]),
        payload_offset=payload_offset,
        payload_size=file_size - payload_offset,
        loadflags=loadflags,
        xloadflags=xloadflags,
        code32_start=get("<I", bp.CODE32_START),
        relocatable=relocatable,
        kernel_alignment=kernel_alignment,
        initrd_addr_max=get("<I", bp.INITRD_ADDR_MAX) or DEFAULT_INITRD_ADDR_MAX,
        cmdline_size=get("<I", bp.CMDLINE_SIZE) or DEFAULT_CMDLINE_SIZE,
        init_size=field("<I", bp.INIT_SIZE),
    )
