"""The default guest's real kernel under voidbox's own KVM.

On software-only KVM (this kind of host) the kernel gets through its early boot only,
which is enough to prove the boot path: the banner, voidbox's command line, its e820 map
and its ACPI tables. The full boot to init runs on hardware KVM only.
"""

import signal
import subprocess
import sys
import threading

import pytest

from tests.default_guest import require_default_guest
from voidbox.errors import ExitStatus

BOOT_TIMEOUT = 60  # the `--timeout` the issue names: a bound, not a measurement


@pytest.fixture(scope="module")
def guest():
    return require_default_guest()


def voidbox_boot(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "voidbox", "boot", "--accel", "kvm", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )


class Reader:
    """Collects a process's output on a thread; waits for a line containing a needle."""

    def __init__(self, stream):
        self.lines = []
        self._cond = threading.Condition()
        self._done = False
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for raw in stream:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, needle, timeout):
        with self._cond:
            return self._cond.wait_for(lambda: self._done or any(needle in line for line in self.lines), timeout) and any(
                needle in line for line in self.lines
            )

    def text(self):
        with self._cond:
            return "\n".join(self.lines)


@pytest.mark.kvm
@pytest.mark.slow
def test_early_boot_shows_voidbox_cmdline_e820_and_acpi(guest):
    proc = voidbox_boot("--kernel", str(guest.vmlinux), "--append", "earlyprintk=serial",
                        "--cpus", "2", "--timeout", str(BOOT_TIMEOUT))
    out = Reader(proc.stdout)
    try:
        # The table list comes first; the MADT is parsed a few emulated seconds later, still
        # before any AML is interpreted.
        assert out.wait_for("ACPI: DSDT", BOOT_TIMEOUT + 10), out.text()
        assert out.wait_for("smpboot: Allowing", BOOT_TIMEOUT + 10), out.text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        status = proc.wait(30)
    text = out.text()
    stderr = proc.stderr.read().decode()
    assert "Linux version" in text
    command_line = next(line for line in text.splitlines() if "Command line:" in line)
    assert "earlyprintk=serial" in command_line and "console=ttyS0" in command_line
    # The e820 map voidbox built: low RAM up to the EBDA, reserved to 1 MiB, RAM above.
    assert "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable" in text
    assert "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved" in text
    assert "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable" in text
    for table in ("RSDP 0x00000000000E0000", "XSDT", "FACP", "APIC", "DSDT"):
        assert f"ACPI: {table}" in text, table
    assert "VOIDBX" in text
    # The MADT: one local APIC per vCPU, NMI on LINT1.
    assert "smpboot: Allowing 2 CPUs" in text
    assert "ACPI: LAPIC_NMI" in text and "lint[0x1]" in text
    assert "ACPI BIOS Error" not in text
    # Stopped by our SIGTERM (or by its timeout if the host is slower): one line, no trace.
    assert status in (ExitStatus.SIGTERM, ExitStatus.TIMEOUT), stderr
    assert "Traceback" not in stderr


@pytest.mark.hwkvm
@pytest.mark.slow
def test_default_guest_boots_to_init_and_powers_off(guest):
    proc = voidbox_boot("--kernel", str(guest.vmlinux), "--initrd", str(guest.initrd),
                        "--append", "voidbox.poweroff=1", "--timeout", "120", guest.rootfs.as_posix())
    stdout, stderr = proc.communicate(timeout=180)
    text = stdout.decode(errors="replace")
    assert "voidbox-guest: root is up" in text, text[-4000:]
    assert proc.returncode == ExitStatus.POWEROFF, stderr.decode()

