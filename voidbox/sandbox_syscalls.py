"""The seccomp allow-list of the backend sandbox (voidbox.sandbox): every system call a
sandboxed backend may make, each with who needs it. Anything else kills the process
(SECCOMP_RET_KILL_PROCESS).

The list was found by running the backends under `strace -f` after the filter went on
(`VOIDBOX_SANDBOX_SECCOMP=log` logs instead of killing; see voidbox.sandbox): `voidbox net
run` with TCP bulk both ways, UDP, ICMP through ping and raw sockets, the DNS relay, TCP
and UDP forwards and a capture; and the vhost-user backend serving a frontend (memory
table, kicks and calls). Python 3.11 with glibc 2.36, x86-64.

What a sandboxed backend never does, so what is absent on purpose: open a file by name
(open, openat, creat, stat by path, readlink...), run a program (execve, execveat), start
a process or thread (fork, vfork, clone, clone3), change its privileges or namespaces
(setuid, capset, unshare, setns, mount), map executable memory, trace or be traced.

A condition narrows a call to the arguments its users pass; several alternatives are
OR-ed, the conditions inside one are AND-ed (libseccomp's rules). Numbers are Linux's
x86-64 ABI values, named as in the headers cited.
"""

from __future__ import annotations

from voidbox._records import named_tuple

# Comparison operators (libseccomp's enum scmp_compare).
CMP_EQ = 4
CMP_MASKED_EQ = 7

# linux/socket.h, linux/net.h, linux/in.h
AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_RAW = 3
SOCK_TYPE_MASK = 0xF  # the type without SOCK_NONBLOCK and SOCK_CLOEXEC
IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
# asm-generic/fcntl.h
F_DUPFD_CLOEXEC = 1030
# asm-generic/ioctls.h, linux/sockios.h, linux/if_tun.h
FIONBIO = 0x5421
FIONREAD = 0x541B  # = SIOCINQ
TUNSETOFFLOAD = 0x400454D0
# asm-generic/mman-common.h
PROT_EXEC = 0x4
# linux/fcntl.h
AT_EMPTY_PATH = 0x1000


@named_tuple
class Cond:
    """Argument `arg` compared by `op`: arg == a (CMP_EQ), or (arg & a) == b (MASKED_EQ)."""

    arg: int
    op: int
    a: int
    b: int = 0


def eq(arg: int, value: int) -> Cond:
    return Cond(arg, CMP_EQ, value)


def masked(arg: int, mask: int, value: int) -> Cond:
    return Cond(arg, CMP_MASKED_EQ, mask, value)


@named_tuple
class Allow:
    """One system call: `why` names who makes it; `when` lists alternative conditions
    (each a tuple AND-ed together), or is empty when any arguments are allowed."""

    name: str
    why: str
    when: tuple[tuple[Cond, ...], ...] = ()


def one_of(arg: int, values) -> tuple[tuple[Cond, ...], ...]:
    return tuple((eq(arg, v),) for v in values)


