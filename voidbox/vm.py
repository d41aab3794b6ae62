"""The VM: the one module that wires memory, KVM, boot and devices together.

Threads: one per vCPU (blocked in KVM_RUN, serving its own exits), and the caller's
thread, which waits in `wait()` for a stop request (guest poweroff/reset, a fatal
exit, timeout, signal or console quit). Stopping kicks every vCPU out of KVM_RUN.
"""

from __future__ import annotations

import enum
import os
import sys
import threading
import time

from . import layout
from .config import VmConfig
from .devices.bus import Bus
from .errors import ExitStatus, VoidboxError
from .exits import IoExit
from .vcpu import Action, handle_exit


class StopReason(enum.Enum):
    POWEROFF = ("guest powered off", ExitStatus.POWEROFF)
    QUIT = ("stopped from the console (Ctrl-A x)", ExitStatus.POWEROFF)
    RESET = ("guest reset", ExitStatus.RESET)
    TRIPLE_FAULT = ("guest triple-faulted", ExitStatus.GUEST_CRASH)
    INTERNAL_ERROR = ("KVM internal error", ExitStatus.GUEST_CRASH)
    PANIC = ("guest kernel panicked", ExitStatus.GUEST_CRASH)
    TIMEOUT = ("timeout", ExitStatus.TIMEOUT)
    SIGINT = ("interrupted (SIGINT)", ExitStatus.SIGINT)
    SIGTERM = ("terminated (SIGTERM)", ExitStatus.SIGTERM)
    ERROR = ("voidbox error", ExitStatus.ERROR)

    @property
    def text(self) -> str:
        return self.value[0]

    @property
    def exit_status(self) -> ExitStatus:
        return self.value[1]


