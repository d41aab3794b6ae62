"""`--accel qemu`: QEMU runs the guest's CPUs, voidbox serves its devices.

On a host whose KVM cannot run an unmodified guest (software-only, nested, missing), QEMU
emulates the CPUs (TCG, or KVM where usable) on a `microvm` machine and owns nothing else
of the guest's: its RAM is a shared memfd, and the root disk and every network card are
voidbox's own device cores (the ones vm.py puts on virtio-mmio), served over vhost-user
from this process. The console and QMP are sockets too. All of them live in a private
runtime directory (mode 0700) that close() removes.

So the console, the serial log, `--timeout`, `--net`, `--pcap`, `--stats` and the exit
statuses are those of the KVM VMM. Stop reasons come from QMP's SHUTDOWN event: a guest
poweroff is 0, a reset 4 (QEMU runs with -no-reboot), a panic 5; QEMU exiting any other
way is an error whose one line quotes QEMU's last words on stderr.

Threads: the caller's (wait), the console relay, the QMP reader, the QEMU waiter, the
virtio-blk loop and the network loop (each an EventLoop, as in vm.py: the network never
waits on the disk). QEMU blocks on vhost-user replies while it sets devices up, so the
servers' loops run before QEMU starts.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .errors import VoidboxError
from .vm import StopReason, VmBase

CONNECT_TIMEOUT = 30.0  # seconds for QEMU to come up and connect its console and QMP
QUIT_GRACE = 5.0  # seconds QEMU gets to exit after SIGTERM before SIGKILL
DEFAULT_TSC_KHZ = 2_000_000
COMMAND_LINE_LIMIT = 2047  # boot protocol 2.06+ kernels; QEMU enforces the kernel's own
# QMP SHUTDOWN reasons (qapi/run-state.json) that are the guest's own doing.
_GUEST_REASONS = {
    "guest-shutdown": StopReason.POWEROFF,
    "guest-reset": StopReason.RESET,
    "guest-panic": StopReason.PANIC,
}


def host_tsc_khz() -> int:
    """The host's TSC rate in kHz: under TCG the guest's TSC runs at the host's rate.

    The guest needs it as `tsc_early_khz=`: microvm's ACPI FADT is hardware-reduced, so
    Linux treats the PIT as absent once it reads ACPI, and its early PIT calibration often
    fails under emulation; with no calibrated TSC no clock source ticks and the boot hangs.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return DEFAULT_TSC_KHZ


def qemu_argv(qemu: str, config, run_dir: Path, cmdline: str, use_kvm: bool) -> list[str]:
    """QEMU's command line: microvm, shared memfd RAM, console and QMP as client sockets
    to voidbox, and one vhost-user device per configured disk and card, in VmConfig.devices
    order (the disk first: the guest's vda)."""
    from .config import DiskSpec

    mem_mib = config.mem >> 20
    argv = [
        qemu, "-M", "microvm,acpi=on,memory-backend=mem",
        "-accel", "kvm" if use_kvm else "tcg",
        *(["-cpu", "host"] if use_kvm else []),
        "-smp", str(config.cpus), "-m", f"{mem_mib}M",
        "-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", f"socket,id=con,path={run_dir / 'console.sock'}",
        "-serial", "chardev:con",
        "-chardev", f"socket,id=qmp,path={run_dir / 'qmp.sock'}",
        "-mon", "chardev=qmp,mode=control",
        # voidbox's devices are virtio 1.x only; QEMU's virtio-mmio is legacy by default.
        "-global", "virtio-mmio.force-legacy=false",
        "-kernel", config.kernel, "-append", cmdline,
    ]
    if config.initrd is not None:
        argv += ["-initrd", config.initrd]
    nic = 0
    for slot, spec in enumerate(config.devices):
        # A vhost-user card's backend is the user's (--net vhost-user:SOCKET): QEMU connects
        # to it directly; every other device is ours, on a socket in the runtime directory.
        users = getattr(spec, "backend", None) == "vhost-user"
        sock = spec.tap if users else run_dir / f"dev{slot}.sock"
        # --net-reconnect: QEMU itself retries a user's backend that went away.
        again = ",reconnect=1" if users and config.net_reconnect else ""
        argv += ["-chardev", f"socket,id=dev{slot},path={sock}{again}"]
        if isinstance(spec, DiskSpec):
            argv += ["-device", f"vhost-user-blk,chardev=dev{slot},num-queues=1"]
        else:
            mac = ":".join(f"{b:02x}" for b in spec.mac)
            argv += ["-netdev", f"vhost-user,id=net{nic},chardev=dev{slot}",
                     "-device", f"virtio-net-device,netdev=net{nic},mac={mac}"]
            nic += 1
    return argv


