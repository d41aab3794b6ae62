"""The backend sandbox: what is left to a process that parses a hostile guest's frames.

A network backend (`voidbox net run`'s NAT, a `voidbox net serve` child) calls enter(plan)
once it holds everything it will ever open (the TAP, host listeners, the vhost-user
socket, resolv.conf and /proc/net/fib_trie read, every module imported) and before it
reads the first frame or starts any thread. From then on the process:
- has rlimits: fds (the flow limit plus a margin), memory (RLIMIT_DATA), no core dumps,
  no new processes;
- lives in new mount, PID, IPC and UTS namespaces (and a new user namespace when not
  root); the network namespace stays the host's, where the NAT's host sockets must go;
- sees as its root an empty read-only tmpfs (pivot_root, the old root detached): no host
  file is reachable by name;
- has no capability (effective, permitted, inheritable, bounding, ambient; securebits
  locked) and no_new_privs;
- runs under a seccomp-bpf allow-list (voidbox.sandbox_syscalls): any other system call
  kills the process (SIGSYS).

Processes. The PID namespace takes a fork: the process that calls enter() unshares, forks
and stays behind as a small waiter (empty root, no capabilities, the same filter) that
relays SIGTERM, SIGINT and SIGHUP to its child and exits with the child's status (a child
killed by a signal: the waiter re-raises it, so whoever waits sees the same signal). The
child, PID 1 of the new namespace, returns from enter() and goes on as the backend. So:
- the sandboxed process is the only child of the process that called enter(); its PID
  (in the caller's PID namespace) is Applied.pid, and its name (comm, what `ps` and
  /proc/PID/comm show) is Plan.name;
- it dies with the waiter (PR_SET_PDEATHSIG, SIGKILL), so a caller that gives its own
  process a parent-death signal gets the whole chain;
- an init ignores signals it has no handler for (pid_namespaces(7)): a relayed SIGTERM,
  SIGINT or SIGHUP left at its default disposition ends the child with status 128+N.

A host that lacks a piece (user namespaces for an unprivileged user, seccomp, libseccomp)
gets the rest and ONE warning line on stderr naming what is missing; callers offer a flag
to turn the sandbox off (`--no-sandbox`), never a silent downgrade. support() says what
this host has (`voidbox doctor` prints it).

Test-only: VOIDBOX_SANDBOX_PROBE=open (or 1) in the environment when enter() runs makes
SIGUSR2 try open("/etc/passwd") and then execve; =execve tries execve alone. The filter
must kill the process (SIGSYS). Development aid: VOIDBOX_SANDBOX_SECCOMP=log makes the
filter log (dmesg, audit) instead of killing, with a warning; it finds a missing entry of
the allow-list.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import resource
import select
import signal
import sys
import time

from ._records import dataclass, field
from .errors import VoidboxError
from .sandbox_syscalls import ALLOW

PROBE_ENV = "VOIDBOX_SANDBOX_PROBE"
SECCOMP_ENV = "VOIDBOX_SANDBOX_SECCOMP"
# What the backend may still allocate once sandboxed (RLIMIT_DATA, on top of what it has):
# a NAT's flows are Python objects of a few KiB each, their buffers are the kernel's.
DEFAULT_MEMORY_BUDGET = 1 << 30
# Fds beyond the flows: the TAP, epoll, eventfds, listeners, the vhost-user connection and
# the fds it passes (memory regions, kicks, calls), the runtime's own.
FD_MARGIN = 64
# linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
# linux/mount.h
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
# linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# linux/securebits.h: root gets no capabilities from exec or setuid, capabilities cannot
# be kept across setuid or raised as ambient, and none of this can be undone.
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP
              | SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED
              | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)
# linux/capability.h
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_MAX = 63  # capability sets are 64 bits wide
# asm/unistd_64.h: glibc has no pivot_root wrapper.
SYS_pivot_root = 155
# The directory the new root's tmpfs is mounted on, in the private mount namespace (the
# host's directory is untouched): the first of these that exists.
MOUNT_POINTS = ("/tmp", "/mnt", "/var/tmp", "/run")
TMPFS_OPTIONS = b"size=4k,nr_inodes=2,mode=0555"
RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SIGNAL_STATUS_BASE = 128
# Python modules a sandboxed process may need after the filter is on, imported before it
# (an import then would open files: SIGSYS). logging and traceback: warnings and a failed
# callback's traceback (the event loop logs them).
RUNTIME_PRELOAD = ("logging", "traceback", "linecache", "json")
# Modules a network backend imports inside functions (the NAT's TCP relay, the virtio-net
# card's checksums and RX stream, the rings a vhost-user backend makes on activation).
BACKEND_PRELOAD = ("voidbox.net.tcp_nat", "voidbox.net.fastpath", "voidbox.virtio.net",
                   "voidbox.virtio.rxstream", "voidbox.ring")


class SandboxError(VoidboxError):
    """The sandbox cannot be entered at all (a caller's mistake, not the host's lack)."""


@dataclass(frozen=True)
class Plan:
    """What enter() applies. name: the sandboxed process's comm (15 bytes at most);
    max_fds: fds the process may open beyond those it holds at entry (a NAT: its flow
    limit plus FD_MARGIN; RLIMIT_NOFILE becomes the highest open fd + 1 + this);
    memory_budget: bytes it may allocate beyond what it holds at entry (RLIMIT_DATA);
    preload: modules to import before the filter; seccomp_action: what a call outside
    the list gets ("kill", or "log" while hunting for a missing entry)."""

    name: str = "voidbox-sandbox"
    max_fds: int = 1024
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    preload: tuple = BACKEND_PRELOAD
    seccomp_action: str = "kill"


@dataclass
class Applied:
    """What enter() did: the record a caller logs or reports (summary())."""

    pid: int = 0  # the sandboxed process, as the caller's PID namespace numbers it
    waiter_pid: int = 0  # the caller's original process, now waiting (0: no fork)
    rlimits: dict = field(default_factory=dict)  # name -> (soft, hard)
    namespaces: tuple = ()  # ("user", "mount", "pid", "ipc", "uts") as entered
    empty_root: bool = False
    capabilities_dropped: bool = False
    bounding_set_dropped: bool = False
    securebits: int = 0
    no_new_privs: bool = False
    seccomp: str = ""  # "kill", "log" or "" (no filter)
    syscalls: int = 0  # entries in the filter
    missing: tuple = ()  # what this host lacks, one phrase each

    def summary(self) -> str:
        parts = [f"pid {self.pid}",
                 f"namespaces {','.join(self.namespaces) or 'none'}",
                 "empty root" if self.empty_root else "host root",
                 "no capabilities" if self.capabilities_dropped else "capabilities kept",
                 "no_new_privs" if self.no_new_privs else "new privileges possible",
                 f"seccomp {self.seccomp} ({self.syscalls} calls)" if self.seccomp else "no seccomp",
                 "rlimits " + ",".join(f"{k}={v[1]}" for k, v in self.rlimits.items())]
        return "; ".join(parts)


# ------------------------------------------------------------------ what the host has


class Piece:
    """One piece of the sandbox on this host: ok, and a phrase saying why (not)."""

    __slots__ = ("name", "ok", "detail")

    def __init__(self, name: str, ok: bool, detail: str):
        self.name, self.ok, self.detail = name, ok, detail

    def __repr__(self) -> str:
        return f"Piece({self.name!r}, {self.ok}, {self.detail!r})"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _status_field(name: str, pid: str = "self") -> str | None:
    text = _read(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def user_namespaces() -> Piece:
    """Whether this user may create a user namespace (root needs none: then whether other
    users could, in the detail)."""
    if os.geteuid() == 0:
        others = _unprivileged_user_namespaces()
        return Piece("user namespaces", True,
                     f"not needed as root; for other users: {others.detail}")
    return _unprivileged_user_namespaces()


def _unprivileged_user_namespaces() -> Piece:
    limit = _read("/proc/sys/user/max_user_namespaces")
    if limit is not None and limit.isdigit() and int(limit) == 0:
        return Piece("user namespaces", False, "user.max_user_namespaces is 0")
    # Debian's and Ubuntu's switches for unprivileged user namespaces.
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return Piece("user namespaces", False, "kernel.unprivileged_userns_clone is 0")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return Piece("user namespaces", False,
                     "kernel.apparmor_restrict_unprivileged_userns is 1")
    if not os.path.exists("/proc/self/ns/user"):
        return Piece("user namespaces", False, "the kernel has no user namespaces")
    return Piece("user namespaces", True, f"available (user.max_user_namespaces={limit})")


def other_namespaces() -> Piece:
    missing = [ns for ns in ("mnt", "pid", "ipc", "uts") if not os.path.exists(f"/proc/self/ns/{ns}")]
    if missing:
        return Piece("namespaces", False, f"the kernel lacks {', '.join(missing)} namespaces")
    return Piece("namespaces", True, "mount, PID, IPC and UTS")


def seccomp_kernel() -> Piece:
    if _status_field("Seccomp") is None:
        return Piece("seccomp", False, "the kernel has no seccomp (no Seccomp: in /proc/self/status)")
    actions = (_read("/proc/sys/kernel/seccomp/actions_avail") or "").split()
    if "kill_process" not in actions:
        return Piece("seccomp", False, "the kernel has no SECCOMP_RET_KILL_PROCESS (Linux 4.14+)")
    return Piece("seccomp", True, "filters with kill_process")


def libseccomp() -> Piece:
    try:
        from . import _seccomp

        _seccomp.load()
        version = ".".join(map(str, _seccomp.version()))
        level = _seccomp.api_level()
    except (ImportError, OSError) as error:
        return Piece("libseccomp", False, f"cannot be used: {error}")
    if level < 3:
        return Piece("libseccomp", False, f"{version}, API level {level}: needs 3 (kill_process)")
    return Piece("libseccomp", True, f"{_seccomp.LIBRARY} {version} (API level {level})")


def support() -> list[Piece]:
    """What this host offers the sandbox, read from /proc and libseccomp (no process is
    changed). pivot_root and the rest are only known by trying: see trial()."""
    return [user_namespaces(), other_namespaces(), seccomp_kernel(), libseccomp()]


def trial(timeout: float = 10.0) -> Applied | str:
    """Enter the sandbox in a throwaway child and return what it applied (or why it could
    not). The caller must be single-threaded, as for enter() (doctor is)."""
    import json

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            applied = enter(Plan(name="voidbox-trial", max_fds=FD_MARGIN), warn=False)
            os.write(w, json.dumps(_as_dict(applied)).encode())
            status = 0
        except BaseException as error:  # never return into the caller's code
            try:
                os.write(w, json.dumps({"error": str(error)}).encode())
            except BaseException:
                pass
        finally:
            os._exit(status)
    os.close(w)
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, wstatus = os.waitpid(pid, 0)
    if not data:
        code = os.waitstatus_to_exitcode(wstatus)
        return f"the trial child ended with {_describe_status(code)} before reporting"
    result = json.loads(data)
    if "error" in result:
        return result["error"]
    applied = Applied()
    for key, value in result.items():
        setattr(applied, key, tuple(value) if isinstance(value, list) else value)
    return applied


def _as_dict(applied: Applied) -> dict:
    return {name: getattr(applied, name) for name in (
        "pid", "waiter_pid", "rlimits", "namespaces", "empty_root", "capabilities_dropped",
        "bounding_set_dropped", "securebits", "no_new_privs", "seccomp", "syscalls", "missing")}


def _describe_status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def describe_exit(wstatus: int) -> str:
    """A waitpid status as a phrase for a one-line report ("killed by SIGSYS: a system
    call outside the sandbox's allow-list")."""
    code = os.waitstatus_to_exitcode(wstatus)
    if code == -signal.SIGSYS:
        return "killed by SIGSYS: a system call outside the sandbox's allow-list (seccomp)"
    if code < 0:
        return f"killed by {_describe_status(code)}"
    return f"exited with status {code}"


# ------------------------------------------------------------------ system calls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int, what: str) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), what)


def _mount(source, target, fstype, flags, data=None) -> None:
    _check(_libc.mount(source, target, fstype, flags, data), f"mount {target.decode()}")


# ------------------------------------------------------------------ entering


def enter(plan: Plan, warn: bool = True) -> Applied:
    """Sandbox this process for good (see the module docstring); return what was applied.

    Returns in the sandboxed process: a child of the caller's process when namespaces
    were entered (Applied.pid, Applied.waiter_pid), else the caller's process itself. The
    caller's process then never returns: it waits and exits with the child's status.
    Raises SandboxError, changing nothing, if the process runs more than one thread.
    warn=False leaves the one-line warning about missing pieces to the caller.
    """
    threads = _status_field("Threads")
    if threads is not None and threads != "1":
        raise SandboxError(f"the sandbox must be entered before any thread starts "
                           f"({threads} threads run)")
    applied = Applied(pid=os.getpid())
    missing = []
    hints = []
    # Everything that reads a file happens first, while there are files.
    seccomp_filter, action = _prepare_seccomp(plan, missing)
    _preload(plan)
    _keep_malloc_off_files()
    data_now = _vm_kib("VmData") * 1024
    probe = os.environ.get(PROBE_ENV)
    if probe and probe not in ("1", "open", "execve"):
        raise SandboxError(f"{PROBE_ENV}={probe!r}: expected open, execve or 1")

    open_fds = _open_fds()
    _set_rlimits(plan, applied, data_now, max(open_fds, default=2))
    forked = _enter_namespaces(applied, missing, hints, seccomp_filter, open_fds)
    if forked is not None:
        applied.waiter_pid = forked[0]
        applied.pid = forked[1]
    try:
        _prctl(PR_SET_NAME, ctypes.cast(ctypes.c_char_p(plan.name.encode()[:15]),
                                        ctypes.c_void_p).value, "prctl(PR_SET_NAME)")
    except OSError:
        pass  # a name is a convenience for ps, not a protection
    # No new processes from here (threads count too); the filter refuses them anyway.
    _setrlimit(applied, "NPROC", resource.RLIMIT_NPROC, 0)
    _drop_privileges(applied)
    _install_probe(probe)
    _exit_on_relayed_signals(forked is not None)
    if seccomp_filter is not None:
        try:
            seccomp_filter.load()
            applied.seccomp = action
            applied.syscalls = len(ALLOW)
        except OSError as error:
            missing.append(f"seccomp ({error.strerror})")
        finally:
            seccomp_filter.close()
    applied.missing = tuple(missing)
    if warn:
        warn_missing(applied, hints)
    if applied.seccomp == "log":
        sys.stderr.write(f"voidbox: sandbox: {SECCOMP_ENV}=log: calls outside the allow-list "
                         "are logged, not killed (a development aid)\n")
    return applied


def warn_missing(applied: Applied, hints=()) -> None:
    """The one line that says what this host did not give the sandbox."""
    if applied.missing:
        hint = f" ({'; '.join(hints)})" if hints else ""
        sys.stderr.write(f"voidbox: sandbox: this host lacks {', '.join(applied.missing)}{hint}; "
                         "the rest of the sandbox applies (--no-sandbox turns it off)\n")


M_TRIM_THRESHOLD = -1  # malloc.h


def _keep_malloc_off_files() -> None:
    """glibc shrinks a per-thread arena's heap (shrink_heap) only after reading
    /proc/sys/vm/overcommit_memory once, an openat the filter kills. A process forked from
    a thread other than its main one (run_in_netns called on a thread) allocates in such
    an arena for the rest of its life, so arenas are never trimmed here: a trim threshold
    of 1 GiB keeps heap_trim from shrinking. Freed memory stays for reuse."""
    _libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _vm_kib(name: str) -> int:
    value = _status_field(name) or "0 kB"
    return int(value.split()[0])


def _preload(plan: Plan) -> None:
    import importlib
    import linecache

    for module in RUNTIME_PRELOAD + tuple(plan.preload):
        importlib.import_module(module)
    # A traceback (a failed callback the event loop logs) reads source lines from .py
    # files: that would be an open(2), which kills. Tracebacks print without their lines.
    linecache.updatecache = lambda *args, **kwargs: []
    linecache.checkcache = lambda *args, **kwargs: None
    # glibc reads the time zone on the first localtime() (logging's asctime) and the
    # message catalog on the first strerror() with a locale: do both now, while they can.
    time.localtime()
    os.strerror(errno.ENOENT)


def _prepare_seccomp(plan: Plan, missing: list):
    """(the filter, its action), built now: a libseccomp or list error shows before
    anything changes. (None, "") where the host has no seccomp."""
    action = os.environ.get(SECCOMP_ENV) or plan.seccomp_action
    if action not in ("kill", "log"):
        raise SandboxError(f"{SECCOMP_ENV}={action!r}: expected kill or log")
    kernel = seccomp_kernel()
    if not kernel.ok:
        missing.append(f"seccomp ({kernel.detail})")
        return None, ""
    lib = libseccomp()
    if not lib.ok:
        missing.append(f"libseccomp ({lib.detail})")
        return None, ""
    from . import _seccomp

    default = _seccomp.ACT_KILL_PROCESS if action == "kill" else _seccomp.ACT_LOG
    seccomp_filter = _seccomp.Filter(default)
    # A 32-bit (int 0x80) or x32 call would bypass a list of x86-64 numbers: kill those.
    seccomp_filter.set_attr(_seccomp.ATTR_ACT_BADARCH, _seccomp.ACT_KILL_PROCESS)
    seccomp_filter.set_attr(_seccomp.ATTR_CTL_TSYNC, 1)
    seccomp_filter.set_attr(_seccomp.ATTR_CTL_NNP, 1)
    try:
        # A binary search over the list instead of a linear walk: every system call of
        # the NAT's hot loop pays for the filter.
        seccomp_filter.set_attr(_seccomp.ATTR_CTL_OPTIMIZE, 2)
    except OSError:
        pass  # libseccomp before 2.5: the linear filter is as correct
    for entry in ALLOW:
        number = _seccomp.resolve(entry.name)
        if number < 0:
            raise SandboxError(f"libseccomp does not know the system call {entry.name!r}")
        if not entry.when:
            seccomp_filter.add(_seccomp.ACT_ALLOW, number)
        for conditions in entry.when:
            seccomp_filter.add(_seccomp.ACT_ALLOW, number, tuple(conditions))
    return seccomp_filter, action


def _setrlimit(applied: Applied, name: str, which: int, value: int) -> None:
    """Lower a limit, soft and hard (a hard limit above the current one cannot be raised
    without CAP_SYS_RESOURCE: the lower of the two is kept)."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))
    applied.rlimits[name] = (value, value)


def _set_rlimits(plan: Plan, applied: Applied, data_now: int, highest: int) -> None:
    # fd numbers, not a count: the lowest free number is the next one, so the limit is
    # what is open now plus what the plan allows on top.
    _setrlimit(applied, "NOFILE", resource.RLIMIT_NOFILE, highest + 1 + plan.max_fds)
    # RLIMIT_DATA, not RLIMIT_AS: since Linux 4.7 it counts private writable mappings and
    # the heap, which is what the runtime allocates, and not MAP_SHARED mappings, which
    # is what a vhost-user backend maps guest RAM with (gigabytes, the frontend's memory
    # table, not the backend's allocation). RLIMIT_AS would count the guest's RAM.
    _setrlimit(applied, "DATA", resource.RLIMIT_DATA, data_now + plan.memory_budget)
    # A core dump would hold guest traffic, written wherever the kernel's pattern says.
    _setrlimit(applied, "CORE", resource.RLIMIT_CORE, 0)


def _enter_namespaces(applied: Applied, missing: list, hints: list, seccomp_filter,
                      open_fds: list[int]):
    """unshare, the uid/gid maps, the empty root, then fork: returns (waiter pid, child
    pid) in the child, never returns in the waiter; None if no namespace was entered."""
    unprivileged = os.geteuid() != 0
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    names = ["mount", "pid", "ipc", "uts"]
    if unprivileged:
        userns = user_namespaces()
        if not userns.ok:
            missing.append("user namespaces")
            hints.append(userns.detail)
            missing.append("namespaces and an empty root")
            return None
        flags |= CLONE_NEWUSER
        names.insert(0, "user")
    uid, gid = os.geteuid(), os.getegid()
    try:
        _check(_libc.unshare(flags), "unshare")
    except OSError as error:
        missing.append(f"namespaces ({error.strerror})")
        return None
    applied.namespaces = tuple(names)
    if unprivileged:
        # user_namespaces(7): an unprivileged process maps its own ids, one line each,
        # after denying setgroups. The same ids inside: nothing looks different.
        _write_proc("/proc/self/setgroups", "deny")
        _write_proc("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write_proc("/proc/self/gid_map", f"{gid} {gid} 1\n")
    try:
        _empty_root()
        applied.empty_root = True
    except OSError as error:
        missing.append(f"an empty root ({error.strerror})")
    return _fork_waiter(seccomp_filter, open_fds)


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _empty_root() -> None:
    """pivot_root(2) onto an empty read-only tmpfs and detach the old root: from here on no
    path names a host file. The tmpfs is mounted read-only from the start."""
    # Mount events stay in this namespace (mount_namespaces(7)).
    _mount(None, b"/", None, MS_REC | MS_PRIVATE)
    where = next((m for m in MOUNT_POINTS if os.path.isdir(m)), None)
    if where is None:
        raise OSError(errno.ENOENT, f"none of {', '.join(MOUNT_POINTS)} exists to mount on")
    _mount(b"tmpfs", where.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
           TMPFS_OPTIONS)
    os.chdir(where)
    # pivot_root(".", "."): the old root is stacked on the new one at "/", then detached;
    # no directory for it is needed in the (empty, read-only) new root (pivot_root(2)).
    _check(_libc.syscall(SYS_pivot_root, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount2 of the old root")
    os.chdir("/")


def _fork_waiter(seccomp_filter, open_fds: list[int]):
    """Fork; the parent becomes the waiter (never returns), the child returns
    (waiter pid, its own pid as the waiter sees it)."""
    r, w = os.pipe()
    waiter = os.getpid()
    # The relayed signals wait, blocked, until the waiter's relay is in place: one that
    # came between the fork and the handlers would run the caller's handler in the waiter
    # and never reach the child.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED_SIGNALS)
    pid = os.fork()
    if pid:
        os.close(r)
        os.write(w, pid.to_bytes(8, "little"))
        _wait_for(pid, w, seccomp_filter, open_fds, previous_mask)  # never returns
    signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    os.close(w)
    child = int.from_bytes(_read_exactly(r, 8), "little")
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(PR_SET_PDEATHSIG)")
    # The waiter holds the pipe's write end for its whole life: a hang-up here means it
    # died before the parent-death signal was armed.
    poller = select.poll()
    poller.register(r, select.POLLIN)
    if poller.poll(0):
        os._exit(SIGNAL_STATUS_BASE + signal.SIGKILL)
    os.close(r)
    return waiter, child


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            os._exit(SIGNAL_STATUS_BASE + signal.SIGKILL)
        data += chunk
    return data


def _wait_for(pid: int, keep: int, seccomp_filter, open_fds: list[int],
              mask: set = frozenset()) -> None:
    """The waiter: relay signals to pid, exit as it did. Never returns. It keeps no
    capability and runs under the same filter as the child."""
    status = SIGNAL_STATUS_BASE + signal.SIGKILL
    try:
        gc.disable()  # nothing here needs collecting: it would only walk the caller's heap
        # Everything the caller opened is the child's now: the waiter keeps stdio and the
        # pipe, so a connection or listener closes when the child closes it. (The fds
        # were listed before the pivot: no /proc here.)
        for fd in open_fds:
            if fd > 2 and fd != keep:
                try:
                    os.close(fd)
                except OSError:
                    pass

        def relay(sig, _frame):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

        for sig in RELAYED_SIGNALS:
            signal.signal(sig, relay)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what came meanwhile is relayed now
        _drop_privileges(Applied())
        if seccomp_filter is not None:
            seccomp_filter.load()
        while True:
            try:
                _, wstatus = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                os._exit(status)
        code = os.waitstatus_to_exitcode(wstatus)
        if code < 0:
            # Die of the same signal, so our parent sees what happened to the backend.
            sig = -code
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
            status = SIGNAL_STATUS_BASE + sig  # a signal that does not kill
        else:
            status = code
    finally:
        os._exit(status)


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        # No /proc (a host that hides it): every fd below the limit.
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return list(range(min(soft, 1 << 16)))


def _drop_privileges(applied: Applied) -> None:
    """securebits, bounding set, ambient set, then capset to nothing; no_new_privs."""
    try:
        _prctl(PR_SET_SECUREBITS, SECUREBITS, "prctl(PR_SET_SECUREBITS)")
        applied.securebits = SECUREBITS
    except OSError:
        pass  # needs CAP_SETPCAP: a process without capabilities has none to protect
    try:
        # Every capability the kernel knows: PR_CAPBSET_DROP says EINVAL past the last.
        for cap in range(CAP_MAX + 1):
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                if ctypes.get_errno() == errno.EINVAL and cap > 0:
                    break
                _check(-1, "prctl(PR_CAPBSET_DROP)")
        applied.bounding_set_dropped = True
    except OSError:
        pass  # needs CAP_SETPCAP, as above; no_new_privs keeps exec from using it
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "prctl(PR_CAP_AMBIENT)")
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero: effective, permitted, inheritable, both halves
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    applied.capabilities_dropped = True
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
    applied.no_new_privs = True


def _exit_on_relayed_signals(is_init: bool) -> None:
    """PID 1 of a namespace ignores signals it has no handler for: give SIGTERM, SIGINT
    and SIGHUP, where they are at their default, a handler that ends the process as the
    default would (status 128+N)."""
    if not is_init:
        return
    for sig in RELAYED_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, lambda sig, _frame: os._exit(SIGNAL_STATUS_BASE + sig))


def _install_probe(mode: str | None) -> None:
    """Test only (VOIDBOX_SANDBOX_PROBE): SIGUSR2 tries what the filter forbids."""
    if not mode:
        return

    def probe(_sig, _frame):
        sys.stderr.write(f"voidbox: sandbox probe ({PROBE_ENV}={mode}): trying "
                         f"{'execve' if mode == 'execve' else 'open and execve'}\n")
        sys.stderr.flush()
        if mode != "execve":
            try:
                os.close(os.open("/etc/passwd", os.O_RDONLY))
            except OSError as error:
                sys.stderr.write(f"voidbox: sandbox probe: open failed: {error.strerror}\n")
        try:
            os.execv("/bin/true", ["true"])
        except OSError as error:
            sys.stderr.write(f"voidbox: sandbox probe: execve failed: {error.strerror}\n")

    signal.signal(signal.SIGUSR2, probe)
