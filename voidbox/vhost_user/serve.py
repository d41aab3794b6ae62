"""`voidbox net serve` and `voidbox blk serve`: one device core served to another VMM.

The device is the one a voidbox VM uses (voidbox.cards builds it): a VirtioNet on the NAT
or a TAP, or a VirtioBlk on a raw image. It runs on one EventLoop in this thread, behind
a VhostUserServer. SIGINT and SIGTERM stop it: the connection closes, the socket is
unlinked (a disk is synced and unlocked first), and the exit status is 0.
"""

from __future__ import annotations

import signal

from ..eventloop import EventLoop
from .backend import VhostUserServer


def serve(path: str, make_device, sandbox=None) -> int:
    """Serve the device make_device(loop) -> (device, on_disconnect, close) on `path`.

    Each frontend's end (a disconnect, a protocol error) is one line on stderr. With
    `sandbox` (a voidbox.sandbox.Plan), the server runs sandboxed in a child once its
    socket listens; this process stays outside, to remove the socket when it ends."""
    log_to_stderr()
    loop = EventLoop()
    device, on_disconnect, close = make_device(loop)
    server = VhostUserServer(device, path, loop, on_disconnect=on_disconnect)
    previous = {sig: signal.signal(sig, lambda *_: loop.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        if sandbox is not None:
            _enter_sandbox(server, device, sandbox)
        loop.run()
    finally:
        server.close()
        close()
        loop.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _enter_sandbox(server, device, plan) -> None:
    """Fork: the parent waits outside the sandbox and removes the socket at the end (a
    sandboxed process cannot unlink); the child enters voidbox.sandbox and serves."""
    import os

    from .. import sandbox as sandboxing

    relayed = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    # Blocked across the fork until the parent relays them: one that came between the fork
    # and the handlers would stop this process's copy of the loop and never reach the child.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, relayed)
    pid = os.fork()
    if pid:
        def relay(sig, _frame):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

        for sig in relayed:
            signal.signal(sig, relay)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        while True:
            try:
                _, wstatus = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        try:
            os.unlink(server.path)
        except OSError:
            pass
        code = os.waitstatus_to_exitcode(wstatus)
        if code < 0:
            import sys

            sys.stderr.write(f"voidbox: net serve: the sandboxed server "
                             f"{sandboxing.describe_exit(wstatus)}\n")
            sys.stderr.flush()
        os._exit(code if code >= 0 else 128 - code)
    signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)  # the loop's stop() handles them
    from ..net.netns import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)
    server._owns_path = False  # the parent removes it
    engine = getattr(getattr(device, "backend", None), "engine", None)
    if engine is not None:
        engine.prepare_sandbox()
    sandboxing.enter(plan)


def log_to_stderr(level: int | None = None) -> None:
    """The server's lines on stderr: each frontend's end (INFO), or only errors."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("voidbox: %(message)s"))
    logger = logging.getLogger("voidbox.vhost_user")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if level is None else level)
    logger.propagate = False


def serve_net(path: str, config, policy=None, capture=None, backend: str = "slirp",
              fallback: str = "slirp", sandbox: bool = True) -> int:
    """A virtio-net card on `backend` ("slirp" or "tap:NAME"), its NAT from config/policy."""
    from types import SimpleNamespace

    from ..cards import open_nic
    from ..config import parse_net_spec
    from ..errors import UsageError
    from ..net.config import parse_mac

    try:
        kind, tap = parse_net_spec(backend)
    except UsageError:
        kind = None
    if kind not in ("slirp", "tap"):
        raise UsageError(f"bad --backend {backend!r}: expected slirp or tap:NAME")
    # open_nic's view of a VmConfig: the NAT's layout and rules, one card, its capture.
    wanted = SimpleNamespace(nat=config, policy=policy, net_fallback=fallback, pcap=capture)
    spec = SimpleNamespace(backend=kind, tap=tap, mac=parse_mac(config.guest_mac), index=0)

    def make(loop):
        device = open_nic(spec, wanted, loop, loop.call_soon)
        # A frontend that goes away takes its guest's flows with it (host sides reset).
        return device, getattr(device.backend, "drop_flows", None), device.close

    plan = None
    if sandbox:
        from .. import sandbox as sandboxing

        plan = sandboxing.Plan(name="voidbox-serve",
                               max_fds=config.max_flows + sandboxing.FD_MARGIN)
    return serve(path, make, plan)


def serve_blk(path: str, image: str, readonly: bool = False) -> int:
    """A virtio-blk disk on the raw image (locked while served, synced at exit)."""
    from ..cards import open_disk
    from ..config import DiskSpec, _existing_file

    _existing_file(image, "disk image")

    def make(_loop):
        device, backend = open_disk(DiskSpec(image, readonly))
        return device, None, backend.close

    return serve(path, make)
