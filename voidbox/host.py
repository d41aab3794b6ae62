"""What the host can do: KVM flavour, QEMU, TAP permission. Used by `doctor`, `boot` and tests."""

from __future__ import annotations

import os

from ._records import dataclass, named_tuple

KVM_DEVICE = "/dev/kvm"


@dataclass(frozen=True)
class KvmInfo:
    """What /dev/kvm offers on this host."""

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


QEMU_PACKAGE = "qemu-system-x86"  # Debian and Ubuntu


@named_tuple
class Accel:
    """Who runs the guest's CPUs, and why that one."""

    name: str  # "kvm" or "qemu"
    reason: str
    qemu_kvm: bool = False  # QEMU may use KVM itself (hardware-assisted and usable)


def choose_accel(requested: str, info: KvmInfo | None = None) -> Accel:
    """Resolve --accel auto|kvm|qemu for this host.

    auto takes voidbox's own VMM when /dev/kvm runs an unmodified guest (hardware-assisted
    and usable), and QEMU otherwise. Raises VoidboxError when the choice cannot run: no
    usable KVM for kvm, no QEMU for qemu (naming the package to install).
    """
    from .errors import VoidboxError

    info = kvm_info() if info is None else info
    hardware = info.usable and not info.software_only
    if requested == "kvm":
        if not info.usable:
            raise VoidboxError(f"KVM is not available: {info.reason}")
        return Accel("kvm", "asked for with --accel kvm")
    if requested == "auto" and hardware:
        return Accel("kvm", f"/dev/kvm is hardware-assisted ({info.module})")
    if requested == "auto":
        why = ("KVM here is software-only (kvm_pvm) and cannot run an unmodified guest"
               if info.software_only else f"KVM is not available ({info.reason})")
        reason = f"{why}: QEMU runs the guest's CPUs, voidbox its devices"
    else:
        reason = "asked for with --accel qemu"
    if qemu_binary() is None:
        raise VoidboxError(f"{'--accel auto needs' if requested == 'auto' else '--accel qemu needs'} "
                           f"qemu-system-x86_64, which is not installed: install the "
                           f"{QEMU_PACKAGE} package (apt-get install {QEMU_PACKAGE})")
    return Accel("qemu", reason, qemu_kvm=hardware)