def _set_parent_death_signal() -> None:
    """In QEMU's child before exec: die with voidbox, even if voidbox is SIGKILLed."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


SUN_PATH_MAX = 107  # unix(7): sun_path holds 108 bytes, the last one the NUL
LONGEST_SOCKET_NAME = len("/console.sock")  # of the sockets made in the runtime directory


def _own_private_dir(path: str) -> bool:
    """XDG_RUNTIME_DIR as the XDG Base Directory spec defines it: a directory this user
    owns that no one else may write. Anywhere others may rename entries (a world-writable
    directory without the sticky bit), one could swap our directory for theirs between
    our bind() and QEMU's connect(), and serve QEMU the guest's devices (and memory)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _make_run_dir() -> Path:
    """A private (0700) directory for QEMU's sockets: in $XDG_RUNTIME_DIR when it takes one
    whose socket paths fit sun_path, else in the temporary directory. The environment is
    the user's input: a bad XDG_RUNTIME_DIR falls back, it never ends in a traceback."""
    reason = "no usable directory"
    for base in (os.environ.get("XDG_RUNTIME_DIR") or None, None):
        if base is not None and not _own_private_dir(base):
            continue
        try:
            path = tempfile.mkdtemp(prefix="voidbox-", dir=base)  # mode 0700
        except OSError as error:
            reason = f"{error.filename}: {error.strerror}"
            continue
        if len(os.fsencode(path)) + LONGEST_SOCKET_NAME <= SUN_PATH_MAX:
            return Path(path)
        os.rmdir(path)
        reason = f"{path}: too long for a unix socket's path"
    raise VoidboxError(f"cannot make a runtime directory for QEMU's sockets ({reason})")


