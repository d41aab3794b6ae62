"""Boot the default guest under QEMU TCG: the kernel, initramfs and root image work together.

QEMU's own virtio-blk-device (virtio-mmio, described in ACPI on microvm) backs the root disk,
so this checks voidbox's image build, not voidbox's devices. `voidbox.poweroff=1` makes the
guest power off once it reaches its target, so every boot ends by itself; a boot that does not
is killed after BOOT_TIMEOUT and the test fails with the serial log.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.default_guest import require_default_guest
from voidbox.host import qemu_binary
from voidbox.image import GuestImage, initramfs, rootfs
from voidbox.qemu import host_tsc_khz

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

BOOT_TIMEOUT = 120  # seconds; a TCG boot of the cloud kernel takes about 5
PROMPT = b"voidbox:~# "  # /etc/profile's PS1 for root in /root


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return require_default_guest(build=True)


def qemu_argv(kernel: Path, initrd: Path, append: str, disk: Path | None,
              net: bool) -> list[str]:
    argv = [
        qemu_binary() or "qemu-system-x86_64",
        "-M", "microvm,acpi=on", "-accel", "tcg", "-m", "512M",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"console=ttyS0 tsc_early_khz={host_tsc_khz()} {append}",
    ]
    if disk is not None:
        argv += [
            "-drive", f"id=d0,file={disk},format=raw,if=none,snapshot=on",
            "-device", "virtio-blk-device,drive=d0",
        ]
    if net:
        # QEMU's own user-mode network, restricted: the guest reaches nothing beyond QEMU's
        # built-in DHCP server.
        argv += ["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-device,netdev=n0"]
    return argv


def boot(tmp_path: Path, kernel: Path, initrd: Path, append: str,
         disk: Path | None = None, net: bool = False) -> tuple[int, str]:
    """Run QEMU until the guest powers off; returns (exit status, serial log).

    `tsc_early_khz=`: microvm's FADT is hardware-reduced, so once Linux reads ACPI it treats
    the PIT as absent. Its only chance to calibrate the TSC is a quick PIT measurement made
    earlier, which under TCG on a busy host (or after a PVH entry) fails; then no clock
    source ticks and the boot hangs at "tsc: Marking TSC unstable". Giving the frequency
    skips the measurement.
    """
    log_path = tmp_path / "serial.log"
    argv = qemu_argv(kernel, initrd, f"voidbox.poweroff=1 {append}", disk, net)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            status = qemu.wait(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()
            serial = log_path.read_text(errors="replace")
            pytest.fail(f"guest did not power off within {BOOT_TIMEOUT} s; serial log "
                        f"(kept at {log_path}):\n{serial[-6000:]}")
    serial = log_path.read_text(errors="replace")
    print(f"{kernel.name}: QEMU exited {status} after {time.monotonic() - started:.1f} s")
    return status, serial


def assert_in_order(serial: str, *markers: str) -> None:
    position = 0
    for marker in markers:
        found = serial.find(marker, position)
        assert found >= 0, f"missing {marker!r} (in order) in serial log:\n{serial[-6000:]}"
        position = found + len(marker)


@pytest.mark.parametrize("kernel", ["bzimage", "vmlinux"])
def test_boots_to_root_and_powers_off(guest, tmp_path, kernel):
    """Both kernels boot: the bzImage, and the extracted ELF (QEMU enters it through PVH)."""
    status, serial = boot(tmp_path, getattr(guest, kernel), guest.initrd, "", disk=guest.rootfs)
    assert_in_order(serial, f"Linux version {guest.kernel_version}",
                    initramfs.MARKER_MODULES_LOADED, initramfs.MARKER_SWITCHING_ROOT,
                    rootfs.MARKER_ROOT_UP, rootfs.MARKER_POWEROFF)
    assert "voidbox-init: cannot load" not in serial
    assert "not found" not in serial, serial[-6000:]  # every applet the scripts use exists
    assert status == 0, serial[-6000:]


def test_initramfs_shell_without_disk(guest, tmp_path):
    status, serial = boot(tmp_path, guest.bzimage, guest.initrd, "")
    assert_in_order(serial, initramfs.MARKER_MODULES_LOADED, initramfs.MARKER_NO_ROOT_SHELL,
                    initramfs.MARKER_POWEROFF)
    assert initramfs.MARKER_SWITCHING_ROOT not in serial
    assert status == 0, serial[-6000:]


def test_shell_knob_keeps_the_initramfs(guest, tmp_path):
    status, serial = boot(tmp_path, guest.bzimage, guest.initrd, "voidbox.shell=1",
                          disk=guest.rootfs)
    assert_in_order(serial, initramfs.MARKER_MODULES_LOADED, initramfs.MARKER_SHELL_REQUESTED,
                    initramfs.MARKER_POWEROFF)
    assert initramfs.MARKER_SWITCHING_ROOT not in serial
    assert status == 0, serial[-6000:]


def test_dhcp_configures_eth0(guest, tmp_path):
    """virtio_net binds through ACPI and /sbin/init's udhcpc hook applies the lease."""
    status, serial = boot(tmp_path, guest.vmlinux, guest.initrd, "", disk=guest.rootfs,
                          net=True)
    assert_in_order(serial, rootfs.MARKER_ROOT_UP, "voidbox-guest: eth0 10.0.2.15/24",
                    rootfs.MARKER_POWEROFF)
    assert status == 0, serial[-6000:]


def run_at_the_prompt(argv: list[str], command: bytes, tmp_path: Path) -> tuple[bool, int | None, str]:
    """Boot QEMU with argv, wait for the shell prompt on the serial console, type command
    (which should end with `poweroff -f`); -> (prompt seen, exit status, serial log)."""
    qemu = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    serial = bytearray()
    prompt_seen = threading.Event()

    def reader() -> None:
        while chunk := qemu.stdout.read1(4096):
            serial.extend(chunk)
            if PROMPT in serial:
                prompt_seen.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        if prompt_seen.wait(BOOT_TIMEOUT):
            qemu.stdin.write(command)
            qemu.stdin.flush()
        status = qemu.wait(timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        thread.join(timeout=10)
    log = serial.decode(errors="replace")
    (tmp_path / "serial.log").write_text(log)
    return prompt_seen.is_set(), status, log


def test_console_shell_runs_commands(guest, tmp_path):
    """Without voidbox.poweroff the guest gives a shell on the serial console."""
    argv = qemu_argv(guest.vmlinux, guest.initrd, "", guest.rootfs, False)
    # The sum is computed in the guest, so the echo of the typed line cannot match.
    prompt, status, log = run_at_the_prompt(argv, b"echo sum=$((40 + 2)); poweroff -f\n",
                                            tmp_path)
    assert prompt, f"no shell prompt:\n{log[-6000:]}"
    assert "sum=42" in log, log[-6000:]
    assert status == 0, log[-6000:]


def test_missing_root_device_falls_back_to_the_shell(guest, tmp_path):
    """A virtio disk exists but not the one asked for: /init waits for it, then gives up."""
    status, serial = boot(tmp_path, guest.bzimage, guest.initrd, "voidbox.root=/dev/vdb",
                          disk=guest.rootfs)
    assert_in_order(serial, initramfs.MARKER_MODULES_LOADED, "voidbox-init: /dev/vdb did not appear",
                    initramfs.MARKER_NO_ROOT_SHELL, initramfs.MARKER_POWEROFF)
    assert status == 0, serial[-6000:]