class SerialLog:
    """Everything the guest wrote to its console: kept (bounded) and forwarded.

    `dropped` counts the oldest bytes discarded to stay within the limit.
    """

    def __init__(self, sink, limit: int):
        self._sink = sink
        self._limit = limit
        self._data = bytearray()
        self.dropped = 0
        self._cond = threading.Condition()

    def write(self, data: bytes) -> None:
        with self._cond:
            self._data += data
            excess = len(self._data) - self._limit
            if excess > 0:
                del self._data[:excess]
                self.dropped += excess
            self._cond.notify_all()
        if self._sink is not None:
            self._sink(data)  # ConsoleOutput: a reader that went away costs nothing

    def getvalue(self) -> bytes:
        with self._cond:
            return bytes(self._data)

    def wait_for(self, needle: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self._data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


class VmBase:
    """What every VMM voidbox runs has in common: the stop protocol, the serial log, the
    network cards' counters. `Vm` (KVM) and `voidbox.qemu.QemuVm` (QEMU runs the CPUs,
    voidbox the devices) fill in start(), close() and how a stop reaches the guest.
    """

    def __init__(self, config: VmConfig):
        self.config = config
        self.stop_reason: StopReason | None = None
        self.stop_detail = ""
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._started_at = None
        self._closables = []
        self.nics = []  # VirtioNet devices, in --net order
        sink = None
        if config.console_output is not None:
            from .console import ConsoleOutput

            sink = ConsoleOutput(config.console_output)
            self._closables.append(sink)
        self.serial_log = SerialLog(sink, config.serial_log_limit)

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _halt(self) -> None:
        """Make the guest stop running (after stop() recorded why); from any thread."""

    def _join(self) -> None:
        """Wait (bounded) for the threads that ran the guest to end."""

    def stop(self, reason: StopReason = StopReason.QUIT, detail: str = "") -> None:
        """Ask the VM to stop; the first reason given wins. Safe from any thread."""
        with self._stop_lock:
            if self.stop_reason is None:
                self.stop_reason = reason
                self.stop_detail = detail
        self._stopped.set()
        self._halt()

    def wait(self, timeout: float | None = None) -> StopReason | None:
        """Block until the VM stops (or `timeout` seconds pass: then None).

        The configured `--timeout` counts from start() and stops the VM with TIMEOUT.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        vm_deadline = None
        if self.config.timeout is not None and self._started_at is not None:
            vm_deadline = self._started_at + self.config.timeout
        while True:
            ends = [d for d in (deadline, vm_deadline) if d is not None]
            # Wake at least twice a second so signal handlers run promptly.
            wait_for = min([*(e - time.monotonic() for e in ends), 0.5])
            if self._stopped.wait(max(wait_for, 0)):
                break
            now = time.monotonic()
            if vm_deadline is not None and now >= vm_deadline:
                self.stop(StopReason.TIMEOUT, f"timeout after {self.config.timeout:g} s")
                break
            if deadline is not None and now >= deadline:
                return None
        self._join()
        return self.stop_reason

    def run(self) -> ExitStatus:
        self.start()
        try:
            self.wait()
        finally:
            self.close()
        return self.stop_reason.exit_status

    def network_counters(self) -> list[dict]:
        """Per network card, in --net order: its name, backend, and the device's counters
        (frames, bytes, drops by reason, offload use, RX starvation) with the backend's."""
        from .cards import card_counters

        return card_counters(self.nics)

    def stop_message(self) -> str:
        """One line saying why the VM stopped."""
        reason = self.stop_reason
        if reason is None:
            return "running"
        return self.stop_detail or reason.text

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Vm(VmBase):
    """A voidbox VM built from a `VmConfig`, on this host's KVM.

    `start()` builds and launches it, `wait()` blocks until it stops and returns the
    `StopReason`, `stop()` asks it to stop, `close()` releases everything. `run()` does all
    of it and returns the process exit status.
    """

    def __init__(self, config: VmConfig):
        super().__init__(config)
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.memory = None
        self.serial = None
        self.boot_plan = None
        self._vcpus = []
        self._threads = []
        self._kvm = None
        self._vmfd = None
        self._workers = []
        self._fds = []
        self._children = {}  # card index -> its backend's process (voidbox.vhost_user.child)
        self.virtio_transports = []
        self.net_thread = None
        self.first_run_at = None  # time.time() of the first KVM_RUN (start-up benchmark)

    # -- building ------------------------------------------------------------------

    def _build(self) -> None:
        from . import _kvm, memory  # noqa: F401  (here: imports on two threads would queue)

        config = self.config
        # The kernel's part of the VM is made on a thread of its own: the kernel sleeps in
        # it (a kthread for the PIT, an SRCU grace period per memory slot: ~7 ms, ~20 on a
        # busy host; _kvm releases the GIL there), while this thread starts each isolated
        # card's backend process and imports the rest of the start-up.
        kernel_part = _Worker(self._create_vm, "vm-setup")
        try:
            self._children = self._spawn_backends()
            from .boot.acpi import build_acpi_tables
            from .boot.loader import load_kernel
            from .devices.acpi_pm import AcpiPm
            from .devices.i8042 import I8042
            from .devices.serial import Serial8250
            from .host import kvm_info
            from .vcpu import configure_vcpu
        except BaseException:
            kernel_part.join()  # what it made is closed with the rest (close())
            raise
        kernel_part.result()
        kvm, vmfd = self._kvm, self._vmfd

        self.serial = Serial8250(
            irq=lambda level: vmfd.irq_line(layout.SERIAL_COM1_IRQ, level),
            output=self.serial_log.write,
        )
        self.pio_bus.register(layout.SERIAL_COM1_PORT, 8, self.serial)
        self.i8042 = I8042(on_reset=lambda: self.stop(StopReason.RESET))
        self.i8042.register(self.pio_bus)
        self.acpi_pm = AcpiPm(on_poweroff=lambda: self.stop(StopReason.POWEROFF))
        self.pio_bus.register(layout.ACPI_SLEEP_CONTROL_PORT, 2, self.acpi_pm)

        virtio_devices = self._add_virtio_devices()
        acpi = build_acpi_tables(config.cpus, virtio_devices)
        acpi.write(self.memory)
        # Always on the command line too: kernels built with VIRTIO_MMIO_CMDLINE_DEVICES and
        # small guests read it; a kernel that honours both finds the region claimed by
        # the ACPI device and skips the duplicate.
        cmdline = config.command_line(
            " ".join(f"virtio_mmio.device={d.size // 1024}K@{d.base:#x}:{d.irq}" for d in virtio_devices)
        )
        self.boot_plan = plan = load_kernel(
            self.memory, config.kernel, cmdline, config.initrd, rsdp_addr=acpi.rsdp_addr
        )

        supported = kvm.supported_cpuid()
        software_only = kvm_info().software_only
        for index in range(config.cpus):
            vcpu = vmfd.create_vcpu(index)
            self._vcpus.append(vcpu)
            configure_vcpu(vcpu, supported, index, config.cpus, software_only)
        # Only the boot vCPU gets an entry state; the others wait in the in-kernel LAPIC
        # for the guest's INIT/SIPI.
        boot = self._vcpus[0]
        boot.set_sregs(plan.sregs_update(boot.get_sregs()))
        boot.set_regs(plan.regs)

    def _create_vm(self) -> None:
        """Guest memory, KVM_CREATE_VM, the in-kernel irqchip and PIT, the memory slots.
        Each is kept on self as soon as it exists, for close()."""
        from ._kvm import Kvm
        from .memory import GuestMemory

        self.memory = memory = GuestMemory(self.config.mem)
        self._kvm = kvm = Kvm()
        self._vmfd = vmfd = kvm.create_vm()
        # The TSS and identity-map pages must sit in guest-physical space no RAM uses
        # (api.rst, KVM_SET_TSS_ADDR): the top of the MMIO gap, below the BIOS ROM.
        vmfd.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vmfd.set_tss_addr(TSS_ADDR)
        vmfd.create_irqchip()
        vmfd.create_pit2()
        for slot, region in enumerate(memory.regions):
            vmfd.set_user_memory_region(slot, region.gpa, region.size, memory.mmap, region.offset)

    def _add_virtio_devices(self):
        """Create the configured virtio devices (VmConfig.devices), each on its own MMIO
        window and IRQ; start() starts their I/O threads."""
        from .boot.acpi import VIRTIO_MMIO_IRQS, VirtioMmioDevice
        from .config import DiskSpec

        windows = []
        for slot, spec in enumerate(self.config.devices):
            add = self._add_disk if isinstance(spec, DiskSpec) else self._add_nic
            base, irq = add(spec, slot, VIRTIO_MMIO_IRQS)
            windows.append(VirtioMmioDevice(base, layout.VIRTIO_MMIO_SIZE, irq))
        return windows

    def _add_disk(self, spec, slot: int, irqs) -> tuple[int, int]:
        """virtio-blk on a thread of its own (the same epoll loop the network thread runs),
        so a slow fsync never stalls the network or a vCPU."""
        import select

        from .cards import open_disk
        from .eventloop import LoopThread

        device, backend = open_disk(spec)
        self._closables.append(backend)
        # The worker is stopped before the backend closes (fsync on close): see close().
        worker = LoopThread("virtio-blk")
        self._workers.append(worker)
        transport, base, irq = self._attach_virtio(device, slot, irqs)
        for index, kick in enumerate(self._kicks(transport, base)):
            worker.loop.watch(kick, select.EPOLLIN,
                              lambda _ev, k=kick, q=index, t=transport: _kicked(k, t, q))
        return base, irq

    def _add_nic(self, spec, slot: int, irqs) -> tuple[int, int]:
        """A virtio-net card. Every card is served by one network I/O thread (an epoll loop
        over their kicks, the backends' sockets and timers), so a vCPU never waits on the
        network and the network never waits on the disk."""
        import select

        from .eventloop import LoopThread

        if self.net_thread is None:
            self.net_thread = LoopThread("net")
        loop = self.net_thread.loop
        if spec.backend == "vhost-user" or spec.index in self._children:
            return self._add_vhost_user_nic(spec, slot, irqs, loop)
        from .cards import open_nic

        # A TAP that cannot be opened: the NAT serves the card, or VoidboxError (fail).
        device = open_nic(spec, self.config, loop, loop.call_soon_threadsafe)
        self.nics.append(device)
        # A QueueNotify that did not go through an ioeventfd (trapped on a vCPU) is served
        # on the network thread too: the backend is never entered from two threads.
        cell = []
        transport, base, irq = self._attach_virtio(
            device, slot, irqs,
            lambda index, cell=cell: loop.call_soon_threadsafe(
                lambda: cell[0].handle_notify(index)))
        cell.append(transport)
        for index, kick in enumerate(self._kicks(transport, base)):
            loop.watch(kick, select.EPOLLIN,
                       lambda _ev, k=kick, q=index, t=transport: _kicked(k, t, q))
        return base, irq

    def _add_vhost_user_nic(self, spec, slot: int, irqs, loop) -> tuple[int, int]:
        """A card whose data path a vhost-user backend in another process serves: it gets
        the guest's memory and the queues' ioeventfds as its kicks (voidbox.vhost_user.frontend)."""
        from .vhost_user.frontend import VhostUserNic
        from .virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY

        base = layout.VIRTIO_MMIO_BASE + slot * layout.VIRTIO_MMIO_SIZE
        kicks = []
        for index in range(2):
            kick = self._eventfd()
            self._vmfd.register_ioeventfd(kick, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, datamatch=index)
            kicks.append(kick)
        mtu = self.config.nat.mtu if self.config.nat is not None else 1500
        child = self._children.get(spec.index)
        device = VhostUserNic(spec.tap, spec.mac, kicks, loop, name=f"net{spec.index}", mtu=mtu,
                              reconnect=self.config.net_reconnect, process=child,
                              on_error=lambda error: self.stop(StopReason.ERROR, f"error: {error}"))
        self.nics.append(device)  # closed with the other cards, after the network loop
        self._attach_virtio(device, slot, irqs)
        return base, irqs[slot]

    def _spawn_backends(self) -> dict:
        """{card index: BackendProcess} for the slirp and tap cards whose backend runs in
        a process of its own (--net-isolation process, the default)."""
        if self.config.net_isolation != "process":
            return {}
        from .config import NicSpec
        from .vhost_user import child

        children = {}
        try:
            for spec in self.config.devices:
                if isinstance(spec, NicSpec) and spec.backend in ("slirp", "tap"):
                    children[spec.index] = child.spawn(spec, self.config)
        except BaseException:
            for process in children.values():
                process.kill()
            raise
        return children

    def _attach_virtio(self, device, slot: int, irqs, notify=None):
        """Put `device` on a virtio-mmio window, interrupts through an irqfd on the line the
        DSDT advertises; -> (transport, base, irq)."""
        from .virtio.mmio import VirtioMmioTransport

        base = layout.VIRTIO_MMIO_BASE + slot * layout.VIRTIO_MMIO_SIZE
        irq = irqs[slot]  # IRQ 9 is the SCI; acpi.VIRTIO_MMIO_IRQS skips it
        irqfd = self._eventfd()
        self._vmfd.register_irqfd(irqfd, irq)
        transport = VirtioMmioTransport(device, self.memory, lambda: os.eventfd_write(irqfd, 1),
                                        notify)
        if hasattr(device, "use_irqfd"):  # a vhost-user card: its backend interrupts the guest
            device.use_irqfd(irqfd)
            transport.direct_vring_interrupts = True
        self.mmio_bus.register(base, layout.VIRTIO_MMIO_SIZE, transport)
        self.virtio_transports.append(transport)
        return transport, base, irq

    def _kicks(self, transport, base: int) -> list[int]:
        """One ioeventfd per queue on QueueNotify (datamatch: the queue index): a guest's
        kick signals it without a vCPU exit."""
        from .virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY

        kicks = []
        for index in range(len(transport.device.queue_max_sizes)):
            kick = self._eventfd()
            self._vmfd.register_ioeventfd(kick, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, datamatch=index)
            kicks.append(kick)
        return kicks

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    # -- running -------------------------------------------------------------------

    def start(self) -> None:
        if self._started_at is not None:
            raise VoidboxError("the VM was already started")
        self._started_at = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        for vcpu in self._vcpus:
            thread = threading.Thread(
                target=self._vcpu_loop, args=(vcpu,), name=f"vcpu{vcpu.index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        # The devices' I/O threads start once the guest runs: starting a thread waits until
        # the scheduler runs it (milliseconds on a busy host), and nothing is lost before
        # they do (a kick waits in its ioeventfd, a trapped one in the loop's queue).
        try:
            for worker in self._workers:
                worker.start()
            if self.net_thread is not None:
                self.net_thread.start()
        except BaseException:
            self.close()
            raise

    def _vcpu_loop(self, vcpu) -> None:
        pio, mmio, stopped = self.pio_bus, self.mmio_bus, self._stopped
        if self.first_run_at is None:
            self.first_run_at = time.time()  # wall clock: compared with the process start
        try:
            while not stopped.is_set():
                exit = vcpu.run()
                outcome = handle_exit(exit, pio, mmio)
                if outcome.reply is not None:
                    if type(exit) is IoExit:
                        vcpu.complete_io_in(outcome.reply)
                    else:
                        vcpu.complete_mmio_read(outcome.reply)
                if outcome.action is not Action.CONTINUE:
                    self.stop(_ACTION_REASONS[outcome.action], outcome.detail)
        except Exception as error:  # noqa: BLE001 - any failure stops the VM with a message
            self.stop(StopReason.ERROR, f"vCPU {vcpu.index}: {error}")

    def irq_line(self, irq: int, level: int) -> None:
        """Drive an in-kernel irqchip input line (IOAPIC pin / PIC IRQ) to `level`."""
        self._vmfd.irq_line(irq, level)

    def _halt(self) -> None:
        for vcpu in self._vcpus:
            vcpu.kick()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(5)

    def close(self) -> None:
        if not self._stopped.is_set() and self._vcpus:
            self.stop(StopReason.QUIT)
        for thread in self._threads:
            thread.join(5)
        if self.serial is not None:
            self.serial.flush()  # the guest's last partial line
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus = []
        # Devices finish the request in hand before their backends sync and close.
        for worker in self._workers:
            worker.close()
        self._workers = []
        if self.net_thread is not None:
            self.net_thread.stop()  # the NAT's flows are closed on this thread, after it
            for nic in self.nics:
                nic.close()
            self.net_thread.close()
            self.net_thread = None
        for process in self._children.values():  # a card not built yet: nobody finished it
            if process.process.returncode is None and process.frontend_socket is not None:
                process.frontend_socket.close()
                process.finish()
        self._children = {}
        if self._vmfd is not None:
            self._vmfd.close()
            self._vmfd = None
        if self._kvm is not None:
            self._kvm.close()
            self._kvm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        for handle in self._closables:
            handle.close()
        self._closables = []
        for fd in self._fds:
            os.close(fd)
        self._fds = []

# Guest-physical pages KVM needs for real-mode emulation on Intel (KVM_SET_TSS_ADDR takes
# three pages): kept in the MMIO gap, clear of the IOAPIC and LAPIC.
IDENTITY_MAP_ADDR = 0xFFFB_C000
TSS_ADDR = 0xFFFB_D000


class _Worker(threading.Thread):
    """fn() on a thread of its own, started at once; result() waits for it and raises
    what it raised."""

    def __init__(self, fn, name: str):
        super().__init__(name=name, daemon=True)
        self._fn = fn
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as error:  # noqa: BLE001 - handed to result()'s caller
            self._error = error

    def result(self) -> None:
        self.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


_ACTION_REASONS = {
    Action.POWEROFF: StopReason.POWEROFF,
    Action.RESET: StopReason.RESET,
    Action.TRIPLE_FAULT: StopReason.TRIPLE_FAULT,
    Action.INTERNAL_ERROR: StopReason.INTERNAL_ERROR,
}


def _kicked(kick: int, transport, index: int) -> None:
    """A queue's ioeventfd fired on the network thread: consume it, run the device."""
    try:
        os.eventfd_read(kick)
    except BlockingIOError:
        return
    transport.handle_notify(index)


def stderr_line(text: str) -> None:
    sys.stderr.write(f"voidbox: {text}\n")
    sys.stderr.flush()
