import subprocess
import sys

from voidbox.host import kvm_info


def test_doctor_reports_the_kvm_flavour_and_what_follows():
    result = subprocess.run([sys.executable, "-m", "voidbox", "doctor"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    info = kvm_info()
    kvm_line = next(line for line in out.splitlines() if line.startswith("kvm:"))
    if not info.present:
        assert "missing" in kvm_line
    elif info.software_only:
        assert "software-only (kvm_pvm" in kvm_line
        assert "early boot only" in out
    else:
        assert "hardware-assisted" in kvm_line
    for topic in ("tap:", "qemu:", "guest:"):
        assert any(line.startswith(topic) for line in out.splitlines()), out
