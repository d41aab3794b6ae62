"""`voidbox net run`: a command in its own network namespace, networked by the NAT.

The way slirp4netns and pasta work: a child process enters new network and mount
namespaces (and a user namespace when not root), creates a TAP there, passes its fd to
the parent over a socketpair (SCM_RIGHTS), configures the interface (unless the command
will use DHCP), bind-mounts a resolv.conf naming the DNS relay over /etc/resolv.conf,
waits for the parent's go-ahead and execs the command. Over IPv6 (unless --no-ipv6) the
interface also gets fd00::100/64 and a default route via fd00::2, and resolv.conf names
fd00::3 after 10.0.2.3. The parent (the supervisor) forks
the NAT process, which serves the TAP with the NAT engine, sandboxed (voidbox.sandbox),
until the child exits; the supervisor gives the go-ahead once the NAT is ready, relays
signals, and returns the command's exit status (docs/architecture.md, "net run's
processes").

With offload (the default) the TAP carries virtio_net_hdr and has checksum and TCPv4
(and TCPv6) segmentation offload on (see voidbox.net.tap): the namespace's TCP sends and receives
64 KiB segments whatever its MTU, and host data goes from socket to TAP in one Cython
call per burst (FramePort.send_tcp_stream).

With a capture (--pcap) every frame crossing the TAP goes to a PcapWriter, and host data
takes the Python path, which builds each frame and writes it through TapIO.write where
the capture sees it: bulk TCP towards the command is slower while capturing.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time

from voidbox import sandbox as sandboxing
from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop
from voidbox.net import netns
from voidbox.net.config import PREFIX6_LEN, NatConfig
from voidbox.net.engine import Engine

# The option parsers live in the configuration layer; re-exported for callers of old.
from voidbox.net.options import (  # noqa: F401
    config_from_options,
    parse_dns_upstream,
    pcap_from_options,
)
from voidbox.net.pcap import PcapSpec, PcapWriter
from voidbox.net.policy import Policy
from voidbox.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TapIO, open_tap
from voidbox.sandbox import describe_exit

log = logging.getLogger(__name__)

TAP_NAME = "tap0"
RESOLV_CONF = "/etc/resolv.conf"
MSG_TAP = b"T"
MSG_ERROR = b"E"
MSG_GO = b"G"
EXEC_FAILED = 127  # the shell's status for a command that is not found
EXEC_NOT_RUNNABLE = 126  # ... and for one that is found but cannot be run
SIGNAL_STATUS_BASE = 128
MAX_PORT = 65535


def run_in_netns(argv: list[str], config: NatConfig, dhcp: bool = False,
                 policy: Policy | None = None, debug: bool = False,
                 stats: dict | None = None, offload: bool = True,
                 pcap: PcapSpec | None = None, sandbox: bool = True) -> int:
    """Run argv in a new network namespace behind the NAT; return its exit status.

    stats, if given, receives the engine's counters and the final flow count, the NAT's
    PID (nat_pid) and what its sandbox applied (sandbox: a summary, None without one).
    pcap, if given, captures every frame crossing the namespace's interface, both ways.
    sandbox=False runs the NAT without voidbox.sandbox (`--no-sandbox`).
    """
    if not argv or not argv[0]:
        raise VoidboxError("no command given")
    # Opened before anything else: a capture that cannot be written stops the run before
    # the command starts, not after it has sent traffic nobody recorded.
    writer = PcapWriter(pcap.path, pcap.max_bytes) if pcap is not None else None
    try:
        return _run(argv, config, dhcp, policy, debug, stats, offload, writer, sandbox)
    finally:
        if writer is not None:
            writer.close()


def _run(argv: list[str], config: NatConfig, dhcp: bool, policy: Policy | None, debug: bool,
         stats: dict | None, offload: bool, pcap: PcapWriter | None, sandbox: bool) -> int:
    unprivileged = os.geteuid() != 0
    # Import in the parent: the forked child should not import while other threads of this
    # process might hold the import lock.
    import pyroute2  # noqa: F401
    fd_resolv, resolv_path = tempfile.mkstemp(prefix="voidbox-resolv-", suffix=".conf")
    try:
        # The IPv6 relay second: resolvers ask the first and fall back to the next.
        servers = [config.dns_ip] + ([config.dns_ip6] if config.ipv6 else [])
        os.write(fd_resolv, "".join(f"nameserver {ip}\n" for ip in servers).encode())
        os.fchmod(fd_resolv, 0o644)
        os.close(fd_resolv)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            parent_sock.close()
            _child(argv, config, dhcp, unprivileged, resolv_path, child_sock,
                   offload)  # never returns
        child_sock.close()
        with parent_sock:
            return _parent(pid, parent_sock, config, policy, debug, stats, offload, pcap,
                           sandbox)
    finally:
        try:
            os.unlink(resolv_path)
        except FileNotFoundError:
            pass


def _child(argv, config: NatConfig, dhcp: bool, unprivileged: bool, resolv_path: str,
           sock: socket.socket, offload: bool) -> None:
    """Set up the namespaces and the TAP, then run the namespace's init (never returns).

    This process stays outside the new PID namespace (unshare(CLONE_NEWPID) moves only its
    children): it waits for the init and exits with the command's status.
    """
    status = EXEC_FAILED
    try:
        try:
            netns.set_parent_death_signal(signal.SIGKILL)
            if os.getppid() == 1:  # the parent died before the line above
                os._exit(EXEC_FAILED)
            netns.enter_namespaces(unprivileged)
            # TSO6 as well as TSO4 when the NAT takes IPv6: the namespace's IPv6 TCP then
            # hands over 64 KiB segments too.
            offloads = TUN_F_CSUM | TUN_F_TSO4 | (TUN_F_TSO6 if config.ipv6 else 0)
            tap_fd, ifname = open_tap(TAP_NAME, vnet_hdr=offload, offloads=offloads)
            netns.send_fd(sock, tap_fd, MSG_TAP)
            os.close(tap_fd)
            # IPv6: a static address too (as for IPv4, unless --dhcp), beside whatever
            # SLAAC configures from the NAT's router advertisements.
            static6 = config.ipv6 and not dhcp
            netns.configure_interface(
                ifname, config.guest_mac, config.mtu,
                None if dhcp else config.guest_ip, config.netmask_bits,
                None if dhcp else config.gateway_ip,
                config.guest_ip6 if static6 else None, PREFIX6_LEN,
                config.gateway_ip6 if static6 else None,
            )
            if os.path.exists(RESOLV_CONF):
                netns.bind_file(resolv_path, RESOLV_CONF)
            # The mount holds the file now: unlinked here, it is not left in /tmp even
            # when voidbox is SIGKILLed (the parent's unlink never runs then).
            try:
                os.unlink(resolv_path)
            except OSError:
                pass
        except Exception as e:  # report every set-up failure to the parent as one line
            sock.send(MSG_ERROR + str(e).encode()[:1000])
            os._exit(EXEC_FAILED)
        sock.send(MSG_GO)
        if sock.recv(16) != MSG_GO:
            os._exit(EXEC_FAILED)
        sock.close()
        # Ctrl-C reaches the whole foreground process group: the command decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Blocked until each process of the chain relays them: a SIGTERM between a fork
        # and the handlers would be lost (PID 1 ignores what it has no handler for).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED_SIGNALS)
        init_pid = os.fork()
        if init_pid == 0:
            _init(argv)  # never returns
        status = _wait_relaying_signals(init_pid, mask)
    finally:
        os._exit(status)


# A SIGINT sent to voidbox alone (a script's kill, Popen.send_signal), on its way down the
# chain: the set-up child and the init ignore SIGINT itself, which a terminal's Ctrl-C
# delivers to them and to the command at once, so the command must not get it twice. The
# init turns it back into SIGINT for the command.
SIGINT_RELAY = signal.SIGRTMIN
# Signals relayed down the chain voidbox -> set-up child -> init -> command.
RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2, SIGINT_RELAY)


def _wait_relaying_signals(pid: int, mask=frozenset()) -> int:
    """Wait for child pid, passing RELAYED_SIGNALS on to it (those that came while they
    were blocked too: mask is the signal mask to restore); its status as a shell's."""

    def relay(sig, _frame):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig in RELAYED_SIGNALS:
        signal.signal(sig, relay)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    while True:
        try:
            _, wstatus = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return EXEC_FAILED
    code = os.waitstatus_to_exitcode(wstatus)
    return SIGNAL_STATUS_BASE - code if code < 0 else code


