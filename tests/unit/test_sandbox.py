"""The backend sandbox (voidbox.sandbox), checked from outside the sandboxed process.

Each test starts a Python child that enters the sandbox and then does one thing; the
test reads the child's /proc entries as another process would and looks at how it ended.
The child is the sandbox's waiter: a sandboxed process killed by seccomp makes it die of
SIGSYS too, so the returncode says what happened inside.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.requires import missing, requires
from voidbox import sandbox
from voidbox.sandbox_syscalls import ALLOW, CMP_EQ, CMP_MASKED_EQ

# Bound on a child's run; a failure bound, never asserted as a timing.
WAIT = 30
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM_PY = "/usr/bin/python3"
NOBODY = 65534


def _host_has_the_sandbox() -> tuple[bool, str]:
    lacking = [f"{p.name} ({p.detail})" for p in sandbox.support() if not p.ok]
    return (not lacking, "the host lacks " + ", ".join(lacking))


HAS_SANDBOX, LACKING = _host_has_the_sandbox()
needs_sandbox = requires(HAS_SANDBOX, LACKING)

# The child: enter, say what was applied (one JSON line), then run BODY. A backend never
# sleeps (its loop waits in epoll_wait), so time.sleep's clock_nanosleep is not on the
# list: the child waits in poll(2), which is. Every module is imported before the filter,
# as a backend does (an import then would look for files: SIGSYS for the wrong reason).
PRELUDE = """\
import ctypes, fcntl, json, logging, mmap, os, random, select, signal, socket, sys, termios, time
from voidbox import sandbox
wait = lambda seconds: select.poll().poll(seconds * 1000)
applied = sandbox.enter(sandbox.Plan(name="vb-sandbox-test", max_fds=32))
print(json.dumps({"pid": applied.pid, "waiter": applied.waiter_pid,
                  "namespaces": applied.namespaces, "seccomp": applied.seccomp,
                  "missing": applied.missing, "empty_root": applied.empty_root,
                  "rlimits": applied.rlimits, "getpid": os.getpid()}), flush=True)
