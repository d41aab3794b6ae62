"""Tiny freestanding C guests under the real /dev/kvm, through voidbox's ELF loader.

Each guest enters in 64-bit mode and runs a few thousand instructions: this host's KVM
emulates every one of them. The serial log is attached to any failure.
"""

import subprocess
import sys
import threading

import pytest

from tests.guests.build import build_guest
from voidbox import Vm, VmConfig
from voidbox.errors import ExitStatus, VoidboxError
from voidbox.vm import StopReason

pytestmark = pytest.mark.kvm

GUEST_TIMEOUT = 60  # seconds; a bound for a hung guest, not a measurement


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    out = tmp_path_factory.mktemp("guests")
    return lambda name: str(build_guest(name, out))


def run_guest(kernel, setup=None, timeout=GUEST_TIMEOUT):
    vm = Vm(VmConfig(kernel=kernel, mem="64M", timeout=timeout))
    if setup:
        setup(vm)
    try:
        vm.start()
        reason = vm.wait()
    finally:
        vm.close()
    return vm, reason


def serial(vm):
    return vm.serial_log.getvalue().decode(errors="replace")


def test_serial_output_reaches_the_host_and_poweroff_stops_the_vm(guests):
    vm, reason = run_guest(guests("hello"))
    assert "hello from guest" in serial(vm), serial(vm)
    assert reason is StopReason.POWEROFF, vm.stop_message()


class Recorder:
    def __init__(self, value):
        self.value = value
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.value & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_port_and_mmio_accesses_reach_handlers_with_their_widths(guests):
    ports, window = Recorder(0xCAFEBABE), Recorder(0x0123456789ABCDEF)

    def setup(vm):
        vm.pio_bus.register(0x510, 8, ports)
        vm.mmio_bus.register(0xD1000000, 0x1000, window)

    vm, reason = run_guest(guests("io"), setup)
    assert reason is StopReason.POWEROFF, vm.stop_message() + serial(vm)
    writes = [e for e in ports.log if e[0] == "w"]
    assert writes == [("w", 0, 1, 0x11), ("w", 0, 2, 0x2233), ("w", 0, 4, 0x44556677)]
    assert [e for e in ports.log if e[0] == "r"] == [("r", 1, 1), ("r", 1, 2), ("r", 1, 4)]
    mmio_writes = [e for e in window.log if e[0] == "w"]
    assert [(e[2]) for e in mmio_writes] == [1, 2, 4, 8]
    assert [e[2] for e in window.log if e[0] == "r"] == [1, 2, 4, 8]
    text = serial(vm).lower()
    # The guest echoes what it read: each width truncates the device's value.
    for value in ("be", "babe", "cafebabe", "ef", "cdef", "89abcdef", "123456789abcdef"):
        assert value in text, text


def test_injected_irq_reaches_the_guest_handler_while_halted(guests):
    vm = Vm(VmConfig(kernel=guests("irq"), mem="64M", timeout=GUEST_TIMEOUT))
    try:
        vm.start()
        assert vm.serial_log.wait_for(b"waiting", GUEST_TIMEOUT), serial(vm)
        # The guest now sits in HLT with interrupts enabled; a rising edge on GSI 10
        # must wake it and run its handler.
        vm.irq_line(10, 1)
        vm.irq_line(10, 0)
        reason = vm.wait()
    finally:
        vm.close()
    assert "irq!" in serial(vm), serial(vm)
    assert reason is StopReason.POWEROFF, vm.stop_message()


def boot_cli(kernel, *extra, timeout=GUEST_TIMEOUT + 30):
    return subprocess.run(
        [sys.executable, "-m", "voidbox", "boot", "--accel", "kvm", "--kernel", kernel, "--mem", "64M", *extra],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "guest,status,message",
    [
        ("hello", ExitStatus.POWEROFF, "powered off"),
        ("reset", ExitStatus.RESET, "reset"),
        ("triple", ExitStatus.GUEST_CRASH, "triple-fault"),
    ],
)
def test_cli_exit_statuses(guests, guest, status, message):
    result = boot_cli(guests(guest), "--timeout", str(GUEST_TIMEOUT))
    assert result.returncode == status, result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr


def test_cli_timeout_stops_a_spinning_guest_with_status_3(guests):
    result = boot_cli(guests("spin"), "--timeout", "3")
    assert "spinning" in result.stdout
    assert result.returncode == ExitStatus.TIMEOUT, result.stderr
    assert "timeout after 3 s" in result.stderr.strip().splitlines()[-1]


