"""`voidbox net run`: a command in its own network namespace, networked by the NAT.

The way slirp4netns and pasta work: a child process enters new network and mount
namespaces (and a user namespace when not root), creates a TAP there, passes its fd to
the parent over a socketpair (SCM_RIGHTS), configures the interface (unless the command
will use DHCP), bind-mounts a resolv.conf naming the DNS relay over /etc/resolv.conf,
waits for the parent's go-ahead and execs the command. The parent serves the TAP with
the NAT engine until the child exits, and returns its exit status.

With offload (the default) the TAP carries virtio_net_hdr and has checksum and TCPv4
segmentation offload on (see voidbox.net.tap): the namespace's TCP sends and receives
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
import logging
import os
import select
import signal
import socket
import sys
import tempfile
import time

from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop
from voidbox.net import netns
from voidbox.net.config import NatConfig
from voidbox.net.engine import Engine

# The option parsers live in the configuration layer; re-exported for callers of old.
from voidbox.net.options import (  # noqa: F401
    config_from_options,
    parse_dns_upstream,
    pcap_from_options,
)
from voidbox.net.pcap import PcapSpec, PcapWriter
from voidbox.net.policy import Policy
from voidbox.net.tap import TapIO, open_tap

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
                 pcap: PcapSpec | None = None) -> int:
    """Run argv in a new network namespace behind the NAT; return its exit status.

    stats, if given, receives the engine's counters and the final flow count. pcap, if
    given, captures every frame crossing the namespace's interface, both ways.
    """
    if not argv:
        raise VoidboxError("no command given")
    # Opened before anything else: a capture that cannot be written stops the run before
    # the command starts, not after it has sent traffic nobody recorded.
    writer = PcapWriter(pcap.path, pcap.max_bytes) if pcap is not None else None
    try:
        return _run(argv, config, dhcp, policy, debug, stats, offload, writer)
    finally:
        if writer is not None:
            writer.close()


def _run(argv: list[str], config: NatConfig, dhcp: bool, policy: Policy | None, debug: bool,
         stats: dict | None, offload: bool, pcap: PcapWriter | None) -> int:
    unprivileged = os.geteuid() != 0
    # Import in the parent: the forked child should not import while other threads of this
    # process might hold the import lock.
    import pyroute2  # noqa: F401
    fd_resolv, resolv_path = tempfile.mkstemp(prefix="voidbox-resolv-", suffix=".conf")
    try:
        os.write(fd_resolv, f"nameserver {config.dns_ip}\n".encode())
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
            return _parent(pid, parent_sock, config, policy, debug, stats, offload, pcap)
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
            tap_fd, ifname = open_tap(TAP_NAME, vnet_hdr=offload)
            netns.send_fd(sock, tap_fd, MSG_TAP)
            os.close(tap_fd)
            netns.configure_interface(
                ifname, config.guest_mac, config.mtu,
                None if dhcp else config.guest_ip, config.netmask_bits,
                None if dhcp else config.gateway_ip,
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
        init_pid = os.fork()
        if init_pid == 0:
            _init(argv)  # never returns
        status = _wait_relaying_signals(init_pid)
    finally:
        os._exit(status)


# Signals relayed down the chain voidbox -> set-up child -> init -> command.
RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2)


def _wait_relaying_signals(pid: int) -> int:
    """Wait for child pid, passing RELAYED_SIGNALS on to it; its status as a shell's."""

    def relay(sig, _frame):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig in RELAYED_SIGNALS:
        signal.signal(sig, relay)
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
            signal.signal(sig, lambda sig, _f: _kill_quietly(cmd_pid, sig))
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


def _parent(pid: int, sock: socket.socket, config: NatConfig, policy: Policy | None,
            debug: bool, stats: dict | None, offload: bool, pcap: PcapWriter | None) -> int:
    tap_fd = None
    loop = engine = tap = None
    pidfd = os.pidfd_open(pid)
    old_handlers = {}
    try:
        msg, tap_fd = netns.recv_fd(sock)
        if msg.startswith(MSG_ERROR) or tap_fd is None:
            raise VoidboxError(msg[1:].decode(errors="replace") or "namespace set-up failed")
        msg = sock.recv(4096)
        if msg.startswith(MSG_ERROR):
            raise VoidboxError(msg[1:].decode(errors="replace"))
        if msg != MSG_GO:
            raise VoidboxError("namespace set-up failed")
        loop = EventLoop(debug=debug)
        # TapIO.write writes each frame at once or copies it to its backlog: borrow=True.
        engine = Engine(config, loop, lambda frame: tap.write(frame), policy, borrow=True)
        tap = TapIO(loop, tap_fd, config.mtu, engine.guest_frame, vnet_hdr=offload, pcap=pcap)
        engine.send_frame = tap.write  # from now on without the lambda's extra call

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
        loop.watch(pidfd, select.EPOLLIN, lambda ev: loop.stop())
        old_handlers = _forward_signals(pid)
        sock.send(MSG_GO)
        with _quiet_gc():
            loop.run()
            _drain(loop, engine, tap)
        _, status = os.waitpid(pid, 0)
        pid = 0
        code = os.waitstatus_to_exitcode(status)
        return SIGNAL_STATUS_BASE - code if code < 0 else code
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        if engine is not None:
            if stats is not None:
                # Flows still carrying data when the command's namespace went away: the
                # drain above should leave none.
                stats["active_tcp_flows_at_exit"] = engine.active_tcp_flows()
            engine.close()
            if stats is not None:
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
        if loop is not None:
            loop.unwatch(pidfd)
            if stats is not None:
                stats["watched"] = loop.watched_count()
                stats["loop_errors"] = loop.errors
            loop.close()
        os.close(pidfd)
        if tap_fd is not None:
            os.close(tap_fd)


# After the command exits, the kernel in its namespace may still be sending what it wrote
# just before (its orphaned sockets keep the namespace alive): keep relaying while TCP flows
# are open and frames still move, for at most DRAIN_MAX seconds.
DRAIN_MAX = 5.0
DRAIN_QUIET = 1.0


def _drain(loop: EventLoop, engine: Engine, tap: TapIO) -> None:
    start = quiet_since = time.monotonic()
    last = None
    while engine.active_tcp_flows():
        now = time.monotonic()
        activity = (tap.port.rx_frames, tap.port.tx_frames)  # tx includes TCP streams
        if activity != last:
            last, quiet_since = activity, now
        if now - quiet_since > DRAIN_QUIET or now - start > DRAIN_MAX:
            break
        loop.run_once(0.05)


# The relay allocates a few short-lived objects per frame; with the default threshold
# (700) the collector runs every few hundred frames and walks every flow each time.
GC_THRESHOLDS = (20000, 50, 1000)


@contextlib.contextmanager
def _quiet_gc():
    """Collect less often while the loop runs: set-up objects are frozen out of the
    collector's walks (gc.freeze) and young collections are rarer. Restored afterwards."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _forward_signals(pid: int) -> dict:
    """SIGTERM/SIGHUP go to the command; SIGINT reaches it from the terminal anyway."""
    old = {}

    def forward(sig, _frame):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    try:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, forward)
    except ValueError:
        pass  # not the main thread: signals stay as they are
    return old
