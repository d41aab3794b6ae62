"""A real Linux guest on voidbox's network: the default guest under QEMU TCG, its
virtio-net card served by `voidbox net serve --vhost-user` (voidbox's virtio-net core, its
rings over QEMU's shared memfd memory, and the user-mode NAT, in a process of their own).

Debian's virtio_net driver and the guest kernel's TCP stack run against voidbox here: the
guest gets its address by DHCP from the NAT, then fetches a file from an HTTP server on
the host's loopback through 10.0.2.2 and prints its SHA-256. Servers listen on 127.0.0.1
only. Every wait is bounded; a failure shows the serial log and the server's stderr.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.qemu.test_default_guest_qemu import (  # noqa: F401 (guest: the fixture)
    BOOT_TIMEOUT,
    guest,
    qemu_argv,
    run_at_the_prompt,
)
from voidbox.image import rootfs

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SERVE_WAIT = 30  # seconds for the server's socket to appear


@pytest.fixture
def vhost_net(tmp_path):
    """`voidbox net serve --vhost-user SOCKET` in its own process; yields the socket path."""
    sock = tmp_path / "net.sock"
    err = open(tmp_path / "serve.err", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "voidbox", "net", "serve",
                             "--vhost-user", str(sock), "--host-loopback"],
                            stdin=subprocess.DEVNULL,
                            stdout=err, stderr=err)
    deadline = time.monotonic() + SERVE_WAIT
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sock.exists(), (tmp_path / "serve.err").read_text()
    yield sock
    proc.terminate()
    assert proc.wait(10) == 0
    err.close()
    assert not sock.exists()  # the server removed its socket


def vhost_argv(image, sock, append: str) -> list[str]:
    # QEMU's memory must be a shared memfd the backend can map (SET_MEM_TABLE passes its
    # fd); its virtio-mmio is legacy unless told otherwise, and voidbox is VERSION_1 only.
    argv = qemu_argv(image.vmlinux, image.initrd, append, image.rootfs, False)
    at = argv.index("microvm,acpi=on")
    argv[at] = "microvm,acpi=on,memory-backend=mem"
    return argv + [
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-chardev", f"socket,id=vu,path={sock}",
        "-netdev", "vhost-user,id=n0,chardev=vu",
        "-device", "virtio-net-device,netdev=n0",
        "-global", "virtio-mmio.force-legacy=false",
    ]


@pytest.fixture
def http_blob(tmp_path):
    """A 1 MiB file served over HTTP on the host's 127.0.0.1; yields (port, sha256)."""
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(1 << 20)
    (www / "blob").write_bytes(blob)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hashlib.sha256(blob).hexdigest()
    server.shutdown()
    server.server_close()


def test_dhcp_lease_from_voidbox_over_vhost_user(guest, vhost_net, tmp_path):  # noqa: F811
    log = tmp_path / "serial.log"
    with open(log, "wb") as out:
        qemu = subprocess.Popen(vhost_argv(guest, vhost_net, "voidbox.poweroff=1"),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            status = qemu.wait(timeout=BOOT_TIMEOUT)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
    serial = log.read_text(errors="replace")
    why = serial[-6000:] + "\n--- server ---\n" + (tmp_path / "serve.err").read_text()
    assert "voidbox-guest: eth0 10.0.2.15/24" in serial, why
    assert rootfs.MARKER_POWEROFF in serial and status == 0, why


def test_guest_tcp_fetches_from_the_host_through_the_nat(guest, vhost_net, http_blob,  # noqa: F811
                                                         tmp_path):
    port, digest = http_blob
    command = (f"busybox wget -q -O - http://10.0.2.2:{port}/blob | busybox sha256sum; "
               "poweroff -f\n").encode()
    prompt, status, text = run_at_the_prompt(vhost_argv(guest, vhost_net, ""), command, tmp_path)
    why = text[-6000:] + "\n--- server ---\n" + (tmp_path / "serve.err").read_text()
    assert prompt, why
    assert f"{digest}  -" in text, why
    assert status == 0, why
