"""`voidbox net run` against the hostile-input and fault probe of issue 8: each test names
the defect it guards. Servers listen on the host's loopback only."""

from __future__ import annotations

import ast
import json
import os
import random
import re
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
from voidbox.net.policy import Policy

pytestmark = pytest.mark.netns

WAIT = 10  # a bound on failure, never asserted as a timing


def voidbox(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "voidbox"), *args],
                          capture_output=True, text=True, timeout=60, **kw)


# ---- defect 6: the command starts with default signal dispositions and an empty mask ----

def _signal_state(path) -> str:
    return f"grep -E '^(SigIgn|SigBlk):' /proc/self/status > {path}"


def _callers_ignored_signals() -> str:
    """SigIgn of a plain child of this test (subprocess restores the signals Python itself
    ignores): what the caller's environment ignores, e.g. SIGHUP under nohup. The command
    keeps those, as it would across execve(2) without voidbox; nothing else."""
    out = subprocess.run(["grep", "^SigIgn:", "/proc/self/status"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[1]


def test_command_starts_with_default_signals_and_empty_mask(tmp_path):
    out = tmp_path / "sig"
    rc, _ = run(["sh", "-c", _signal_state(out)])
    assert rc == 0
    assert out.read_text().split() == ["SigBlk:", "0" * 16, "SigIgn:", _callers_ignored_signals()]


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
    assert out.read_text().split() == ["SigBlk:", "0" * 16, "SigIgn:", _callers_ignored_signals()]
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


# The command counts the SIGINTs it gets: its status is 10 + how many.
_COUNT_SIGINTS = """
import signal, sys, time
n = 0
def count(sig, frame):
    global n
    n += 1
signal.signal(signal.SIGINT, count)
print("ready", flush=True)
deadline = time.monotonic() + 10
while time.monotonic() < deadline and n == 0:
    time.sleep(0.01)
time.sleep(0.5)  # a second SIGINT would come in here
sys.exit(10 + n)
"""


def test_a_sigint_sent_to_voidbox_alone_reaches_the_command_once():
    """A script's kill -INT (or Popen.send_signal) to voidbox, not to its process group:
    it was ignored, and the run went on as if nothing had been asked."""
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "voidbox"),
                             "net", "run", "--", sys.executable, "-c", _COUNT_SIGINTS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT) == 11, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_terminals_ctrl_c_reaches_the_command_once():
    """Ctrl-C on the terminal goes to the whole foreground process group, the command
    included: voidbox must not pass its own copy on as a second SIGINT."""
    import fcntl
    import select
    import termios

    main_fd, tty_fd = os.openpty()

    def own_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "voidbox"),
                             "net", "run", "--", sys.executable, "-c", _COUNT_SIGINTS],
                            stdin=tty_fd, stdout=tty_fd, stderr=tty_fd,
                            preexec_fn=own_terminal)
    os.close(tty_fd)
    try:
        seen = b""
        deadline = time.monotonic() + WAIT
        while b"ready" not in seen and time.monotonic() < deadline:
            if select.select([main_fd], [], [], 0.5)[0]:
                seen += os.read(main_fd, 4096)
        assert b"ready" in seen, seen
        os.write(main_fd, b"\x03")  # the terminal's VINTR: the kernel signals the group
        assert proc.wait(timeout=WAIT) == 11
    finally:
        proc.kill()
        proc.wait()
        os.close(main_fd)




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
    and DNS lookups died with tracebacks and the command hung until its own timeout. The
    fd limit caps --max-flows, and that cap counts every protocol's flows together: 100
    UDP flows leave exactly cap - 100 TCP connections, and the rest get a prompt RST."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    result = tmp_path / "result"
    client = tmp_path / "client.py"
    client.write_text(textwrap.dedent(f"""\
        import socket, time
        for i in range(100):  # one UDP flow per source port (the NAT keeps each open)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("", 20000 + i))
                s.sendto(b"x", ("10.0.2.2", {sink.getsockname()[1]}))
        time.sleep(0.5)
        conns, outcomes, slowest = [], dict(), 0.0
        for i in range(150):  # more than the flows the NAT has left
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
                           "net", "run", "--host-loopback", "--", sys.executable, str(client)],
                          capture_output=True, text=True, timeout=60, preexec_fn=low_limit)
    sink.close()
    listener.close()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("open-file limit 200 allows") == 1
    cap = int(re.search(r"open-file limit 200 allows (\d+) flows", proc.stderr).group(1))
    outcomes, slowest = ast.literal_eval(result.read_text())
    assert 100 < cap < 250  # room for some connections, not for 100 flows + 150 of them
    assert outcomes == {"connected": cap - 100, "refused": 150 - (cap - 100)}, (cap, outcomes)
    assert slowest < 5  # each refusal is a prompt RST, never a hang


# ---- defects 1, 3, 11: where the command's flows may go ----------------------------------

@pytest.fixture
def tcp_listener():
    """A host loopback listener that counts the connections it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.setblocking(False)
    yield server
    server.close()


def _accepted(server: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


CURL_REFUSED = 7  # curl: failed to connect


def _curl(url: str) -> list[str]:
    return ["curl", "-s", "-o", "/dev/null", "--max-time", str(WAIT), url]


@pytest.mark.parametrize("rule", ["10.0.2.2", "10.0.2.0/24"])
def test_deny_with_the_gateway_address_blocks_the_host(tcp_listener, rule):
    port = tcp_listener.getsockname()[1]
    rc, counters = run(_curl(f"http://10.0.2.2:{port}/"), policy=Policy(deny=[rule], host_loopback=True))
    assert rc == CURL_REFUSED
    assert counters["tcp_denied"] == 1 and _accepted(tcp_listener) == 0


def test_deny_with_the_gateway_address_blocks_the_host_unprivileged(tmp_path, workdir,
                                                                    tcp_listener):
    port = tcp_listener.getsockname()[1]
    # The system interpreter: uid nobody cannot enter this venv's (under /root).
    cmd = ("/usr/bin/python3 -c 'import socket; "
           f"socket.create_connection((\"10.0.2.2\", {port}), timeout={WAIT}).close()'; true")
    # The same command without the rule reaches the listener: the rule is what blocks.
    assert _drop_to_nobody_and_run(tmp_path, workdir, cmd, NatConfig()) == 0
    assert _accepted(tcp_listener) == 1
    second = tmp_path / "second"  # the helper makes its tun node in the directory given
    second.mkdir()
    assert _drop_to_nobody_and_run(second, workdir, cmd, NatConfig(),
                                   policy=Policy(deny=["10.0.2.2"], host_loopback=True)) == 0
    assert _accepted(tcp_listener) == 0


def test_dns_address_is_not_a_relay_to_other_upstream_ports(tcp_listener):
    port = tcp_listener.getsockname()[1]
    config = NatConfig(dns_upstreams=[("127.0.0.1", port)])
    rc, counters = run(_curl(f"http://10.0.2.3:{port}/"), config)
    assert rc == CURL_REFUSED
    assert counters["tcp_unreachable"] == 1 and _accepted(tcp_listener) == 0


def test_other_addresses_of_the_guest_subnet_are_unreachable():
    # On-link for the namespace: make its kernel send the SYN to the NAT's MAC, as a
    # guest with a static neighbour entry (or a hostile one) would.
    rc, counters = run(["sh", "-c", "ip neigh replace 10.0.2.77 lladdr "
                        f"{NatConfig().gateway_mac} dev tap0 && "
                        + " ".join(_curl("http://10.0.2.77:80/"))])
    assert rc == CURL_REFUSED  # a prompt RST, not a connect timeout
    assert counters["tcp_unreachable"] == 1


# ---- defect 2: a UDP forward never takes a port another user's service holds ------------

def test_udp_forward_onto_a_held_port_is_a_one_line_error():
    service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    service.bind(("127.0.0.1", 0))
    port = service.getsockname()[1]
    try:
        proc = voidbox("net", "run", "--forward", f"udp:{port}:5300", "--", "true")
        assert proc.returncode == 1
        assert proc.stderr == (f"voidbox: error: cannot forward udp 127.0.0.1:{port}: "
                               "Address already in use\n")
    finally:
        service.close()


def test_udp_forward_as_another_user_cannot_share_roots_port():
    """The probe's case: root's service holds the port with SO_REUSEADDR, uid nobody
    asks for a forward onto it."""
    service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    service.bind(("127.0.0.1", 0))
    port = service.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            from voidbox.errors import VoidboxError
            from voidbox.eventloop import EventLoop
            from voidbox.net.udp import UdpNat

            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            loop = EventLoop()
            nat = UdpNat(loop, NatConfig(), Policy(host_loopback=True), lambda pkt: None)
            try:
                nat.add_forward("127.0.0.1", port, 5300)
                code = 1  # the hijack: bound next to root's service
            except VoidboxError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    service.close()
    assert os.waitstatus_to_exitcode(status) == 0


# ---- the same defects unprivileged: the user namespace owns the PID namespace ------------

def test_unprivileged_command_runs_in_its_own_pid_namespace(tmp_path, workdir):
    out = workdir / "pids"
    cmd = f"echo $$ > {out}; ls /proc | grep -c '^[0-9]' >> {out}"
    assert _drop_to_nobody_and_run(tmp_path, workdir, cmd, NatConfig()) == 0
    pid, count = out.read_text().split()
    assert pid == "2" and int(count) <= 4


def test_unprivileged_interface_deletion_does_not_spin(tmp_path, workdir):
    """As uid nobody (root in its user namespace), `ip link del tap0`: the NAT, in the
    forked child that runs it, must rest while the command sleeps."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert _drop_to_nobody_and_run(tmp_path, workdir, "ip link del tap0 && sleep 3",
                                   NatConfig()) == 0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    counters = json.loads((workdir / "counters.json").read_text())
    assert counters["tap_gone"] == 1
    assert cpu < 2.0, f"the NAT used {cpu:.2f} s of CPU while the command slept 3 s"