def test_sigterm_stops_the_vm_with_status_143(guests):
    proc = subprocess.Popen(
        [sys.executable, "-m", "voidbox", "boot", "--accel", "kvm", "--kernel", guests("spin"), "--mem", "64M",
         "--timeout", str(GUEST_TIMEOUT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    seen = threading.Event()

    def watch():
        for line in proc.stdout:
            if b"spinning" in line:
                seen.set()

    threading.Thread(target=watch, daemon=True).start()
    assert seen.wait(GUEST_TIMEOUT)
    proc.terminate()
    assert proc.wait(30) == ExitStatus.SIGTERM
    assert b"SIGTERM" in proc.stderr.read()


def test_two_vcpus_boot_the_same_guest(guests):
    vm = Vm(VmConfig(kernel=guests("hello"), mem="64M", cpus=2, timeout=GUEST_TIMEOUT))
    try:
        vm.start()
        reason = vm.wait()
    finally:
        vm.close()
    assert reason is StopReason.POWEROFF, vm.stop_message()


def test_uart_interrupts_drive_transmit_and_receive(guests):
    vm = Vm(VmConfig(kernel=guests("serial_irq"), mem="64M", timeout=GUEST_TIMEOUT))
    try:
        vm.start()
        assert vm.serial_log.wait_for(b"waiting for input", GUEST_TIMEOUT), serial(vm)
        vm.serial.enqueue_input(b"ping\n")
        reason = vm.wait()
    finally:
        vm.close()
    assert "tx: 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz!\n" in serial(vm)
    assert "got: ping" in serial(vm) and reason is StopReason.POWEROFF


def test_ram_above_the_mmio_gap(guests):
    """4 GiB of RAM: 3 GiB below the MMIO gap, the rest from 4 GiB up, both in KVM slots."""
    vm = Vm(VmConfig(kernel=guests("hello"), mem="4G", timeout=GUEST_TIMEOUT))
    try:
        vm.start()
        regions = vm.memory.regions
        plan = vm.boot_plan
        reason = vm.wait()
    finally:
        vm.close()
    assert reason is StopReason.POWEROFF, vm.stop_message()
    assert [(r.gpa, r.size) for r in regions] == [(0, 3 << 30), (4 << 30, 1 << 30)]
    assert any(e.addr == 4 << 30 and e.size == 1 << 30 for e in plan.e820)


def test_the_boot_path_imports_neither_numpy_nor_click(guests):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "voidbox", "boot", "--accel", "kvm", "--kernel", guests("hello"),
         "--mem", "64M"],
        capture_output=True, text=True, timeout=GUEST_TIMEOUT, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time" in line]
    assert "voidbox._kvm" in imported
    assert not [name for name in imported if name.split(".")[0] in ("numpy", "click")]


def test_a_boot_collects_again_once_the_vm_runs(guests):
    # launch.py stops the collector for the start-up; run_vm freezes what it made and
    # turns collection back on before the guest's run.
    code = ("import gc, sys\nimport voidbox.commands as c\nfrom voidbox.launch import main\n"
            "run = c.run_vm\n"
            "def spy(*a, **k):\n"
            "    status = run(*a, **k)\n"
            "    print(gc.isenabled(), gc.get_freeze_count() > 0, file=sys.stderr)\n"
            "    return status\n"
            "c.run_vm = spy\n"
            f"main(['boot', '--accel', 'kvm', '--kernel', {guests('hello')!r}, '--mem', '64M'])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=GUEST_TIMEOUT + 30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "True True" in result.stderr.splitlines(), result.stderr


def refusing(create_vm):
    """Vm._create_vm that makes everything, then fails."""
    def create(self):
        create_vm(self)
        raise VoidboxError("no PIT today")

    return create


def test_a_failure_while_the_kernel_part_is_made_is_the_start_s_error(guests, monkeypatch):
    # The kernel's part of the VM is made on a thread beside the rest of the start-up: its
    # error reaches start()'s caller, and what it had made is closed.
    monkeypatch.setattr(Vm, "_create_vm", refusing(Vm._create_vm))
    vm = Vm(VmConfig(kernel=guests("hello"), mem="64M", net=[], timeout=GUEST_TIMEOUT))
    with pytest.raises(VoidboxError, match="no PIT today"):
        vm.start()
    assert vm.memory is None and vm._vmfd is None and vm._kvm is None


def test_the_start_s_own_failure_comes_first(guests, monkeypatch):
    # Both halves fail: the caller hears the start-up's own error (as before the kernel's
    # part had a thread), and the kernel part's objects are closed all the same.
    def no_backends(self):
        raise VoidboxError("no backend either")

    monkeypatch.setattr(Vm, "_create_vm", refusing(Vm._create_vm))
    monkeypatch.setattr(Vm, "_spawn_backends", no_backends)
    vm = Vm(VmConfig(kernel=guests("hello"), mem="64M", net=[], timeout=GUEST_TIMEOUT))
    with pytest.raises(VoidboxError, match="no backend either"):
        vm.start()
    assert vm.memory is None and vm._vmfd is None
