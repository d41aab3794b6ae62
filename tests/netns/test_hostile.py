"""`voidbox net run` against the hostile-input and fault probe of issue 8: each test names
the defect it guards. Servers listen on the host's loopback only."""

from __future__ import annotations

import ast
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pyroute2  # noqa: F401  (imported as root: the uid-nobody child cannot read it all)
import pytest

from tests.netns.test_net_run import _drop_to_nobody_and_run, run
from voidbox.net.config import NatConfig

pytestmark = pytest.mark.netns

WAIT = 10  # a bound on failure, never asserted as a timing


def voidbox(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "voidbox"), *args],
                          capture_output=True, text=True, timeout=60, **kw)


# ---- defect 6: the command starts with default signal dispositions and an empty mask ----

def _signal_state(path) -> str:
    return f"grep -E '^(SigIgn|SigBlk):' /proc/self/status > {path}"


def test_command_starts_with_default_signals_and_empty_mask(tmp_path):
    out = tmp_path / "sig"
    rc, _ = run(["sh", "-c", _signal_state(out)])
    assert rc == 0
    assert out.read_text().split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]


def test_sigpipe_kills_like_in_a_shell():
    rc, _ = run(["sh", "-c", "kill -PIPE $$"])
    assert rc == 128 + signal.SIGPIPE
    # yes | head: the writer dies of SIGPIPE (141) instead of printing "Broken pipe".
    proc = voidbox("net", "run", "--", "bash", "-c", "yes | head -n1 >/dev/null; echo ${PIPESTATUS[*]}")
    assert proc.returncode == 0 and proc.stdout.split() == ["141", "0"], proc.stderr
    assert "Broken pipe" not in proc.stderr


def test_unprivileged_command_gets_default_signals(tmp_path, workdir):
    out = workdir / "sig"
    assert _drop_to_nobody_and_run(tmp_path, workdir, _signal_state(out), NatConfig()) == 0
    assert out.read_text().split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]
    second = tmp_path / "second"  # the helper makes its tun node in the directory given
    second.mkdir()
    assert _drop_to_nobody_and_run(second, workdir, "kill -PIPE $$", NatConfig()) == 141


# ---- defect 12: found but not runnable is 126, not found is 127 -----------------------

def test_exec_failures_use_the_shells_statuses(tmp_path):
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\nexit 0\n")
    proc = voidbox("net", "run", "--", str(plain))
    assert proc.returncode == 126
    assert proc.stderr.strip() == f"voidbox net run: {plain}: Permission denied"
    proc = voidbox("net", "run", "--", str(tmp_path / "missing"))
    assert proc.returncode == 127


# ---- defect 9: the command's descendants die with voidbox ---------------------------------

def _alive(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return found.stdout.split()


@pytest.mark.parametrize("victim", ["voidbox", "command"])
def test_descendants_do_not_outlive_voidbox_or_the_command(tmp_path, victim):
    """SIGKILL of voidbox, or the command exiting, ends everything the command started
    (its own PID namespace, whose init exits with it)."""
    marker = f"{random.randint(1000, 9999)}.{random.randint(100, 999)}"
    ready = tmp_path / "ready"
    body = (f"sleep 3{marker} & sleep 4{marker} & touch {ready}; "
            + ("sleep 60" if victim == "voidbox" else "exit 0"))
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "voidbox"),
                             "net", "run", "--", "sh", "-c", body],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        if victim == "voidbox":
            assert len(_alive(f"^sleep [34]{marker}$")) == 2
            proc.kill()
        proc.wait(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while _alive(f"^sleep [34]{marker}$") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(f"^sleep [34]{marker}$") == []
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["pkill", "-f", f"^sleep [34]{marker}$"])


def test_command_is_not_init_and_sees_its_own_pid_namespace(tmp_path):
    out = tmp_path / "pids"
    rc, _ = run(["sh", "-c", f"echo $$ > {out}; ls /proc | grep -c '^[0-9]' >> {out}"])
    assert rc == 0
    pid, count = out.read_text().split()
    assert pid == "2"  # PID 1 is voidbox's small init, which relays signals and reaps
    assert int(count) <= 4  # init, sh, ls, grep: not the host's processes


def test_sigterm_reaches_the_command_through_the_init():
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "voidbox"),
                             "net", "run", "--", "sleep", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT) == 128 + signal.SIGTERM




# ---- defect 8: a TAP whose interface is deleted leaves the loop -------------------------

def test_deleting_the_interface_closes_flows_and_does_not_spin(tmp_path):
    """`ip link del tap0` made the NAT spin at 100% CPU until the command exited."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(WAIT)
    seen = {}

    def serve():
        conn, _ = server.accept()
        conn.settimeout(WAIT)
        seen["first"] = conn.recv(10)
        try:
            seen["then"] = conn.recv(10)  # b"" or a reset once the NAT closes the flow
        except ConnectionResetError:
            seen["then"] = "reset"
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = tmp_path / "client.py"
    client.write_text(textwrap.dedent(f"""\
        import socket, subprocess, time
        s = socket.create_connection(("10.0.2.2", {server.getsockname()[1]}), timeout={WAIT})
        s.sendall(b"x")
        time.sleep(0.5)
        subprocess.run(["ip", "link", "del", "tap0"], check=True)
        time.sleep(3)
        """))
    start = time.process_time()
    rc, counters = run([sys.executable, str(client)])
    cpu = time.process_time() - start
    thread.join(WAIT)
    server.close()
    assert rc == 0
    assert counters["tap_gone"] == 1
    assert seen == {"first": b"x", "then": "reset"}
    # A spinning loop burns the command's whole 3 s; set-up and teardown take a fraction.
    assert cpu < 1.5, f"the NAT used {cpu:.2f} s of CPU while the command slept 3 s"


# ---- defect 7: out of file descriptors, flows are refused promptly -----------------------

def test_low_fd_limit_refuses_new_flows_promptly(tmp_path):
    """With `ulimit -n` 200 (hard), a flood of UDP flows used every fd; then TCP connects
    and DNS lookups died with tracebacks and the command hung until its own timeout."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    result = tmp_path / "result"
    client = tmp_path / "client.py"
    client.write_text(textwrap.dedent(f"""\
        import socket, time
        for i in range(300):  # one UDP flow per source port (the NAT keeps each open)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("", 20000 + i))
                s.sendto(b"x", ("10.0.2.2", {sink.getsockname()[1]}))
        time.sleep(0.5)
        conns, outcomes, slowest = [], dict(), 0.0
        for i in range(150):  # more than the fds the NAT has left
            start = time.monotonic()
            try:
                conns.append(socket.create_connection(("10.0.2.2", {listener.getsockname()[1]}),
                                                      timeout=10))
                outcome = "connected"
            except ConnectionRefusedError:
                outcome = "refused"
            except OSError as e:
                outcome = type(e).__name__
            slowest = max(slowest, time.monotonic() - start)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        open({str(result)!r}, "w").write(repr((outcomes, slowest)))
        """))

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "voidbox"),
                           "net", "run", "--", sys.executable, str(client)],
                          capture_output=True, text=True, timeout=60, preexec_fn=low_limit)
    sink.close()
    listener.close()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("open-file limit 200 allows") == 1
    outcomes, slowest = ast.literal_eval(result.read_text())
    assert set(outcomes) == {"connected", "refused"}, outcomes
    assert slowest < 5  # each refusal is a prompt RST, never a hang