ALLOW: tuple[Allow, ...] = (
    # ---- I/O on fds the backend holds: the TAP, host sockets, eventfds, the vhost-user
    # connection, the capture file, stderr.
    Allow("read", "TAP frames (FramePort.read_batch), eventfd counts (kicks, the loop's "
          "wakeup), vhost-user messages"),
    Allow("write", "frames to the TAP, eventfd signals (calls), the capture file, log "
          "lines on stderr"),
    Allow("readv", "a TAP frame straight into RX chains (_netrx.readv_into_chains)"),
    Allow("writev", "a TAP frame from guest memory or header + frame in one gather "
          "(_netrx.writev_from_chain, FramePort)"),
    Allow("recvfrom", "host sockets' data: UDP, ICMP replies, the DNS relay, TCP reads"),
    Allow("sendto", "host sockets: UDP datagrams, ICMP echoes, DNS queries, vhost-user replies"),
    Allow("recvmsg", "TCP peeks into frame slots (send_tcp_stream), IP_RECVERR errors, "
          "vhost-user messages with SCM_RIGHTS (memory table fds, kick and call eventfds)"),
    Allow("sendmsg", "a TAP batch's TCP data in one call (tcp_nat), UDP with ancillary data"),
    Allow("close", "flows' sockets, received fds, eventfds"),
    Allow("fstat", "fd-based stat (os.fstat): a memory region's memfd size (vhost-user "
          "_map_region) with libcs older than glibc 2.33"),
    # glibc 2.33+ implements fstat() as newfstatat(fd, "", buf, AT_EMPTY_PATH): only that
    # form, never a stat by path.
    Allow("newfstatat", "os.fstat under glibc 2.33+ (fd-based only: AT_EMPTY_PATH): a "
          "memory region's memfd size (vhost-user _map_region), mmap.mmap",
          ((masked(3, AT_EMPTY_PATH, AT_EMPTY_PATH),),)),
    # ---- the event loop (voidbox.eventloop)
    Allow("epoll_wait", "EventLoop.run_once (_loop.pyx's epoll_wait; select.epoll.poll in "
          "the pure twin)"),
    Allow("epoll_pwait", "EventLoop.run_once on libcs that wrap epoll_wait in epoll_pwait"),
    Allow("epoll_ctl", "EventLoop.watch and unwatch"),
    Allow("poll", "vhost-user replies that wait for the frontend to read (backend.send)"),
    # ---- host sockets of the NAT: one per flow
    Allow("socket", "new flows: TCP and UDP sockets, ICMP ping sockets (SOCK_DGRAM, "
          "IPPROTO_ICMP / IPPROTO_ICMPV6) and the raw ICMP fallbacks, in the NAT's two "
          "families, IPv4 and IPv6",
          (
              # TCP flows to IPv4 hosts
              (eq(0, AF_INET), masked(1, SOCK_TYPE_MASK, SOCK_STREAM)),
              # UDP flows, DNS queries and ICMP ping sockets to IPv4 hosts
              (eq(0, AF_INET), masked(1, SOCK_TYPE_MASK, SOCK_DGRAM)),
              # the raw ICMP echo fallback (opened before the sandbox; kept for a re-probe)
              (eq(0, AF_INET), masked(1, SOCK_TYPE_MASK, SOCK_RAW), eq(2, IPPROTO_ICMP)),
              # TCP flows to IPv6 hosts (fd00::2 -> ::1 and outside addresses)
              (eq(0, AF_INET6), masked(1, SOCK_TYPE_MASK, SOCK_STREAM)),
              # UDP flows, DNS queries to IPv6 upstreams and ICMPv6 ping sockets
              # (SOCK_DGRAM, IPPROTO_ICMPV6)
              (eq(0, AF_INET6), masked(1, SOCK_TYPE_MASK, SOCK_DGRAM)),
              # the raw ICMPv6 echo fallback, as for IPv4
              (eq(0, AF_INET6), masked(1, SOCK_TYPE_MASK, SOCK_RAW), eq(2, IPPROTO_ICMPV6)),
          )),
    Allow("connect", "TCP flows (non-blocking connect), connected UDP flows"),
    Allow("accept4", "port forwards' listeners; the vhost-user listener's next frontend"),
    Allow("shutdown", "TCP half-close (the guest's FIN)"),
    Allow("getsockname", "flows' local ports"),
    Allow("getpeername", "accepted forward connections"),
    Allow("setsockopt", "TCP_NODELAY, SO_SNDBUF, SO_PEEK_OFF, SO_LINGER, IP_RECVERR and "
          "IPV6_RECVERR on flows"),
    Allow("getsockopt", "SO_ERROR after a non-blocking connect, SO_PEEK_OFF, SO_SNDBUF"),
    Allow("ioctl", "FIONBIO (socket.setblocking of accepted connections), FIONREAD = "
          "SIOCINQ (the card's stream port sizes a flow's unread bytes), TUNSETOFFLOAD (a "
          "TAP-backed card follows the offloads its driver acked)",
          one_of(1, (FIONBIO, FIONREAD, TUNSETOFFLOAD))),
    Allow("fcntl", "F_DUPFD_CLOEXEC only: mmap.mmap keeps its own copy of a memory "
          "region's memfd (vhost-user SET_MEM_TABLE)", one_of(1, (F_DUPFD_CLOEXEC,))),
    # ---- memory: the Python runtime's allocator and the vhost-user backend's mappings of
    # guest memory (MAP_SHARED memfds). Never executable memory.
    Allow("mmap", "the allocator's arenas; guest memory regions (vhost-user SET_MEM_TABLE, "
          "MAP_SHARED); never PROT_EXEC",
          ((masked(2, PROT_EXEC, 0),),)),
    Allow("mprotect", "glibc growing a per-thread malloc arena (a process forked from a "
          "thread other than the main one, e.g. run_in_netns called on a thread, keeps "
          "allocating there: grow_heap makes reserved pages read-write); never PROT_EXEC",
          ((masked(2, PROT_EXEC, 0),),)),
    Allow("munmap", "the allocator; a frontend's memory table replaced or gone"),
    Allow("mremap", "the allocator growing a large block in place (realloc of a buffer past "
          "glibc's mmap threshold)"),
    Allow("brk", "the allocator's heap"),
    # ---- time, randomness, synchronisation: the runtime
    Allow("clock_gettime", "time.monotonic and time.time (timers, pcap stamps) on hosts "
          "whose clock source the vDSO cannot read (it then makes the system call)"),
    Allow("gettimeofday", "the same fallback for gettimeofday-based time"),
    Allow("getrandom", "random and os.urandom (TCP initial sequence numbers, DNS ids)"),
    Allow("futex", "the runtime's locks when contended (threading.Lock in the EventLoop, "
          "logging's lock)"),
    # ---- signals and exit
    Allow("rt_sigaction", "signal.signal: the backend's SIGTERM/SIGINT handlers"),
    Allow("rt_sigprocmask", "the runtime masking signals around handlers; abort()"),
    Allow("rt_sigreturn", "return from every signal handler"),
    Allow("restart_syscall", "a system call interrupted by a signal, restarted by the kernel"),
    Allow("kill", "the sandbox's waiter relays SIGTERM/SIGINT/SIGHUP to the sandboxed "
          "process and re-raises the signal that ended it (the sandboxed process, PID 1 "
          "of its own PID namespace, sees no other process)"),
    Allow("tgkill", "raise() and abort(): the runtime signalling itself"),
    Allow("wait4", "the sandbox's waiter waiting for the sandboxed process"),
    Allow("getpid", "the runtime, logging (LogRecord.process)"),
    Allow("exit_group", "the process's end"),
)