def _init(argv) -> None:
    """PID 1 of the command's namespace: start the command, relay signals to it, reap
    orphans, and exit with the command's status. When this exits the kernel kills every
    process left in the namespace, so nothing the command started outlives it.

    The command is not the init itself: an init gets no signal it has no handler for
    (pid_namespaces(7)), so a plain SIGTERM or SIGPIPE would not stop it.
    """
    status = EXEC_FAILED
    try:
        # The set-up child's death (voidbox killed) takes the namespace down with it.
        netns.set_parent_death_signal(signal.SIGKILL)
        netns.mount_proc()
        cmd_pid = os.fork()
        if cmd_pid == 0:
            _exec_command(argv)  # never returns
        for sig in RELAYED_SIGNALS:
            signal.signal(sig, lambda sig, _f: _kill_quietly(
                cmd_pid, signal.SIGINT if sig == SIGINT_RELAY else sig))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED_SIGNALS)  # blocked since the fork
        while True:
            try:
                pid, wstatus = os.waitpid(-1, 0)  # reaps orphans as well
            except ChildProcessError:
                break
            if pid == cmd_pid:
                code = os.waitstatus_to_exitcode(wstatus)
                status = SIGNAL_STATUS_BASE - code if code < 0 else code
                break
    finally:
        os._exit(status)


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _exec_command(argv) -> None:
    """exec the command with the signal state a shell gives it; never returns."""
    status = EXEC_FAILED
    try:
        netns.reset_signals_for_exec()
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            # The shell's convention: 127 not found, 126 found but cannot be run.
            status = EXEC_FAILED if e.errno == errno.ENOENT else EXEC_NOT_RUNNABLE
            sys.stderr.write(f"voidbox net run: {argv[0]}: {e.strerror}\n")
            sys.stderr.flush()
    finally:
        os._exit(status)


