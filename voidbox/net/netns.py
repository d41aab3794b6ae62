"""Namespaces for `voidbox net run`: unshare, uid/gid maps, fd passing, interface setup.

Python 3.11 has no os.unshare, so unshare(2) and mount(2) are called through libc.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct

from voidbox.errors import VoidboxError

# linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
# linux/mount.h
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
NETNS_SELF = "/proc/self/ns/net"
# linux/prctl.h
PR_SET_PDEATHSIG = 1

# The interpreter's own libc (as voidbox.sandbox does): ctypes.util.find_library("c") runs
# `ldconfig -p` in a subprocess, ~5 ms of the card's backend process's start-up.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise VoidboxError(f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(source.encode() if source else None, target.encode(),
                    fstype.encode() if fstype else None, flags, None),
        f"mount {target}",
    )


def set_parent_death_signal(sig: int) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


# signalfd(2): a blocked signal read as a record that says who sent it, which a Python
# handler never learns.
SFD_NONBLOCK = os.O_NONBLOCK
SFD_CLOEXEC = os.O_CLOEXEC
SIGINFO_SIZE = 128  # struct signalfd_siginfo
SI_KERNEL = 0x80  # si_code of a signal the kernel sent, such as a terminal's Ctrl-C
_SIGSET_SIZE = 128  # glibc's sigset_t
_libc.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.sigemptyset.argtypes = [ctypes.c_void_p]
_libc.sigaddset.argtypes = [ctypes.c_void_p, ctypes.c_int]


def open_signalfd(signals) -> int:
    """A non-blocking, close-on-exec signalfd for `signals`, which the caller blocks
    (pthread_sigmask) so that they queue for it instead of being delivered."""
    mask = ctypes.create_string_buffer(_SIGSET_SIZE)
    _libc.sigemptyset(mask)
    for sig in signals:
        _libc.sigaddset(mask, int(sig))
    fd = _libc.signalfd(-1, mask, SFD_NONBLOCK | SFD_CLOEXEC)
    if fd < 0:
        raise VoidboxError(f"signalfd: {os.strerror(ctypes.get_errno())}")
    return fd


def read_signals(fd: int) -> list[tuple[int, int, int]]:
    """The signals queued on a signalfd, as (signo, si_code, sender's pid)."""
    out = []
    while True:
        try:
            record = os.read(fd, SIGINFO_SIZE)
        except (BlockingIOError, InterruptedError):
            return out
        if len(record) < SIGINFO_SIZE:
            return out
        signo, _errno, code, pid = struct.unpack_from("<IiiI", record)
        out.append((signo, code, pid))


def enter_namespaces(unprivileged: bool) -> None:
    """Move the calling process into new net and mount namespaces (and a user one if asked),
    and make its next child the init of a new PID namespace (pid_namespaces(7)): when that
    init exits, the kernel kills every process left in the namespace.

    In a new user namespace the caller maps its own uid and gid to root
    (user_namespaces(7): one line, its own ids, setgroups denied first), which gives it
    CAP_NET_ADMIN over the new network namespace.
    """
    uid, gid = os.geteuid(), os.getegid()
    host_netns = os.stat(NETNS_SELF).st_ino
    flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | (CLONE_NEWUSER if unprivileged else 0)
    unshare(flags)
    # Everything after this configures interfaces: be certain it is not the host's namespace.
    if os.stat(NETNS_SELF).st_ino == host_netns:
        raise VoidboxError("unshare(CLONE_NEWNET) left the process in its network namespace")
    if unprivileged:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1\n")
        _write("/proc/self/gid_map", f"0 {gid} 1\n")
    # Mounts made from here on stay in this namespace (mount_namespaces(7)).
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def mount_proc() -> bool:
    """Mount a procfs for the calling process's PID namespace over /proc (in its private
    mount namespace), so ps and /proc show the namespace's processes. False if the host
    forbids it (procfs partly hidden, as in some containers): the host's /proc stays."""
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except VoidboxError:
        return False
    return True


# Signals the Python runtime ignores for itself (it reports EPIPE and EFBIG as exceptions);
# a program it starts must get them at their defaults, as a shell would give them.
RUNTIME_IGNORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def reset_signals_for_exec() -> None:
    """Default dispositions for every handled or runtime-ignored signal, and an empty
    signal mask: what a command expects to inherit (execve(2) keeps ignored signals and
    the mask; handlers are reset anyway). subprocess does this with restore_signals."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if handler is not signal.SIG_DFL and (handler is not signal.SIG_IGN
                                              or sig in RUNTIME_IGNORED_SIGNALS
                                              or sig == signal.SIGINT):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise VoidboxError(f"cannot write {path}: {e.strerror}") from None


def bind_file(source: str, target: str) -> None:
    mount(source, target, None, MS_BIND)


IFA_F_NODAD = 0x02  # linux/if_addr.h: the address is usable at once, no DAD probes


def configure_interface(ifname: str, mac: str, mtu: int, address: str | None, prefixlen: int,
                        gateway: str | None, address6: str | None = None,
                        prefixlen6: int = 64, gateway6: str | None = None) -> None:
    """Bring lo and ifname up with mac and mtu; add an address and default route if asked,
    and an IPv6 address (without duplicate address detection: nothing else can be on the
    link, and DAD would hold the address back for a second) and IPv6 default route."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=idx, mtu=mtu, address=mac)
        if address is not None:
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        if address6 is not None:
            ipr.addr("add", index=idx, address=address6, prefixlen=prefixlen6,
                     family=socket.AF_INET6, flags=IFA_F_NODAD)
        ipr.link("set", index=idx, state="up")
        if gateway is not None:
            ipr.route("add", dst="default", gateway=gateway, oif=idx)
        if gateway6 is not None:
            ipr.route("add", dst="::/0", gateway=gateway6, oif=idx, family=socket.AF_INET6)


def send_fd(sock: socket.socket, fd: int, message: bytes = b"T") -> None:
    socket.send_fds(sock, [message], [fd])


def recv_fd(sock: socket.socket, bufsize: int = 4096) -> tuple[bytes, int | None]:
    msg, fds, _flags, _addr = socket.recv_fds(sock, bufsize, 1)
    return msg, (fds[0] if fds else None)
