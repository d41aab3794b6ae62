"""`--net-isolation process` (the default): a slirp or tap card's backend is a child
`voidbox net serve --vmm-fd N`, served to the VMM over vhost-user on a socketpair.

Checked from outside the VMM: the child exists while the VM runs, holds neither /dev/kvm
nor the VM's fds, and is gone once the VM is closed; killing it takes the guest's link
down with one line while the VM runs on; a backend that cannot start is the VMM's one-line
error; and the child dies with a SIGKILLed VMM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.guests.build import build_guest
from voidbox import Vm, VmConfig
from voidbox.vm import StopReason

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def spin(tmp_path_factory):
    """A guest that never stops on its own (and never touches its card)."""
    return str(build_guest("spin", tmp_path_factory.mktemp("guests")))


def fd_targets(pid: int) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            pass
    return out


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # dead, waiting for its parent to reap it
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_the_nat_runs_in_a_child_without_kvm(spin):
    vm = Vm(VmConfig(kernel=spin, mem="64M", net=["slirp"], timeout=30))
    try:
        vm.start()
        (card,) = vm.nics
        assert card.wait_backend(30)  # it starts beside the VM
        pid = card.process.pid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"net" in argv and b"serve" in argv and b"--vmm-fd" in argv, argv
        assert b"-S" in argv, argv  # no site: no .pth hook runs in it
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()  # our child
        targets = fd_targets(pid)
        # No /dev/kvm, no VM or vCPU fd: the code that parses the guest's frames cannot
        # drive the VM. (It maps guest RAM: the rings and buffers live there.)
        assert not [t for t in targets if "kvm" in t], targets
        ours = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")}
        assert "/dev/kvm" in ours  # the check above can see it when it is there
        vm.stop(StopReason.QUIT)
        vm.wait()
    finally:
        vm.close()
    assert gone(pid, 10), "the backend outlived its VM"
    assert card.process.process.returncode == 0  # it ended on its own, not killed


def link_went_down(vm, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while vm.nics[0].counters["link_down"] == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_killed_backend_takes_the_link_down_not_the_vm(spin, capfd):
    vm = Vm(VmConfig(kernel=spin, mem="64M", net=["slirp"], timeout=120))
    try:
        vm.start()
        assert vm.nics[0].wait_backend(30)
        pid = vm.nics[0].process.pid
        os.kill(pid, signal.SIGKILL)
        assert link_went_down(vm)
        assert vm.wait(1) is None  # the VM runs on
        vm.stop(StopReason.QUIT)
        vm.wait()
    finally:
        vm.close()
    (card,) = vm.network_counters()
    assert card["frontend_link_down"] == 1, card
    lines = [line for line in capfd.readouterr().err.splitlines() if "link is down" in line]
    assert lines == [f"voidbox: net0: the network backend (pid {pid}) was killed by SIGKILL; "
                     "the guest's link is down"], lines


def test_a_backend_killed_while_starting_stops_the_vm_with_one_line(spin):
    vm = Vm(VmConfig(kernel=spin, mem="64M", net=["slirp"], timeout=30))
    try:
        vm.start()
        pid = vm.nics[0].process.pid
        os.kill(pid, signal.SIGKILL)
        reason = vm.wait()
    finally:
        vm.close()
    assert reason is StopReason.ERROR
    assert vm.stop_message() == ("error: net0: the network backend did not start (was killed "
                                 "by SIGKILL)"), vm.stop_message()


def test_a_backend_that_cannot_start_is_the_vmms_one_line_error(spin):
    from voidbox.net.options import config_from_options

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        nat, policy = config_from_options(forwards=(f"tcp:{port}:80",))
        vm = Vm(VmConfig(kernel=spin, mem="64M", net=["slirp"], nat=nat, policy=policy,
                         timeout=30))
        try:
            started = time.monotonic()
            vm.start()  # the backend starts beside the VM: its failure stops the VM
            reason = vm.wait()
            took = time.monotonic() - started
        finally:
            vm.close()
    finally:
        taken.close()
    assert reason is StopReason.ERROR and took < 20, (reason, took)
    assert vm.stop_message() == (f"error: cannot forward tcp 127.0.0.1:{port}: "
                                 "Address already in use"), vm.stop_message()


def test_boot_with_a_busy_forward_port_exits_1_with_one_line(spin):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "voidbox", "boot", "--accel", "kvm", "--kernel", spin,
             "--mem", "64M", "--timeout", "30", "--forward", f"tcp:{port}:80"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        taken.close()
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"voidbox: error: cannot forward tcp 127.0.0.1:{port}: Address already in use"], \
        result.stderr
    assert "Traceback" not in result.stderr


def test_isolation_none_says_so(spin):
    result = subprocess.run(
        [sys.executable, "-m", "voidbox", "boot", "--accel", "kvm", "--kernel", spin,
         "--mem", "64M", "--timeout", "1", "--net-isolation", "none"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 3, result.stderr  # the timeout
    assert ("voidbox: --net-isolation none: the network backend runs inside the VMM, with "
            "its rights and memory") in result.stderr.splitlines(), result.stderr


def test_the_backend_dies_with_a_sigkilled_vmm(spin):
    vmm = subprocess.Popen(
        [sys.executable, "-m", "voidbox", "boot", "--accel", "kvm", "--kernel", spin,
         "--mem", "64M", "--timeout", "60"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        children = []
        while not children:  # the card's backend: the VMM's only child
            assert vmm.poll() is None and time.monotonic() < deadline
            with open(f"/proc/{vmm.pid}/task/{vmm.pid}/children") as f:
                children = [int(p) for p in f.read().split()]
            time.sleep(0.05)
        (child,) = children
        time.sleep(1)  # serving by now
        vmm.kill()
        vmm.wait()
        assert gone(child, 10), "the backend outlived a SIGKILLed VMM"
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait()


def status_fields(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_the_cards_backend_is_sandboxed_seen_from_outside(spin):
    """voidbox.sandbox, entered by the card's backend before it reads a frame: checked
    in /proc, not taken from its own report."""
    vm = Vm(VmConfig(kernel=spin, mem="64M", net=["slirp"], timeout=30))
    try:
        vm.start()
        (card,) = vm.nics
        assert card.wait_backend(30)
        pid = card.process.serving_pid
        assert pid != card.process.pid  # the sandboxed one is the waiter's child
        fields = status_fields(pid)
        assert fields["NoNewPrivs"].strip() == "1", fields
        assert fields["Seccomp"].strip() == "2", fields
        for cap in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
            assert int(fields[cap], 16) == 0, (cap, fields[cap])
        assert os.listdir(f"/proc/{pid}/root") == []  # an empty root
        for ns in ("mnt", "pid", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
        assert "seccomp kill" in card.process.sandbox, card.process.sandbox
        vm.stop(StopReason.QUIT)
        vm.wait()
    finally:
        vm.close()


def test_a_backend_killed_by_seccomp_takes_the_link_down_not_the_vm(spin, capfd, monkeypatch):
    """The test-only probe (VOIDBOX_SANDBOX_PROBE): SIGUSR2 makes the sandboxed backend
    open /etc/passwd and execve; seccomp kills it, and the VMM says so in one line."""
    monkeypatch.setenv("VOIDBOX_SANDBOX_PROBE", "1")
    vm = Vm(VmConfig(kernel=spin, mem="64M", net=["slirp"], timeout=120))
    try:
        vm.start()
        (card,) = vm.nics
        assert card.wait_backend(30)
        os.kill(card.process.serving_pid, signal.SIGUSR2)
        assert link_went_down(vm), (dict(card.counters), card.process.ended(0),
                                    os.path.exists(f"/proc/{card.process.serving_pid}"))
        assert vm.wait(1) is None  # the guest runs on
        vm.stop(StopReason.QUIT)
        vm.wait()
    finally:
        vm.close()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "link is down" in line]
    assert lines == [f"voidbox: net0: the network backend (pid {card.process.pid}) was killed "
                     "by SIGSYS; the guest's link is down"], err
    assert "open failed" not in err and "execve failed" not in err, err  # killed, not refused


def test_no_sandbox_leaves_the_backend_as_it_was_started(spin):
    vm = Vm(VmConfig(kernel=spin, mem="64M", net=["slirp"], timeout=30, net_sandbox=False))
    try:
        vm.start()
        (card,) = vm.nics
        assert card.wait_backend(30)
        assert card.process.serving_pid == card.process.pid and card.process.sandbox is None
        assert status_fields(card.process.pid)["Seccomp"].strip() == "0"
        vm.stop(StopReason.QUIT)
        vm.wait()
    finally:
        vm.close()
