"""Test tiers as pytest markers; each skip says why, and none hides a failure."""

import os
import shutil

import pytest

from voidbox.host import kvm_info


def pytest_collection_modifyitems(config, items):
    kvm = kvm_info()
    skips = {
        "kvm": None if kvm.usable else f"needs /dev/kvm: {kvm.reason}",
        "hwkvm": (
            None
            if kvm.usable and not kvm.software_only
            else "needs hardware-assisted KVM: "
            + ("this host's KVM is software-only (kvm_pvm) and cannot run a stock kernel to init"
               if kvm.software_only else kvm.reason or "no KVM")
        ),
        "qemu": None if shutil.which("qemu-system-x86_64") else "needs qemu-system-x86_64",
        "netns": None if os.geteuid() == 0 else "needs root to create network namespaces",
    }
    for item in items:
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