"""


def start(body: str, python: str = sys.executable, env=None, user: int | None = None,
          **kwargs) -> subprocess.Popen:
    code = PRELUDE + textwrap.dedent(body)
    environ = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}

    def drop():
        if user is not None:
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)

    return subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=environ, cwd="/", preexec_fn=drop if user else None,
                            **kwargs)


def applied_of(child: subprocess.Popen) -> dict:
    line = child.stdout.readline()
    if not line:
        child.wait(WAIT)
        raise AssertionError(f"the child entered no sandbox: {child.stderr.read()}")
    return json.loads(line)


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def run(body: str, **kwargs) -> tuple[int, str, str]:
    child = start(body, **kwargs)
    out, err = child.communicate(timeout=WAIT)
    return child.returncode, out, err


# ---------------------------------------------------------------- the allow-list


FORBIDDEN = ("open", "openat", "openat2", "creat", "execve", "execveat", "fork", "vfork",
             "clone", "clone3", "ptrace", "unshare", "setns", "mount", "umount2",
             "pivot_root", "chroot", "setuid", "setgid", "capset", "prctl", "seccomp",
             "bpf", "process_vm_readv", "process_vm_writev", "memfd_create", "mkdir",
             "unlink", "unlinkat", "rename", "chmod", "link", "symlink", "stat", "lstat",
             "readlink", "readlinkat", "statx", "access", "faccessat", "init_module",
             "finit_module", "kexec_load", "keyctl", "add_key", "perf_event_open",
             "userfaultfd", "io_uring_setup", "pkey_mprotect")


def test_each_entry_says_who_needs_it_and_appears_once():
    names = [entry.name for entry in ALLOW]
    assert len(names) == len(set(names)), "a system call listed twice"
    for entry in ALLOW:
        assert entry.why.strip() and len(entry.why) > 10, entry.name
        for alternative in entry.when:
            assert alternative, f"{entry.name}: an empty alternative would allow any arguments"
            for cond in alternative:
                assert 0 <= cond.arg <= 5 and cond.op in (CMP_EQ, CMP_MASKED_EQ), (entry.name, cond)


def test_what_a_backend_never_does_is_not_on_the_list():
    names = {entry.name for entry in ALLOW}
    assert not names & set(FORBIDDEN)


@requires(sandbox.libseccomp().ok, "needs libseccomp2 (libseccomp.so.2)")
def test_libseccomp_knows_every_entry_and_the_forbidden_calls():
    from voidbox import _seccomp

    for name in [entry.name for entry in ALLOW] + list(FORBIDDEN):
        assert _seccomp.resolve(name) >= 0, name
    assert _seccomp.resolve("no_such_call") < 0


@requires(sandbox.libseccomp().ok, "needs libseccomp2 (libseccomp.so.2)")
def test_the_filter_compiles_to_bpf(tmp_path):
    """Every rule, conditions included, becomes a BPF program libseccomp accepts."""
    from voidbox import _seccomp

    f = _seccomp.Filter(_seccomp.ACT_KILL_PROCESS)
    for entry in ALLOW:
        for conditions in entry.when or ((),):
            f.add(_seccomp.ACT_ALLOW, _seccomp.resolve(entry.name), conditions)
    with open(tmp_path / "bpf", "wb") as out:
        f.export_bpf(out.fileno())
    f.close()
    size = (tmp_path / "bpf").stat().st_size
    assert size > 0 and size % 8 == 0  # struct sock_filter records
    with pytest.raises(ValueError, match="closed"):
        f.load()


# ---------------------------------------------------------------- support()


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def test_support_agrees_with_the_kernel_and_the_library():
    pieces = {p.name: p for p in sandbox.support()}
    assert set(pieces) == {"user namespaces", "namespaces", "seccomp", "libseccomp"}
    seccomp_field = "Seccomp" in (_read("/proc/self/status") or "")
    actions = (_read("/proc/sys/kernel/seccomp/actions_avail") or "").split()
    assert pieces["seccomp"].ok == (seccomp_field and "kill_process" in actions)
    try:
        ctypes.CDLL("libseccomp.so.2")
        loadable = True
    except OSError:
        loadable = False
    assert pieces["libseccomp"].ok == loadable
    if loadable:
        assert "libseccomp.so.2 2." in pieces["libseccomp"].detail
    limit = _read("/proc/sys/user/max_user_namespaces")
    if os.geteuid() == 0:
        assert pieces["user namespaces"].ok  # root needs none
        assert pieces["user namespaces"].detail.startswith("not needed as root; for other users: ")
    elif limit == "0" or _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        assert not pieces["user namespaces"].ok
    if limit not in (None, "0") and _read("/proc/sys/kernel/unprivileged_userns_clone") != "0" \
            and _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") != "1":
        assert pieces["user namespaces"].detail.endswith(f"available (user.max_user_namespaces={limit})")
    assert pieces["namespaces"].ok == all(
        os.path.exists(f"/proc/self/ns/{ns}") for ns in ("mnt", "pid", "ipc", "uts"))


@needs_sandbox
def test_trial_enters_the_whole_sandbox_in_a_throwaway_child():
    applied = sandbox.trial()
    assert isinstance(applied, sandbox.Applied), applied
    assert applied.missing == ()
    assert applied.seccomp == "kill" and applied.syscalls == len(ALLOW)
    assert applied.empty_root and applied.no_new_privs and applied.capabilities_dropped
    assert set(applied.namespaces) >= {"mount", "pid", "ipc", "uts"}


@needs_sandbox
def test_doctor_prints_the_sandbox_section():
    result = subprocess.run([sys.executable, "-m", "voidbox", "doctor"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    (head,) = [line for line in lines if line.startswith("sandbox:")]
    assert head.startswith("sandbox: complete; a trial applied: namespaces "), head
    assert f"seccomp kill ({len(ALLOW)} system calls allowed)" in head
    for piece in ("user namespaces: yes", "namespaces: yes", "seccomp: yes", "libseccomp: yes"):
        assert any(line.strip().startswith(piece) for line in lines), (piece, result.stdout)


# ---------------------------------------------------------------- seen from outside


@needs_sandbox
def test_the_sandboxed_process_seen_from_outside():
    child = start("wait(30)")
    try:
        applied = applied_of(child)
        pid = applied["pid"]
        assert applied["waiter"] == child.pid and applied["getpid"] == 1  # PID 1 inside
        status = status_of(pid)
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # SECCOMP_MODE_FILTER
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert status[caps] == "0000000000000000", caps
        assert status["PPid"] == str(child.pid)  # the only child of the process that entered
        assert status["NSpid"].split() == [str(pid), "1"]
        assert os.listdir(f"/proc/{pid}/root") == []
        with open(f"/proc/{pid}/comm") as f:
            assert f.read().strip() == "vb-sandbox-test"
        for ns in ("mnt", "pid", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        # The network namespace stays the host's: the NAT's sockets must reach the host.
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
        # The waiter is confined as well.
        waiter = status_of(child.pid)
        assert waiter["Seccomp"] == "2" and waiter["CapEff"] == "0000000000000000"
        assert os.listdir(f"/proc/{child.pid}/root") == []
        with open(f"/proc/{pid}/limits") as f:
            limits = f.read()
        assert "Max core file size        0" in limits
        assert f"Max open files            {applied['rlimits']['NOFILE'][0]}" in limits
    finally:
        child.kill()
        child.communicate(timeout=WAIT)


# What the filter must refuse, each by killing the process; the last column is why the
# call is one a compromised backend would want.
FORBIDDEN_CALLS = {
    "open a host file": "open('/etc/passwd')",
    "stat by path": "os.stat('/')",
    "run a program": "os.execv('/bin/true', ['true'])",
    "start a process": "os.fork()",
    "a raw IPv6 TCP socket": "socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)",
    "an IPv6 SCTP socket": "socket.socket(socket.AF_INET6, socket.SOCK_SEQPACKET)",
    "a unix socket": "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)",
    "a raw TCP socket": "socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)",
    "a netlink socket": "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)",
    "executable memory": "mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)",
    # mprotect is listed for glibc's per-thread arenas, never with PROT_EXEC.
    "memory made executable": ("m = mmap.mmap(-1, 4096)\n"
                               "a = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
                               "ctypes.CDLL(None).mprotect(ctypes.c_void_p(a), 4096, 5)"),
    "an ioctl not on the list": "fcntl.ioctl(socket.socket().fileno(), termios.TIOCGWINSZ, bytes(8))",
    "an fcntl not on the list": "fcntl.fcntl(0, fcntl.F_SETOWN, 1)",
    "an import after the filter": "import wave",
}


@needs_sandbox
@pytest.mark.parametrize("what", FORBIDDEN_CALLS)
def test_a_call_outside_the_list_kills_with_sigsys(what):
    rc, out, err = run(FORBIDDEN_CALLS[what] + "\nprint('survived', flush=True)\n")
    assert json.loads(out.splitlines()[0])["seccomp"] == "kill"
    assert "survived" not in out
    assert rc == -signal.SIGSYS, (rc, err)


@needs_sandbox
def test_what_a_backend_does_survives():
    """Sockets of the families and types on the list, a logged traceback (which would read
    source files), logging, timers and randomness run under the filter."""
    rc, out, err = run("""\
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        udp.connect(("127.0.0.1", 9))  # a UDP flow's socket: connected, never bound
        udp.send(b"x")
        assert udp.getsockname()[1] > 0
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setblocking(False)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tcp.close()
        udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        udp6.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR
        udp6.connect(("::1", 9))  # an IPv6 flow: fd00::2 -> ::1
        udp6.send(b"x")
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
        try:
            raise ValueError("logged, not fatal")
        except ValueError:
            logging.getLogger("t").exception("a failed callback")
        area = mmap.mmap(-1, 1 << 20)
        area[:5] = b"hello"
        area.close()
        big = bytearray(64 << 20)  # the allocator's mmap, munmap
        del big
        os.urandom(16), random.random(), time.monotonic(), time.time()
        print("survived", flush=True)
        """)
    assert rc == 0, err
    assert out.splitlines()[-1] == "survived"
    assert "ValueError: logged, not fatal" in err
    assert 'File "<string>"' in err  # the traceback, without its source lines


@needs_sandbox
@pytest.mark.parametrize("mode", ["1", "execve"])
def test_the_test_only_probe_is_killed_by_seccomp(mode):
    child = start("while True: wait(1)\n", env={sandbox.PROBE_ENV: mode})
    try:
        pid = applied_of(child)["pid"]
        os.kill(pid, signal.SIGUSR2)
        _out, err = child.communicate(timeout=WAIT)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGSYS, err
    tried = "execve" if mode == "execve" else "open and execve"
    assert f"voidbox: sandbox probe ({sandbox.PROBE_ENV}={mode}): trying {tried}" in err
    assert "failed" not in err  # killed at the first attempt, not refused with an errno


@needs_sandbox
def test_sigterm_to_the_waiter_ends_the_sandboxed_process():
    """SIGTERM is relayed; PID 1 ignores signals without a handler, so enter() gives it
    one that exits as the default would: 128 + SIGTERM."""
    child = start("while True: wait(1)\n")
    pid = applied_of(child)["pid"]
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=WAIT)
    assert child.returncode == 128 + signal.SIGTERM
    assert not os.path.exists(f"/proc/{pid}/status") or status_of(pid)["State"].startswith("Z")


@needs_sandbox
def test_killing_the_waiter_takes_the_sandboxed_process_with_it():
    child = start("while True: wait(1)\n")
    pid = applied_of(child)["pid"]
    child.kill()
    child.communicate(timeout=WAIT)
    for _ in range(100):  # PR_SET_PDEATHSIG: the kernel sends SIGKILL as the waiter dies
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_a_threaded_process_is_refused_and_left_as_it_was():
    code = textwrap.dedent("""\
        import threading, time
        from voidbox import sandbox
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
        try:
            sandbox.enter(sandbox.Plan())
        except sandbox.SandboxError as e:
            print(e)
        print(open("/proc/self/status").read().count("Seccomp:\\t0"))
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=WAIT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "the sandbox must be entered before any thread starts (2 threads run)", "1"]


