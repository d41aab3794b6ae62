"""QEMU as the frontend of both of voidbox's vhost-user backends, each its own process:
`voidbox blk serve` holds the default guest's root disk and `voidbox net serve` its card.
QEMU's own vhost-user-blk and vhost-user netdev drive them; the guest is Debian's kernel.

Faults: QEMU SIGKILLed in the middle of a bulk transfer. The server says so in one line,
frees what it held (its fd count and mappings go back to what they were before QEMU came)
and serves the next QEMU, which gets its DHCP lease. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.qemu.test_default_guest_qemu import (
    BOOT_TIMEOUT,
    PROMPT,
    guest,  # noqa: F401 (the fixture)
)
from voidbox.image import rootfs, scratch_copy
from voidbox.qemu import host_tsc_khz

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SERVE_WAIT = 30


class Server:
    """A `voidbox ... serve --vhost-user SOCK` process; its stderr kept in a file."""

    def __init__(self, tmp_path, name: str, *args: str):
        self.sock = tmp_path / f"{name}.sock"
        self.err_path = tmp_path / f"{name}.err"
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "voidbox", *args[:2], "--vhost-user",
                                      str(self.sock), *args[2:]], stdin=subprocess.DEVNULL,
                                     stdout=self._err, stderr=self._err)
        deadline = time.monotonic() + SERVE_WAIT
        while not self.sock.exists():
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, self.stderr()
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def mapped_memfds(self) -> int:
        with open(f"/proc/{self.proc.pid}/maps") as maps:
            return sum("memfd:" in line for line in maps)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            self._err.close()


def qemu_argv(guest, blk_sock, net_sock, append: str = "") -> list[str]:  # noqa: F811
    return [
        "qemu-system-x86_64", "-M", "microvm,acpi=on,memory-backend=mem", "-accel", "tcg",
        "-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-global", "virtio-mmio.force-legacy=false",
        "-kernel", str(guest.vmlinux), "-initrd", str(guest.initrd),
        "-append", f"console=ttyS0 reboot=k panic=-1 tsc_early_khz={host_tsc_khz()} {append}",
        "-chardev", f"socket,id=blk,path={blk_sock}",
        "-device", "vhost-user-blk,chardev=blk,num-queues=1",
        "-chardev", f"socket,id=net,path={net_sock}",
        "-netdev", "vhost-user,id=n0,chardev=net", "-device", "virtio-net-device,netdev=n0",
    ]


class Qemu:
    """QEMU with its serial console on a pipe."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.log = bytearray()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while chunk := self.proc.stdout.read1(4096):
            with self._cond:
                self.log += chunk
                self._cond.notify_all()

    def wait_for(self, needle: bytes, timeout: float = BOOT_TIMEOUT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: needle in self.log, timeout)

    def type(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def text(self) -> str:
        return self.log.decode(errors="replace")[-6000:]

    def close(self) -> int | None:
        try:
            return self.proc.wait(BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._reader.join(10)
            self.proc.stdin.close()
            self.proc.stdout.close()


def debugfs_cat(image, path: str) -> str:
    out = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                         text=True, timeout=60)
    return out.stdout


def test_qemu_boots_on_voidboxs_disk_and_card_each_in_its_own_process(guest, tmp_path):  # noqa: F811
    image = scratch_copy(guest.rootfs, tmp_path / "root.ext4")
    blk = Server(tmp_path, "blk", "blk", "serve", str(image))
    net = Server(tmp_path, "net", "net", "serve")
    qemu = Qemu(qemu_argv(guest, blk.sock, net.sock))
    try:
        assert qemu.wait_for(PROMPT), qemu.text() + blk.stderr() + net.stderr()
        qemu.type("echo written-through-vhost-user-blk > /root/proof && sync && poweroff -f")
        status = qemu.close()
    finally:
        if qemu.proc.poll() is None:
            qemu.proc.kill()
    why = qemu.text() + "\n--- blk ---\n" + blk.stderr() + "\n--- net ---\n" + net.stderr()
    assert "voidbox-guest: eth0 10.0.2.15/24" in qemu.text(), why
    assert status == 0, why
    assert blk.stop() == 0 and net.stop() == 0, why
    # The server synced and unlocked the image: the file is there for the next reader.
    assert debugfs_cat(image, "/root/proof") == "written-through-vhost-user-blk\n", why


def test_sigkill_of_qemu_mid_transfer_frees_everything_and_serves_the_next(guest, tmp_path):  # noqa: F811
    image = scratch_copy(guest.rootfs, tmp_path / "root.ext4")
    blk = Server(tmp_path, "blk", "blk", "serve", str(image))
    net = Server(tmp_path, "net", "net", "serve")
    idle = {"blk": blk.fds(), "net": net.fds()}
    sink = socket.create_server(("127.0.0.1", 0))
    received = []

    def drain():
        conn, _ = sink.accept()
        with conn:
            try:
                while chunk := conn.recv(1 << 20):
                    received.append(len(chunk))
            except ConnectionResetError:
                pass  # the guest went away: the NAT resets its flows

    threading.Thread(target=drain, daemon=True).start()
    qemu = Qemu(qemu_argv(guest, blk.sock, net.sock))
    try:
        assert qemu.wait_for(PROMPT), qemu.text() + net.stderr()
        qemu.type(f"dd if=/dev/zero bs=1M count=2000 | nc 10.0.2.2 {sink.getsockname()[1]}")
        deadline = time.monotonic() + 60
        while sum(received) < (8 << 20) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(received) >= 8 << 20, qemu.text() + net.stderr()
        qemu.proc.send_signal(signal.SIGKILL)
        qemu.close()
        # Each server notices, says so in one line, and lets go of the guest's memory.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
                blk.mapped_memfds() or net.mapped_memfds()
                or blk.fds() != idle["blk"] or net.fds() != idle["net"]):
            time.sleep(0.1)
        assert (blk.mapped_memfds(), net.mapped_memfds()) == (0, 0)
        assert (blk.fds(), net.fds()) == (idle["blk"], idle["net"]), (net.stderr(), blk.stderr())
        for server in (blk, net):
            lines = [line for line in server.stderr().splitlines() if "vhost-user" in line]
            assert len(lines) == 1 and ("disconnected" in lines[0] or "connection" in lines[0]), \
                server.stderr()
        # The next frontend is served: a new QEMU gets its lease and powers off cleanly.
        again = Qemu(qemu_argv(guest, blk.sock, net.sock, "voidbox.poweroff=1"))
        status = again.close()
        assert "voidbox-guest: eth0 10.0.2.15/24" in again.text(), again.text() + net.stderr()
        assert rootfs.MARKER_POWEROFF in again.text() and status == 0, again.text()
    finally:
        if qemu.proc.poll() is None:
            qemu.proc.kill()
        sink.close()
        blk.stop()
        net.stop()
