"""`voidbox net run`'s NAT in its sandbox, checked from outside as another process sees it.

The NAT is the process named voidbox-nat (its comm) among voidbox's descendants: the
sandbox's child of the NAT process voidbox forks (voidbox.sandbox, voidbox.net.run). The
tests read its /proc entries, send the test-only probe signal, and look at what
`voidbox net run` reports. The rest of the netns suite runs with the sandbox on as well
(it is the default).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.netns.test_net_run import PR_SET_DUMPABLE, WAIT, run, workdir  # noqa: F401
from tests.requires import missing, requires
from voidbox import sandbox
from voidbox.net import netns
from voidbox.net.config import NatConfig
from voidbox.net.policy import Policy
from voidbox.net.run import NAT_NAME, run_in_netns

pytestmark = [pytest.mark.netns, requires(
    all(p.ok for p in sandbox.support()),
    "the host lacks a piece of the sandbox: "
    + ", ".join(f"{p.name} ({p.detail})" for p in sandbox.support() if not p.ok))]

PY = sys.executable
NOBODY = 65534
ZERO_CAPS = "0000000000000000"


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (comm, ppid), from /proc/PID/stat (comm may hold spaces and parentheses)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        close = text.rindex(")")
        out[int(entry)] = (text[text.index("(") + 1:close], int(text[close + 2:].split()[1]))
    return out


def find_nat(ancestor: int, alive=lambda: True) -> int:
    """The sandboxed NAT among ancestor's descendants, once it is there."""
    for _ in range(WAIT * 20):
        procs = _processes()
        for pid, (comm, _ppid) in procs.items():
            parent, hops = pid, 0
            while comm == NAT_NAME and parent in procs and hops < 16:
                parent, hops = procs[parent][1], hops + 1
                if parent == ancestor:
                    return pid
        if not alive():
            break
        time.sleep(0.05)
    raise AssertionError(f"no {NAT_NAME} process under pid {ancestor}")


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_sandboxed(pid: int) -> dict[str, str]:
    # The NAT takes its name before it loads its seccomp filter (the last step): wait for
    # that step, bounded, or a busy machine finds it in between.
    status = status_of(pid)
    for _ in range(WAIT * 20):
        if status["Seccomp"] != "0":
            break
        time.sleep(0.05)
        status = status_of(pid)
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert status["CapEff"] == ZERO_CAPS and status["CapPrm"] == ZERO_CAPS
    assert status["CapBnd"] == ZERO_CAPS
    assert os.listdir(f"/proc/{pid}/root") == []
    assert status["NSpid"].split()[-1] == "1"  # PID 1 of its own PID namespace
    # The host's network namespace (its sockets reach the host), no other of the host's.
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    for ns in ("mnt", "pid", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    return status


def net_run(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "voidbox", "net", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))


def test_the_nat_is_sandboxed_seen_from_outside():
    proc = net_run("--", "sleep", "60")
    try:
        nat = find_nat(proc.pid, lambda: proc.poll() is None)
        assert_sandboxed(nat)
        # SIGTERM goes to the command as before; the NAT drains and goes with it.
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        proc.wait(WAIT)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == ""
    assert not os.path.exists(f"/proc/{nat}")


def test_the_probe_is_killed_by_seccomp_and_net_run_says_so_in_one_line():
    proc = net_run("--", "sleep", "60", env={sandbox.PROBE_ENV: "1"})
    try:
        nat = find_nat(proc.pid, lambda: proc.poll() is None)
        os.kill(nat, signal.SIGUSR2)
        _out, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        proc.wait(WAIT)
    assert proc.returncode == 1
    assert err.splitlines() == [
        f"voidbox: sandbox probe ({sandbox.PROBE_ENV}=1): trying open and execve",
        "voidbox: error: net run: the NAT killed by SIGSYS: a system call outside the "
        "sandbox's allow-list (seccomp)",
    ]
    # The command went with it: nothing of the run is left.
    assert not [pid for pid, (_c, ppid) in _processes().items() if ppid == proc.pid]


def test_run_in_netns_reports_the_sandbox_and_no_sandbox_turns_it_off():
    rc, _counters = run(["busybox", "ping", "-c", "1", "-W", str(WAIT), "10.0.2.2"])
    assert rc == 0
    stats: dict = {}
    rc = run_in_netns(["true"], NatConfig(), stats=stats)
    assert rc == 0 and stats["nat_pid"] > 0
    assert "empty root" in stats["sandbox"] and "seccomp kill" in stats["sandbox"]
    stats = {}
    rc = run_in_netns(["true"], NatConfig(), stats=stats, sandbox=False)
    assert rc == 0 and stats["sandbox"] is None and stats["flows"] == 0