@pytest.fixture
def importable_by_nobody():
    """A copy of the package (its compiled modules too) that uid nobody can import: the
    checkout may sit where nobody cannot read (a `mktemp -d` clone is 0700, and so is
    pytest's own temporary directory)."""
    import pathlib
    import shutil
    import tempfile

    root = pathlib.Path(tempfile.mkdtemp(prefix="voidbox-importable-"))
    try:
        shutil.copytree(os.path.join(ROOT, "voidbox"), root / "voidbox",
                        ignore=shutil.ignore_patterns("__pycache__", "*.c"))
        for path in (root, *root.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield str(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_sandbox
def test_an_unprivileged_process_gets_a_user_namespace(importable_by_nobody):
    if os.geteuid() != 0:
        missing("needs root to start a child as uid nobody")
    if not os.access(SYSTEM_PY, os.X_OK):
        missing(f"needs {SYSTEM_PY} (this venv's interpreter may be unreadable for nobody)")
    if not sandbox.user_namespaces().ok:
        missing("this host gives unprivileged users no user namespaces")
    child = start("wait(30)", python=SYSTEM_PY, user=NOBODY,
                  env={"PYTHONPATH": importable_by_nobody})
    try:
        applied = applied_of(child)
        assert applied["namespaces"] == ["user", "mount", "pid", "ipc", "uts"]
        assert applied["missing"] == [] and applied["empty_root"]
        pid = applied["pid"]
        status = status_of(pid)
        assert status["Uid"].split()[0] == str(NOBODY)
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        assert status["CapEff"] == "0000000000000000" and status["CapBnd"] == "0000000000000000"
        assert os.listdir(f"/proc/{pid}/root") == []
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        with open(f"/proc/{pid}/uid_map") as f:
            assert f.read().split() == [str(NOBODY), str(NOBODY), "1"]
    finally:
        child.kill()
        child.communicate(timeout=WAIT)


def test_a_host_without_libseccomp_gets_the_rest_and_one_warning(tmp_path):
    """A missing piece is never a silent downgrade: the rest applies, one line says what
    is missing. A libseccomp.so.2 that is no library stands in for a host without one."""
    if not all(p.ok for p in sandbox.support() if p.name != "libseccomp"):
        missing(LACKING)
    (tmp_path / "libseccomp.so.2").write_bytes(b"not a shared library")
    child = start("wait(30)", env={"LD_LIBRARY_PATH": str(tmp_path)})
    try:
        applied = applied_of(child)
        assert applied["seccomp"] == "" and applied["empty_root"]
        [lack] = applied["missing"]
        assert lack.startswith("libseccomp (cannot be used: cannot load libseccomp.so.2: ")
        status = status_of(applied["pid"])
        assert status["Seccomp"] == "0"  # what is missing is missing
        assert status["NoNewPrivs"] == "1" and status["CapEff"] == "0000000000000000"
        assert os.listdir(f"/proc/{applied['pid']}/root") == []
    finally:
        child.kill()
        _out, err = child.communicate(timeout=WAIT)
    [line] = err.splitlines()
    assert line == (f"voidbox: sandbox: this host lacks {lack}; the rest of the sandbox "
                    "applies (--no-sandbox turns it off)")