class _Console:
    """The guest's serial port as QEMU hands it over: a stream socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()

    def enqueue_input(self, data: bytes) -> None:
        with self._lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # QEMU is gone: the waiter reports why

    def flush(self) -> None:
        """Nothing is buffered here (the KVM UART holds a partial line)."""


class QemuVm(VmBase):
    """A VM whose CPUs QEMU runs and whose devices voidbox serves (see the module doc)."""

    def __init__(self, config, use_kvm: bool = False, qemu: str | None = None):
        super().__init__(config)
        self.use_kvm = use_kvm
        self.qemu = qemu or shutil.which("qemu-system-x86_64")
        if self.qemu is None:
            from .host import QEMU_PACKAGE

            raise VoidboxError(f"qemu-system-x86_64 is not installed: install the {QEMU_PACKAGE} package")
        self.run_dir: Path | None = None
        self.serial = None
        self.process: subprocess.Popen | None = None
        self.servers = []
        self.disk = None  # the VirtioBlk, if the VM has a disk
        self.net_thread = None
        self._disk_thread = None
        self._backends = []
        self._listeners: dict[str, socket.socket] = {}
        self._console_sock = None
        self._qmp_sock = None
        self._threads: list[threading.Thread] = []
        self._shutdown_reason: str | None = None  # QMP SHUTDOWN's reason
        self._stderr_path: Path | None = None
        self.first_run_at = None  # vm.Vm's start-up trace; QEMU's start is not traced

    # -- starting --------------------------------------------------------------------

    def start(self) -> None:
        if self._started_at is not None:
            raise VoidboxError("the VM was already started")
        self._started_at = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        from .boot.loader import encode_cmdline, probe_initrd, probe_kernel

        config = self.config
        probe_kernel(config.kernel)  # a bad kernel is a usage error, as with kvm
        if config.initrd is not None:
            probe_initrd(config.initrd)
        self.run_dir = _make_run_dir()
        for name in ("console", "qmp"):
            self._listeners[name] = self._listen(self.run_dir / f"{name}.sock")
        self._serve_devices()
        cmdline = config.command_line()
        if not self.use_kvm:
            cmdline += f" tsc_early_khz={host_tsc_khz()}"
        encode_cmdline(cmdline, COMMAND_LINE_LIMIT)  # NUL bytes, absurd lengths: exit 2
        for nic in self.nics:  # the cards' backend processes, started above, now serve
            if hasattr(nic, "wait_ready"):
                nic.wait_ready()
        argv = qemu_argv(self.qemu, config, self.run_dir, cmdline, self.use_kvm)
        self._stderr_path = self.run_dir / "qemu.err"
        with open(self._stderr_path, "wb") as err:
            # A session of its own: the terminal's Ctrl-C is voidbox's to relay or act on.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=err, start_new_session=True,
                                            preexec_fn=_set_parent_death_signal)
        console = self._accept("console")
        self._qmp_sock = self._accept("qmp")
        self._console_sock = console
        self.serial = _Console(console)
        self._qmp_handshake()
        for target, name in ((self._relay_console, "qemu-console"), (self._read_qmp, "qemu-qmp"),
                             (self._wait_qemu, "qemu-wait")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def _listen(self, path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))  # in the private 0700 runtime directory
        sock.listen(1)
        return sock

    def _serve_devices(self) -> None:
        """Each disk and card behind a vhost-user server in the runtime directory, their
        loops running before QEMU connects."""
        from .cards import open_disk, open_nic
        from .config import DiskSpec
        from .eventloop import LoopThread
        from .vhost_user.backend import VhostUserServer

        for slot, spec in enumerate(self.config.devices):
            path = self.run_dir / f"dev{slot}.sock"
            if isinstance(spec, DiskSpec):
                device, backend = open_disk(spec)
                self._backends.append(backend)
                self._disk_thread = LoopThread("virtio-blk")
                loop, on_disconnect = self._disk_thread.loop, None
                self.disk = device
            elif spec.backend == "vhost-user":
                continue  # QEMU connects to the user's backend itself
            elif self.config.net_isolation == "process":
                # The card's backend in a process of its own, listening where QEMU connects:
                # the data path is QEMU <-> that process, voidbox only watches it.
                from .vhost_user import child

                process = child.spawn(spec, self.config, listener=self._listen(path))
                self.nics.append(process)
                continue
            else:
                if self.net_thread is None:
                    self.net_thread = LoopThread("net")
                loop = self.net_thread.loop
                device = open_nic(spec, self.config, loop, loop.call_soon)
                self.nics.append(device)
                on_disconnect = device.backend.drop_flows if hasattr(device.backend, "drop_flows") else None
            server = VhostUserServer(device, str(path), loop, on_disconnect=on_disconnect)
            server.start()
            self.servers.append(server)
        for thread in (self._disk_thread, self.net_thread):
            if thread is not None:
                thread.start()

    def _accept(self, name: str) -> socket.socket:
        """QEMU's connection to one of our sockets; VoidboxError if QEMU fails first."""
        listener = self._listeners[name]
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            ready, _, _ = select.select([listener], [], [], 0.1)
            if ready:
                conn, _ = listener.accept()
                listener.close()
                del self._listeners[name]
                return conn
            if self.process.poll() is not None:
                raise VoidboxError(f"QEMU failed to start: {self._qemu_last_words()}")
            if time.monotonic() > deadline:
                raise VoidboxError(f"QEMU did not connect its {name} within {CONNECT_TIMEOUT:g} s")

    def _qmp_handshake(self) -> None:
        """Read QMP's greeting and enter command mode (events flow only after that)."""
        self._qmp_sock.settimeout(CONNECT_TIMEOUT)
        self._qmp_file = self._qmp_sock.makefile("rb")
        try:
            greeting = json.loads(self._qmp_file.readline() or b"{}")
            if "QMP" not in greeting:
                raise VoidboxError("QEMU's monitor did not greet as QMP")
            self._qmp_sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            while True:
                reply = json.loads(self._qmp_file.readline() or b'{"error": "closed"}')
                if "return" in reply:
                    break
                if "error" in reply:
                    raise VoidboxError(f"QMP refused qmp_capabilities: {reply['error']}")
        except (OSError, ValueError) as error:
            if self._qemu_exited(2.0):
                raise VoidboxError(f"QEMU failed to start: {self._qemu_last_words()}") from None
            raise VoidboxError(f"QEMU's monitor: {error}") from None
        self._qmp_sock.settimeout(None)

    # -- running ---------------------------------------------------------------------

    def _relay_console(self) -> None:
        while True:
            try:
                data = self._console_sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.serial_log.write(data)

    def _read_qmp(self) -> None:
        """Remember why QEMU is about to stop (the SHUTDOWN event's reason)."""
        for line in self._qmp_file:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "SHUTDOWN":
                self._shutdown_reason = str(message.get("data", {}).get("reason", ""))
            elif message.get("event") == "GUEST_PANICKED":
                self._shutdown_reason = "guest-panic"

    def _wait_qemu(self) -> None:
        status = self.process.wait()
        # QMP's last event is read before the reason is decided (its socket ends with QEMU).
        for thread in self._threads:
            if thread.name in ("qemu-qmp", "qemu-console"):
                thread.join(2)
        reason = _GUEST_REASONS.get(self._shutdown_reason or "")
        if reason is not None:
            self.stop(reason)
        else:
            self.stop(StopReason.ERROR, f"QEMU exited with status {status}: {self._qemu_last_words()}")

    def _qemu_exited(self, within: float) -> bool:
        try:
            self.process.wait(within)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _qemu_last_words(self) -> str:
        """QEMU's stderr summarised in one line (its last non-empty line)."""
        try:
            lines = [line.strip() for line in self._stderr_path.read_text(errors="replace").splitlines()]
        except (OSError, AttributeError):
            lines = []
        lines = [line for line in lines if line]
        return lines[-1] if lines else "no message on stderr"

    def _halt(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            try:
                process.terminate()  # QEMU exits cleanly on SIGTERM
            except OSError:
                pass

    def _join(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(QUIT_GRACE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for thread in self._threads:
            thread.join(5)

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop(StopReason.QUIT)
        self._join()
        for sock in (self._console_sock, self._qmp_sock, *self._listeners.values()):
            if sock is not None:
                sock.close()
        self._listeners = {}
        # The NAT's flows are closed on its thread, after it stops; the disk's request in
        # hand finishes before its image is synced and closed.
        for thread in (self.net_thread, self._disk_thread):
            if thread is not None:
                thread.stop()
        for server in self.servers:
            server.close()
        self.servers = []
        for nic in self.nics:
            nic.close()
        for thread in (self.net_thread, self._disk_thread):
            if thread is not None:
                thread.close()
        self.net_thread = self._disk_thread = None
        for backend in self._backends:
            backend.close()
        self._backends = []
        for handle in self._closables:
            handle.close()
        self._closables = []
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
