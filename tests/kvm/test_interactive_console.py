"""`voidbox boot` on a terminal: keystrokes reach the guest, Ctrl-C included; Ctrl-A x quits."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tests.guests.build import build_guest
from voidbox.errors import ExitStatus

pytestmark = pytest.mark.kvm
TIMEOUT = 60


class Terminal:
    """voidbox boot with a pseudo-terminal as its stdin and stdout."""

    def __init__(self, kernel, args=None):
        """`voidbox boot` of a tiny guest under kvm, or with `args` instead of the default ones."""
        self.master, slave = pty.openpty()
        if args is None:
            args = ["--accel", "kvm", "--kernel", kernel, "--mem", "64M", "--timeout", str(TIMEOUT)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voidbox", "boot", *args],
            stdin=slave, stdout=slave, stderr=subprocess.PIPE, start_new_session=True,
        )
        os.close(slave)
        self.seen = b""

    def expect(self, needle: bytes, timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    return needle in self.seen
                if not chunk:
                    return needle in self.seen
                self.seen += chunk
        return True

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self):
        try:
            status = self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)
        return status, self.proc.stderr.read().decode()


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    out = tmp_path_factory.mktemp("console-guests")
    return lambda name: str(build_guest(name, out))


def test_keystrokes_reach_the_guest(guests):
    term = Terminal(guests("serial_irq"))
    assert term.expect(b"waiting for input"), term.seen
    term.type(b"ping\r")  # a terminal sends CR for Enter; raw mode passes it through
    term.type(b"\n")
    assert term.expect(b"got: ping"), term.seen
    status, stderr = term.finish()
    assert status == ExitStatus.POWEROFF, stderr


def test_ctrl_c_goes_to_the_guest_and_ctrl_a_x_quits(guests):
    term = Terminal(guests("spin"))
    assert term.expect(b"spinning"), term.seen
    term.type(b"\x03")  # Ctrl-C: raw mode, so no SIGINT for voidbox
    time.sleep(0.5)
    assert term.proc.poll() is None, "Ctrl-C stopped voidbox instead of reaching the guest"
    term.type(b"\x01x")
    status, stderr = term.finish()
    assert status == ExitStatus.POWEROFF, stderr
    assert "Ctrl-A x" in stderr.strip().splitlines()[-1]