# The NAT process's reports to the supervisor (SOCK_SEQPACKET, one message each).
REPORT_READY = b"R"  # + JSON: the NAT serves the TAP (sandboxed as PID n); the command may start
REPORT_STATS = b"S"  # + JSON: counters and leak checks, after the loop
REPORT_ERROR = b"E"  # + one line: why the NAT stopped
REPORT_MAX = 1 << 20
# After the command exits the NAT drains for at most DRAIN_MAX; this bounds the wait for
# its report on top of that.
NAT_EXIT_GRACE = 30.0
NAT_NAME = "voidbox-nat"  # the sandboxed NAT's comm: `pgrep -x voidbox-nat`


def _parent(pid: int, sock: socket.socket, config: NatConfig, policy: Policy | None,
            debug: bool, stats: dict | None, offload: bool, pcap: PcapWriter | None,
            sandbox: bool = True) -> int:
    """The supervisor: receive the TAP, fork the NAT process, start the command when the
    NAT is ready, relay signals to the command, and return its status. The NAT's death
    while the command runs ends the command (no network is left for it) and the run."""
    tap_fd = None
    nat_pid = 0
    report = nat_pidfd = None
    pidfd = os.pidfd_open(pid)
    old_handlers = {}
    interrupts = None
    try:
        msg, tap_fd = netns.recv_fd(sock)
        if msg.startswith(MSG_ERROR) or tap_fd is None:
            raise VoidboxError(msg[1:].decode(errors="replace") or "namespace set-up failed")
        msg = sock.recv(4096)
        if msg.startswith(MSG_ERROR):
            raise VoidboxError(msg[1:].decode(errors="replace"))
        if msg != MSG_GO:
            raise VoidboxError("namespace set-up failed")
        report, nat_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if pcap is not None:
            pcap.flush()  # the NAT process writes the capture from here on
        supervisor = os.getpid()
        nat_pid = os.fork()
        if nat_pid == 0:
            sock.close()
            report.close()
            _nat_process(supervisor, tap_fd, pidfd, nat_end, config, policy, debug, offload,
                         pcap, sandbox)  # never returns
        nat_end.close()
        os.close(tap_fd)
        tap_fd = None
        nat_pidfd = os.pidfd_open(nat_pid)
        # SIGINT first: queued from here on, none is lost between the two.
        interrupts = _watch_interrupts()
        old_handlers = _forward_signals(pid, interrupts is None)
        ready = _next_report(report, nat_pidfd, None)
        if ready is None or not ready.startswith(REPORT_READY):
            raise VoidboxError(_nat_failure(nat_pid, ready))
        info = json.loads(ready[1:])
        if stats is not None:
            stats["nat_pid"] = info["pid"]
            stats["sandbox"] = info.get("sandbox")
        try:
            sock.send(MSG_GO)
        except OSError:
            # The set-up child is gone before the command started (a SIGTERM relayed to it
            # during start-up): its status, read below, is the run's.
            pass
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(nat_pidfd, select.POLLIN)
        if interrupts is not None:
            poller.register(interrupts, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if interrupts in events:
                _relay_interrupts(interrupts, pid)
            if pidfd in events:
                break
            if nat_pidfd in events:
                # The NAT is gone while the command runs: end the command, then say why.
                message = _nat_failure(nat_pid, _next_report(report, None, 0))
                nat_pid = 0
                raise VoidboxError(message)
        _, status = os.waitpid(pid, 0)
        pid = 0
        code = os.waitstatus_to_exitcode(status)
        if code == -SIGINT_RELAY:
            code = -signal.SIGINT  # the relayed SIGINT came before the chain relayed it
        final = _next_report(report, nat_pidfd, DRAIN_MAX + NAT_EXIT_GRACE)
        if final is None or not final.startswith(REPORT_STATS):
            message = _nat_failure(nat_pid, final)
            nat_pid = 0
            raise VoidboxError(message)
        if stats is not None:
            stats.update(json.loads(final[1:]))
        _, nat_status = os.waitpid(nat_pid, 0)
        nat_pid = 0
        if nat_status != 0:
            raise VoidboxError(f"net run: the NAT {describe_exit(nat_status)} after its report")
        return SIGNAL_STATUS_BASE - code if code < 0 else code
    finally:
        if interrupts is not None:
            # What is still queued (a terminal's Ctrl-C at the end) is dropped with the
            # signalfd, and SIG_IGN drops anything pending, before SIGINT is unblocked
            # and its handler restored.
            os.close(interrupts)
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
            signal.signal(signal.SIGINT, handler)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        for child in (pid, nat_pid):
            if child:
                try:
                    os.kill(child, signal.SIGKILL)
                    os.waitpid(child, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        for fd in (pidfd, nat_pidfd, tap_fd):
            if fd is not None:
                os.close(fd)
        if report is not None:
            report.close()


def _next_report(report: socket.socket, nat_pidfd: int | None, timeout: float | None) -> bytes | None:
    """The NAT's next report; None if it ended (or, with a timeout, stayed silent) first."""
    poller = select.poll()
    poller.register(report, select.POLLIN)
    if nat_pidfd is not None:
        poller.register(nat_pidfd, select.POLLIN)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        events = dict(poller.poll(wait))
        if report.fileno() in events:
            try:
                return report.recv(REPORT_MAX, socket.MSG_DONTWAIT) or None
            except BlockingIOError:
                continue
        if not events or nat_pidfd in events:
            # Gone or silent: a report it sent just before it exited is still readable.
            try:
                return report.recv(REPORT_MAX, socket.MSG_DONTWAIT) or None
            except BlockingIOError:
                return None


def _nat_failure(nat_pid: int, message: bytes | None) -> str:
    """One line: why the NAT stopped (its own words, or how it died). Reaps it."""
    said = message[1:].decode(errors="replace") if message and message.startswith(REPORT_ERROR) else ""
    try:
        os.kill(nat_pid, signal.SIGKILL)  # silent past the deadline: it will not report now
    except ProcessLookupError:
        pass
    _, wstatus = os.waitpid(nat_pid, 0)
    if said:
        return said
    return f"net run: the NAT {describe_exit(wstatus)}"


def _nat_process(supervisor: int, tap_fd: int, command_pidfd: int, report: socket.socket,
                 config: NatConfig, policy: Policy | None, debug: bool, offload: bool,
                 pcap: PcapWriter | None, sandboxed: bool) -> None:
    """The NAT: serve the TAP until the command's set-up child exits, drain, report the
    counters; sandboxed (voidbox.sandbox) once everything is open. Never returns."""
    status = 1
    # Whatever the caller's process had (a library caller's garbage, a test run's
    # temporary directories) is never collected here: its finalizers would act on the
    # caller's files from this fork, and once sandboxed any file call kills the NAT.
    gc.freeze()
    try:
        netns.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != supervisor:  # the supervisor died before the line above
            os._exit(status)
        # The terminal's Ctrl-C and hang-up reach the whole process group: the command
        # decides what they mean (the supervisor relays SIGHUP to it).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _serve(tap_fd, command_pidfd, report, config, policy, debug, offload, pcap, sandboxed)
        status = 0
    except BaseException as error:  # one line to the supervisor; never back into the caller
        line = str(error) if isinstance(error, VoidboxError) else f"net run: the NAT failed: {error!r}"
        try:
            report.send(REPORT_ERROR + line.encode()[:4000])
        except OSError:
            pass
    finally:
        os._exit(status)


def _serve(tap_fd: int, command_pidfd: int, report: socket.socket, config: NatConfig,
           policy: Policy | None, debug: bool, offload: bool, pcap: PcapWriter | None,
           sandboxed: bool) -> None:
    loop = engine = tap = None
    stats: dict = {}
    try:
        loop = EventLoop(debug=debug)
        # TapIO.write writes each frame at once or copies it to its backlog: borrow=True.
        engine = Engine(config, loop, lambda frame: tap.write(frame), policy, borrow=True)
        tap = TapIO(loop, tap_fd, config.mtu, engine.guest_frame, vnet_hdr=offload, pcap=pcap)
        engine.send_frame = tap.write  # from now on without the lambda's extra call
        engine.link_up()  # the first router advertisement (IPv6), then every RA_INTERVAL

        def interface_gone() -> None:
            # `ip link del tap0` in the namespace: no frame can reach the command any more.
            log.warning("the namespace's interface is gone: its flows are closed; "
                        "waiting for the command to exit")
            engine.close()

        tap.on_hangup = interface_gone
        # The stream sender writes frames straight to the fd, past TapIO and the capture.
        if offload and tap.port.tso and engine.tcp is not None and pcap is None:
            engine.attach_stream_port(tap.port, tap.stream_blocked)
            tap.on_writable = engine.tcp.port_writable
        if pcap is None:
            engine.attach_datagram_port(tap.port)

        def command_exited(_events: int) -> None:
            # Once: a pidfd stays readable after its process exits, and a level-triggered
            # watch would stop every turn of the drain below, which then never sleeps.
            loop.unwatch(command_pidfd)
            loop.stop()

        loop.watch(command_pidfd, select.EPOLLIN, command_exited)
        info = {"pid": os.getpid(), "sandbox": None}
        if sandboxed:
            # Everything is open (the TAP, forwards' listeners, the DNS upstreams, the
            # ICMP echo socket; the host's addresses were read by the Policy): from here
            # on, frames only.
            engine.prepare_sandbox()
            applied = sandboxing.enter(sandboxing.Plan(
                name=NAT_NAME, max_fds=config.max_flows + sandboxing.FD_MARGIN))
            info = {"pid": applied.pid, "sandbox": applied.summary()}
        report.send(REPORT_READY + json.dumps(info).encode())
        with _quiet_gc():
            loop.run()
            stats["drain_turns"] = _drain(loop, engine, tap)
    finally:
        if engine is not None:
            # Flows still carrying data when the command's namespace went away: the
            # drain above should leave none.
            stats["active_tcp_flows_at_exit"] = engine.active_tcp_flows()
            engine.close()
            stats["counters"] = dict(engine.counters)
            if engine.tcp is not None:
                stats["counters"].update(engine.tcp.counters)
            stats["flows"] = engine.flow_count()  # after close: everything released
            if tap is not None:
                stats["counters"].update(tap.counters)
            if pcap is not None:
                stats["counters"].update(pcap.counters)
        if tap is not None:
            tap.close()
        if pcap is not None:
            pcap.close()
        if loop is not None:
            loop.unwatch(command_pidfd)
            stats["watched"] = loop.watched_count()
            stats["loop_errors"] = loop.errors
            loop.close()
    report.send(REPORT_STATS + json.dumps(stats).encode())


# After the command exits, the kernel in its namespace may still be sending what it wrote
# just before (its orphaned sockets keep the namespace alive): keep relaying while TCP flows
# are open and frames still move, for at most DRAIN_MAX seconds.
DRAIN_MAX = 5.0
DRAIN_QUIET = 1.0


def _drain(loop: EventLoop, engine: Engine, tap: TapIO) -> int:
    """Relay while TCP flows are open and frames move (see above); the loop turns taken,
    which the stats report: a turn waits for events or 50 ms, so a drain with nothing to
    do takes about DRAIN_QUIET / 0.05 of them."""
    start = quiet_since = time.monotonic()
    last = None
    turns = 0
    while engine.active_tcp_flows():
        now = time.monotonic()
        activity = (tap.port.rx_frames, tap.port.tx_frames)  # tx includes TCP streams
        if activity != last:
            last, quiet_since = activity, now
        if now - quiet_since > DRAIN_QUIET or now - start > DRAIN_MAX:
            break
        loop.run_once(0.05)
        turns += 1
    return turns


# The relay allocates a few short-lived objects per frame; with the default threshold
# (700) the collector runs every few hundred frames and walks every flow each time.
GC_THRESHOLDS = (20000, 50, 1000)


@contextlib.contextmanager
def _quiet_gc():
    """Collect less often while the loop runs: set-up objects are frozen out of the
    collector's walks (gc.freeze) and young collections are rarer. The threshold is
    restored afterwards; nothing is unfrozen (the NAT process only exits after this, and
    the caller's objects it inherited must stay frozen: see _nat_process)."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*old)


def _watch_interrupts() -> int | None:
    """A signalfd for SIGINT, which is blocked from here on. Who sent a SIGINT decides
    what it means: see _relay_interrupts.

    None (SIGINT is then ignored, as before) where a signalfd would not see every SIGINT
    or would take the caller's: another thread (the Python API in a threaded program)
    would get a process-wide SIGINT that this thread blocks, a caller that blocks SIGINT
    keeps its own pending ones, and a voidbox started with SIGINT ignored (`cmd &` in a
    script) goes on ignoring it."""
    if (threading.current_thread() is not threading.main_thread()
            or threading.active_count() != 1
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            or signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])):
        return None
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        return netns.open_signalfd([signal.SIGINT])
    except VoidboxError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        return None


def _relay_interrupts(fd: int, pid: int) -> None:
    """SIGINTs queued for the supervisor. A terminal's Ctrl-C (sent by the kernel to the
    whole foreground process group) has reached the command already and is dropped; one
    that a process sent goes down the chain to the command. (A process that signals the
    whole group, `kill -INT -PGID`, reaches the command itself as well: siginfo cannot
    tell that from a kill of voidbox alone, so the command gets two.)"""
    for _signo, code, _sender in netns.read_signals(fd):
        if code != netns.SI_KERNEL:
            _kill_quietly(pid, SIGINT_RELAY)


def _forward_signals(pid: int, ignore_sigint: bool) -> dict:
    """SIGTERM/SIGHUP go to the command. SIGINT is read from a signalfd
    (_watch_interrupts), or, where there is none, ignored: a terminal's Ctrl-C reaches
    the command anyway."""
    old = {}

    def forward(sig, _frame):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    try:
        if ignore_sigint:
            old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, forward)
    except ValueError:
        pass  # not the main thread: signals stay as they are
    return old
