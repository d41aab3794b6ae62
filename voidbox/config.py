"""VM configuration: what the user asked for, validated before anything is built.

Every check here turns bad input into a one-line `UsageError` (exit status 2).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from .errors import UsageError
from .layout import MIN_MEM, MiB

MAX_CPUS = 255  # one xAPIC ID per vCPU, and the IOAPIC takes the next one
MAX_MEM = 1 << 40

DEFAULT_CMDLINE = (
    "console=ttyS0 reboot=k panic=-1 pci=off nomodeset "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": MiB, "K": 1 << 10, "M": MiB, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a memory size: "512M", "2G", "1024K"; a bare number means MiB (as QEMU's -m)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"invalid size {text!r}: use a number with an optional K, M, G or T suffix")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def _existing_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    if not os.path.exists(path):
        raise UsageError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path!r} is not readable")
    return path


@dataclass
class VmConfig:
    """Everything needed to build a VM. `validate()` runs on construction."""

    kernel: str | None = None
    initrd: str | None = None
    image: str | None = None  # root disk (virtio-blk, once that device lands)
    cmdline: str | None = None  # replaces the default command line entirely
    append: str = ""  # added to the command line
    mem: int = 512 * MiB
    cpus: int = 1
    timeout: float | None = None
    readonly: bool = False
    # Console: serial output goes to `console_output` (a binary file object or a path);
    # None keeps it only in the VM's in-memory log. Input comes from `console_input`
    # (a file descriptor) when `interactive` is set.
    console_output: object = None
    interactive: bool = False
    serial_log_limit: int = 4 * MiB

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.mem = parse_size(self.mem)
        if self.mem < MIN_MEM:
            raise UsageError(f"--mem must be at least {MIN_MEM // MiB}M, got {self.mem // MiB}M")
        if self.mem > MAX_MEM:
            raise UsageError(f"--mem {self.mem >> 30}G is larger than voidbox supports (1T)")
        if self.mem % (2 * MiB):
            raise UsageError("--mem must be a multiple of 2M")
        if not isinstance(self.cpus, int) or not 1 <= self.cpus <= MAX_CPUS:
            raise UsageError(f"--cpus must be between 1 and {MAX_CPUS}, got {self.cpus}")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise UsageError(f"--timeout must be a positive, finite number of seconds, got {self.timeout}")
        if self.kernel is None:
            raise UsageError("no kernel: pass --kernel PATH or build the default guest")
        _existing_file(self.kernel, "kernel")
        _existing_file(self.initrd, "initrd")
        _existing_file(self.image, "disk image")

    def command_line(self, extra_devices: str = "") -> str:
        base = self.cmdline if self.cmdline is not None else DEFAULT_CMDLINE
        parts = [base.strip(), extra_devices.strip(), self.append.strip()]
        return " ".join(p for p in parts if p)
