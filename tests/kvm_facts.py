"""The host's KVM as the kernel itself describes it, read without voidbox.host.

Tests of what voidbox reports about KVM (`voidbox doctor`, kvm_info, the exit status of a
boot) compare against these facts, never against voidbox's own kvm_info().
"""

from __future__ import annotations

import fcntl
import os

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00) with KVMIO = 0xAE, <linux/kvm.h>
VENDOR_MODULES = ("kvm_pvm", "kvm_intel", "kvm_amd")


def kvm_api_version() -> int | None:
    """KVM_GET_API_VERSION on a fresh /dev/kvm fd; None when the device does not open."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION)
    finally:
        os.close(fd)


def kvm_opens() -> bool:
    return kvm_api_version() is not None


def kvm_modules() -> set[str]:
    """The KVM vendor modules loaded: /proc/modules where the kernel has it, else /sys/module
    (which also lists built-in modules)."""
    try:
        with open("/proc/modules") as modules:
            return {line.split()[0] for line in modules} & set(VENDOR_MODULES)
    except OSError:
        pass
    try:
        return set(os.listdir("/sys/module")) & set(VENDOR_MODULES)
    except OSError:
        return set()
