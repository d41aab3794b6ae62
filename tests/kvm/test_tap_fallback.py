"""`voidbox boot --net tap:NAME` as an unprivileged user whose TAP cannot be opened.

/dev/net/tun is 0600 root here, so uid nobody cannot open it: with --net-fallback slirp
(the default) one line on stderr says why and the NAT serves the card (the virtio_net
guest gets its DHCP OFFER through it), and with fail voidbox exits 1 with that line.

The boot runs in a forked child that drops to nobody in-process (the venv's python lives
under /root, which nobody cannot read). /dev/kvm is 0600 root too, so the child first
covers it, in a private mount namespace, with a 0666 node for the same device, as
distributions that let users run VMs ship it.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import sys
import tempfile

import pytest

from tests.guests.build import build_guest
from voidbox.net import netns

pytestmark = [pytest.mark.kvm, pytest.mark.netns]

NOBODY = 65534
PR_SET_DUMPABLE = 4  # linux/prctl.h
TAP = "vbnope0"
GUEST_TIMEOUT = "60"  # seconds; a bound for a hung guest, not a measurement
LINE = f"tap:{TAP} unusable (cannot open /dev/net/tun: Permission denied)"


@pytest.fixture(scope="module")
def workdir():
    """A scratch directory uid nobody can read, with the virtio_net guest in it."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="voidbox-tap-"))
    os.chmod(path, 0o755)
    kernel = build_guest("virtio_net", path)
    os.chmod(kernel, 0o644)
    yield path, str(kernel)
    shutil.rmtree(path)


def preload() -> None:
    """Import every voidbox module, and what they import lazily from the standard library,
    before a child drops to nobody and loses the interpreter's /root."""
    import hashlib  # noqa: F401 (config.default_mac)
    import importlib
    import pkgutil

    import voidbox

    for module in pkgutil.walk_packages(voidbox.__path__, "voidbox."):
        if module.name != "voidbox.__main__":
            importlib.import_module(module.name)


def boot_as_nobody(workdir, kernel: str, fallback: str) -> tuple[int, str, str]:
    """Run `voidbox boot --net tap:TAP --net-fallback fallback` as nobody in a forked
    child; return (exit status, stdout, stderr)."""
    preload()
    out, err = workdir / f"out-{fallback}", workdir / f"err-{fallback}"
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            netns.unshare(netns.CLONE_NEWNS)
            netns.mount(None, "/", None, netns.MS_REC | netns.MS_PRIVATE)
            node = workdir / f"kvm-{fallback}"
            os.mknod(node, 0o666 | stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)
            os.chmod(node, 0o666)
            netns.bind_file(str(node), "/dev/kvm")
            sys.stdout = open(out, "w")  # noqa: SIM115 (the child exits without closing)
            sys.stderr = open(err, "w")  # noqa: SIM115
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            netns._libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
            from voidbox.launch import main

            try:
                # In the VMM: nobody may not run this host's interpreter (under /root),
                # so a child backend could not start here.
                main(["boot", "--accel", "kvm", "--kernel", kernel, "--mem", "64M", "--net", f"tap:{TAP}",
                      "--net-fallback", fallback, "--net-isolation", "none",
                      "--timeout", GUEST_TIMEOUT])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 98
        except BaseException as e:  # the child must never return into pytest
            sys.__stderr__.write(f"unprivileged boot failed: {e!r}\n")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.read_text(), err.read_text()


def test_fallback_slirp_serves_the_card_with_the_nat_and_says_why(workdir):
    path, kernel = workdir
    status, out, err = boot_as_nobody(path, kernel, "slirp")
    why = f"status {status}\n--- stderr ---\n{err}--- console ---\n{out}"
    tap_lines = [line for line in err.splitlines() if "tap:" in line]
    assert tap_lines == [f"voidbox: {LINE}: the guest's card uses the user-mode NAT"], why
    assert status == 0, why  # the guest powered off after the NAT's replies
    assert "dhcp offer yiaddr=0a00020f" in out and "virtio-net done" in out, why
    assert "FAIL" not in out, why


def test_fallback_fail_exits_1_with_the_line(workdir):
    path, kernel = workdir
    status, out, err = boot_as_nobody(path, kernel, "fail")
    why = f"status {status}\n--- stderr ---\n{err}--- console ---\n{out}"
    assert status == 1, why
    tap_lines = [line for line in err.splitlines() if "tap:" in line]
    assert tap_lines == [f"voidbox: error: {LINE}: --net-fallback is fail"], why
    assert "virtio-net" not in out, why  # no VM ran