def test_no_sandbox_leaves_the_nat_unconfined():
    proc = subprocess.Popen([PY, "-m", "voidbox", "net", "run", "--no-sandbox", "--", "sleep", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Without the sandbox the NAT keeps voidbox's name: it is the child of voidbox
        # that is not the namespace's set-up child (which has a child of its own, the init).
        nat = None
        for _ in range(WAIT * 20):
            procs = _processes()
            children = [pid for pid, (_c, ppid) in procs.items() if ppid == proc.pid]
            leaves = [pid for pid in children if not any(pp == pid for _c, pp in procs.values())]
            if len(children) == 2 and len(leaves) == 1:
                nat = leaves[0]
                break
            time.sleep(0.05)
        assert nat is not None
        status = status_of(nat)
        assert status["Seccomp"] == "0" and status["NoNewPrivs"] == "0"
        assert os.listdir(f"/proc/{nat}/root") != []
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        proc.wait(WAIT)
    assert proc.returncode == 128 + signal.SIGTERM


def test_an_unprivileged_nat_is_sandboxed_in_a_user_namespace(tmp_path, workdir):  # noqa: F811
    if not sandbox.user_namespaces().ok:
        missing("this host gives unprivileged users no user namespaces")
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            # As test_net_run's unprivileged test: a 0666 /dev/net/tun in a private mount
            # namespace, then uid nobody.
            netns.unshare(netns.CLONE_NEWNS)
            netns.mount(None, "/", None, netns.MS_REC | netns.MS_PRIVATE)
            node = tmp_path / "tun"
            os.mknod(node, 0o666 | stat.S_IFCHR, os.stat("/dev/net/tun").st_rdev)
            os.chmod(node, 0o666)
            netns.bind_file(str(node), "/dev/net/tun")
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            netns._libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
            os.environ["TMPDIR"] = str(workdir)
            stats: dict = {}
            code = run_in_netns(["sleep", "60"], NatConfig(), stats=stats,
                                policy=Policy(host_loopback=True))
            (workdir / "stats.json").write_text(json.dumps(stats))
        except BaseException as e:  # the child must never return into pytest
            sys.stderr.write(f"unprivileged run failed: {e!r}\n")
        finally:
            os._exit(code)
    try:
        nat = find_nat(pid)
        status = assert_sandboxed(nat)
        assert status["Uid"].split()[0] == str(NOBODY)
        assert os.readlink(f"/proc/{nat}/ns/user") != os.readlink("/proc/self/ns/user")
        with open(f"/proc/{nat}/uid_map") as f:
            assert f.read().split() == [str(NOBODY), str(NOBODY), "1"]
        os.kill(pid, signal.SIGTERM)  # relayed to the command
    finally:
        _, wstatus = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wstatus) == 128 + signal.SIGTERM
    stats = json.loads((workdir / "stats.json").read_text())
    assert stats["flows"] == 0 and stats["watched"] == 0 and stats["loop_errors"] == 0
    assert stats["sandbox"].startswith(f"pid {stats['nat_pid']}; namespaces user,mount,pid,ipc,uts")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.6, 1.0])
def test_sigterm_at_any_moment_of_the_start_up_ends_the_command(delay):
    """SIGTERM while net run is still starting (namespaces, the init's fork, the NAT's
    sandbox) ends voidbox and the command: no signal is lost between a fork and the
    handler that relays it, so nothing is left running."""
    marker = f"{60 + delay + os.getpid() % 1000 / 1000:.4f}"  # the command, found by its argv
    proc = net_run("--", "sleep", marker)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        proc.wait(WAIT)
    # Before voidbox relays SIGTERM it dies of it (the default), after it the command does.
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), err
    deadline = time.monotonic() + WAIT
    while _cmdline_running(["sleep", marker]):
        assert time.monotonic() < deadline, f"sleep {marker} outlived voidbox net run"
        time.sleep(0.05)


def _cmdline_running(argv: list[str]) -> bool:
    wanted = "\0".join(argv).encode() + b"\0"
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read() == wanted:
                        return True
            except OSError:
                pass
    return False
