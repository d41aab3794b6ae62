"""What the host can do: KVM flavour, QEMU, TAP permission. Used by `doctor`, `boot` and tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

KVM_DEVICE = "/dev/kvm"


@dataclass(frozen=True)
class KvmInfo:
    present: bool
    usable: bool
    software_only: bool  # kvm_pvm: every non-PVM guest instruction is emulated
    module: str
    reason: str


def kvm_info() -> KvmInfo:
    """Describe /dev/kvm without opening a VM."""
    if not os.path.exists(KVM_DEVICE):
        return KvmInfo(False, False, False, "", f"{KVM_DEVICE} does not exist")
    usable = os.access(KVM_DEVICE, os.R_OK | os.W_OK)
    reason = "" if usable else f"{KVM_DEVICE} is not readable and writable by this user"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return KvmInfo(True, usable, True, "kvm_pvm", reason)
    for module in ("kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{module}"):
            return KvmInfo(True, usable, False, module, reason)
    return KvmInfo(True, usable, False, "kvm", reason)


SOFTWARE_KVM_NOTE = (
    "KVM here is software-only (kvm_pvm): an unmodified guest runs through KVM's "
    "instruction emulator and will not finish booting on this host"
)


def qemu_binary() -> str | None:
    import shutil  # not on the boot path: it pulls in the compression modules

    return shutil.which("qemu-system-x86_64")


def can_create_tap() -> bool:
    """True when this process has CAP_NET_ADMIN (needed to create a TAP device)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))  # CAP_NET_ADMIN
    except OSError:
        pass
    return False
