"""virtio-blk end to end under the real /dev/kvm: tests/guests/virtio_blk.c as the driver.

The guest finds the device at layout.VIRTIO_MMIO_BASE, negotiates, sets up queue 0 and
runs IN sector 0, OUT sector 1 and FLUSH, one kick each, waiting for each completion in
HLT. Kicks must reach the device through the KVM ioeventfd (never the trapped
QueueNotify register) and completions through the irqfd on GSI 5. The serial log is
attached to every failure.
"""

import signal
import subprocess
import sys

import pytest

from tests.guests.build import build_guest, disassemble
from voidbox import Vm, VmConfig
from voidbox.errors import ExitStatus
from voidbox.layout import MiB
from voidbox.virtio.blk import SECTOR_SIZE, VIRTIO_ID_BLOCK, BlockBackend
from voidbox.vm import StopReason

pytestmark = pytest.mark.kvm

GUEST_TIMEOUT = 60  # seconds; a bound for a hung guest, not a measurement
IMAGE_SIZE = 1 * MiB
WRITE_SECTOR = 1  # virtio_blk.c
REQUESTS = 3  # IN, OUT, FLUSH: one kick and one completion each
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
FNV_OFFSET_BASIS = 0x811C9DC5
FNV_PRIME = 0x01000193
SHOWN_BYTES = 16


def sector0_pattern():
    return bytes((i * 37 + 11) & 0xFF for i in range(SECTOR_SIZE))


def guest_write_pattern():
    """What virtio_blk.c writes to WRITE_SECTOR (pattern_byte)."""
    return bytes((i * 7 + 0x3C) & 0xFF for i in range(SECTOR_SIZE))


def fnv1a(data):
    value = FNV_OFFSET_BASIS
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & 0xFFFFFFFF
    return value


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return str(build_guest("virtio_blk", tmp_path_factory.mktemp("guests")))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(sector0_pattern() + bytes(IMAGE_SIZE - SECTOR_SIZE))
    return path


def run(kernel, image, readonly=False):
    vm = Vm(VmConfig(kernel=kernel, image=str(image), mem="64M", timeout=GUEST_TIMEOUT,
                     readonly=readonly))
    try:
        vm.start()
        reason = vm.wait()
    finally:
        vm.close()
    return vm, reason, vm.serial_log.getvalue().decode(errors="replace")


def sector(path, index):
    with open(path, "rb") as f:
        f.seek(index * SECTOR_SIZE)
        return f.read(SECTOR_SIZE)


def expected_lines(write_status):
    data = sector0_pattern()
    return [
        "virtio-blk magic=74726976 version=00000002 device=00000002",
        f"capacity={IMAGE_SIZE // SECTOR_SIZE:016x}",
        "queue max=0100 size=0008",
        f"read status={VIRTIO_BLK_S_OK:02x} first={data[:SHOWN_BYTES].hex()} "
        f"fnv={fnv1a(data):08x} used={SECTOR_SIZE + 1:08x}",
        f"write status={write_status:02x} used=00000001",
        f"flush status={VIRTIO_BLK_S_OK:02x} used=00000001",
        f"interrupts={REQUESTS:02x} vring={REQUESTS:02x}",
        "virtio-blk done",
    ]


def test_guest_driver_reads_writes_and_flushes_through_ioeventfd_and_irqfd(kernel, image):
    vm, reason, log = run(kernel, image)
    assert reason is StopReason.POWEROFF, vm.stop_message() + "\n" + log
    lines = log.splitlines()
    for line in expected_lines(VIRTIO_BLK_S_OK):
        assert line in lines, log
    assert "ro=0" in log and "FAIL" not in log, log
    assert sector(image, WRITE_SECTOR) == guest_write_pattern()
    assert sector(image, 0) == sector0_pattern()
    assert sector(image, WRITE_SECTOR + 1) == bytes(SECTOR_SIZE)

    (transport,) = [t for t in vm.virtio_transports if t.device.device_id == VIRTIO_ID_BLOCK]
    # Every kick came through the KVM ioeventfd, served on the block worker ...
    assert transport.notifies == REQUESTS, log
    assert transport.trapped_notifies == 0, log
    # ... and every completion left through the irqfd, one interrupt per request,
    # each of which the guest's handler saw.
    assert transport.interrupts_signalled == REQUESTS, log
    assert transport.queue_errors == 0
    counters = transport.device.counters
    assert counters["requests"] == REQUESTS and counters["flushes"] == 1
    assert counters["ioerr"] == counters["malformed"] == counters["unsupported"] == 0


def test_readonly_image_refuses_the_guest_write(kernel, image):
    before = image.read_bytes()
    vm, reason, log = run(kernel, image, readonly=True)
    assert reason is StopReason.POWEROFF, vm.stop_message() + "\n" + log
    lines = log.splitlines()
    for line in expected_lines(VIRTIO_BLK_S_IOERR):
        assert line in lines, log
    assert "ro=1" in log, log
    assert image.read_bytes() == before
    (transport,) = [t for t in vm.virtio_transports if t.device.device_id == VIRTIO_ID_BLOCK]
    assert transport.trapped_notifies == 0 and transport.interrupts_signalled == REQUESTS


def test_the_guest_uses_no_sse(kernel):
    text = disassemble(kernel)
    assert "<guest_main>" in text
    assert not [line for line in text.splitlines() if "%xmm" in line or "%ymm" in line]


def boot_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "voidbox", "boot", "--accel", "kvm", "--mem", "64M", "--timeout",
         str(GUEST_TIMEOUT), *args],
        capture_output=True, text=True, timeout=GUEST_TIMEOUT + 30, stdin=subprocess.DEVNULL,
    )


def test_cli_boots_the_guest_with_the_image(kernel, image):
    result = boot_cli("--kernel", kernel, str(image))
    assert result.returncode == ExitStatus.POWEROFF == 0, result.stderr + result.stdout
    assert "virtio-blk done" in result.stdout, result.stdout
    assert sector(image, WRITE_SECTOR) == guest_write_pattern()


def test_cli_refuses_an_image_another_writer_holds(kernel, image):
    holder = BlockBackend(str(image))
    try:
        result = boot_cli("--kernel", kernel, str(image))
    finally:
        holder.close()
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "in use" in last and "Traceback" not in result.stderr, result.stderr
    assert sector(image, WRITE_SECTOR) == bytes(SECTOR_SIZE)


def test_flushed_writes_survive_sigterm(tmp_path, image):
    spin = str(build_guest("virtio_blk_spin", tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "voidbox", "boot", "--accel", "kvm", "--kernel", spin, "--mem", "64M", "--timeout", "60",
         str(image)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    seen = b""
    for line in proc.stdout:
        seen += line
        if b"virtio-blk done" in line:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143, proc.stderr.read().decode()
    assert b"flush status=00" in seen, seen.decode(errors="replace")
    assert sector(image, 1) == guest_write_pattern()
