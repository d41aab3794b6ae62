"""`voidbox doctor` and kvm_info against the kernel's own description of KVM (tests/kvm_facts.py)."""

import os
import subprocess
import sys

from tests.kvm_facts import KVM_DEVICE, kvm_api_version, kvm_modules
from voidbox.host import kvm_info


def test_doctor_reports_the_kvm_flavour_and_what_follows():
    result = subprocess.run([sys.executable, "-m", "voidbox", "doctor"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    kvm_line = next(line for line in lines if line.startswith("kvm:"))
    api = kvm_api_version()
    modules = kvm_modules()
    if not os.path.exists(KVM_DEVICE):
        assert "missing" in kvm_line
    elif api is None:
        assert "present but unusable" in kvm_line
    elif "kvm_pvm" in modules:
        assert kvm_line.startswith(f"kvm:     software-only (kvm_pvm, API {api}):"), kvm_line
        assert "early boot only" in out
    else:
        [module] = modules & {"kvm_intel", "kvm_amd"}
        assert kvm_line == f"kvm:     hardware-assisted ({module}, API {api})"
    for topic in ("tap:", "qemu:", "guest:"):
        assert any(line.startswith(topic) for line in lines), out


def test_kvm_info_agrees_with_the_kernel():
    info = kvm_info()
    modules = kvm_modules()
    assert info.present == os.path.exists(KVM_DEVICE)
    assert info.usable == (kvm_api_version() is not None)
    assert info.software_only == ("kvm_pvm" in modules)
    if info.present:
        assert info.module == next((m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if m in modules),
                                   "kvm")
