"""A card's network backend in a process of its own: what `--net slirp` and `--net tap:NAME`
do unless `--net-isolation none`.

The NAT parses every frame a hostile guest writes. In the VMM's process it would run
beside /dev/kvm, all of guest memory and the user's files; here it runs in a child
`voidbox net serve --vmm-fd N`, which serves the card over vhost-user like any other
backend, so the data path is shared memory and eventfds and the VMM never sees a frame.

The VMM (`spawn`) makes a control socketpair, starts the child with only its end (the
child's stdin and stdout are /dev/null; stderr is the user's, for the NAT's one-line
notes) and sends over it, in one message:
- the configuration, as JSON: the card's name and MAC, the backend, the NAT's settings and
  rules as the VMM validated them (the DNS upstreams already read from resolv.conf), and the
  capture's path;
- with SCM_RIGHTS, the vhost-user socket (one end of a socketpair for voidbox's own VMM,
  a listening socket in the private runtime directory for QEMU) and, for tap:NAME, the TAP
  the VMM opened: whatever needs privilege stays in the VMM.

The child (`serve_for_vmm`) builds the card, answers {"ready": true} (or a one-line error
with its exit status, which the VMM raises as its own), serves its one frontend, and when
that frontend or the VMM goes away it closes the NAT's flows, sends the card's counters
back and exits. The child dies with the VMM (PR_SET_PDEATHSIG, and the control socket's
hang-up); the VMM reaps it and says in one line how it ended if it ended first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import sys
import threading

from ..errors import ExitStatus, VoidboxError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    import subprocess

READY_TIMEOUT = 30.0  # the child's start-up: a Python interpreter and the NAT's imports
EXIT_TIMEOUT = 5.0  # after its frontend went away, before the child is killed
_LENGTH = struct.Struct("<I")
MAX_DOCUMENT = 16 << 20  # a configuration or counters document; anything larger is refused
MAX_FDS = 2  # the vhost-user socket, the TAP
# `voidbox net serve --vmm-fd N` as the child runs it: voidbox's entry point, argv after -c.
CHILD_MAIN = "from voidbox.launch import main; main()"


# ---- the VMM's side ---------------------------------------------------------------------

class BackendProcess:
    """A running child backend: its pid, its control socket, and how it ended."""

    def __init__(self, process: subprocess.Popen, control: socket.socket, card: str):
        self.process = process
        self.control = control
        self.card = card
        self.backend_name = "SlirpBackend"
        self.counters: dict = {}
        self.frontend_socket: socket.socket | None = None  # the VMM's end, if a socketpair
        self.serving_pid: int | None = None  # once ready: the (sandboxed) serving process
        self.sandbox: str | None = None
        self._ready = False
        self._lock = threading.Lock()  # one request on the control socket at a time

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self) -> None:
        """Block until the child serves the card; its start-up error is raised here."""
        if self._ready:
            return
        try:
            reply = _from_child(self.control, READY_TIMEOUT)
        except (OSError, ValueError, EOFError) as error:
            self.kill()
            raise VoidboxError(f"{self.card}: the network backend did not start "
                               f"({self.ended(1.0) or error})") from None
        if "error" in reply:
            self.process.wait(EXIT_TIMEOUT)
            error = VoidboxError(_line(reply["error"]))
            status = reply.get("status")
            if type(status) is int and status in ExitStatus._value2member_map_:
                error.exit_status = ExitStatus(status)
            raise error
        backend = reply.get("backend")
        if isinstance(backend, str) and _NAME.fullmatch(backend):
            self.backend_name = backend
        # The process that serves the card: this child, or its sandboxed child.
        pid = reply.get("pid")
        self.serving_pid = pid if type(pid) is int and pid > 0 else self.pid
        sandbox = reply.get("sandbox")  # what voidbox.sandbox applied, or None
        self.sandbox = _line(sandbox) if sandbox is not None else None
        self._ready = True

    def ended(self, within: float = 0.0) -> str | None:
        """How the child ended ('exited with status 1', 'was killed by SIGSYS'), waiting
        up to `within` seconds; None while it runs."""
        from subprocess import TimeoutExpired

        try:
            status = self.process.wait(within) if within > 0 else self.process.poll()
        except TimeoutExpired:
            return None
        if status is None:
            return None
        if status < 0:
            try:
                name = signal.Signals(-status).name
            except ValueError:
                name = f"signal {-status}"
            return f"was killed by {name}"
        return f"exited with status {status}"

    def describe_end(self) -> str:
        """One clause for the VMM's link-down line."""
        how = self.ended(1.0)
        return f"the network backend (pid {self.pid}) {how or 'closed the connection'}"

    def finish(self) -> None:
        """After the frontend's side closed: collect the counters and reap the child."""
        with self._lock:
            try:
                doc = _from_child(self.control, EXIT_TIMEOUT)
                if "counters" in doc:
                    self.counters = _counters(doc["counters"])
            except (OSError, ValueError, EOFError):
                pass  # it died first, or said nothing: the last counters it sent stand
            self.control.close()
        if self.ended(EXIT_TIMEOUT) is None:
            self.kill()

    def close(self) -> None:
        """The VM is closing (its frontend, QEMU, has gone): finish, once."""
        if self.control.fileno() >= 0:
            if self.process.poll() is None:
                # Its frontend may never have come (a start that failed later): a SIGTERM
                # ends it either way, and it still sends its counters.
                self.process.terminate()
            self.finish()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def card_counters(self) -> tuple[str, dict]:
        """The card's counters (the device's and the backend's): asked of the child while
        it runs, the last ones it sent once it has ended."""
        with self._lock:
            if self._ready and self.control.fileno() >= 0 and self.process.poll() is None:
                try:
                    _send(self.control, {"get": "counters"})
                    doc = _from_child(self.control, EXIT_TIMEOUT)
                    if "counters" in doc:
                        self.counters = _counters(doc["counters"])
                except (OSError, ValueError, EOFError):
                    pass  # ending: the last counters it sent stand
            return self.backend_name, dict(self.counters)


def spawn(spec, config, listener: socket.socket | None = None) -> BackendProcess:
    """Start the child backend for one card (a NicSpec, backend slirp or tap) of a VmConfig.

    Without `listener` the child gets one end of a socketpair and the VMM keeps the other
    (BackendProcess.frontend_socket); with one (QEMU's case: bound and listening where
    QEMU will connect) the child gets that, and it is closed here. Does not wait for the
    child: call wait_ready() before the first vhost-user request, so its start-up
    overlaps the VMM's own."""
    import copy
    import subprocess  # the VMM's side only: the child's start-up never needs it

    from ..net.config import NatConfig

    kind, tap_name, tap_fd = spec.backend, spec.tap, None
    if kind == "tap":
        from ..net.tap import open_tap
        from ..virtio.net import VIRTIO_NET_HDR_LEN

        try:
            tap_fd, tap_name = open_tap(spec.tap, vnet_hdr=True, vnet_hdr_len=VIRTIO_NET_HDR_LEN,
                                        offloads=0)
        except VoidboxError as error:
            reason = f"tap:{spec.tap} unusable ({error})"
            if config.net_fallback == "fail":
                raise VoidboxError(f"{reason}: --net-fallback is fail") from None
            sys.stderr.write(f"voidbox: {reason}: the guest's card uses the user-mode NAT\n")
            sys.stderr.flush()
            kind = "slirp"
    nat = copy.deepcopy(config.nat) if config.nat is not None else NatConfig()
    nat.guest_mac = ":".join(f"{b:02x}" for b in spec.mac)
    # Read here, where the host's files are: the child may see none of them.
    nat.dns_upstreams = list(nat.upstreams())
    policy = config.policy
    capture = config.pcap if spec.index == 0 else None
    document = {
        "card": f"net{spec.index}",
        "mac": spec.mac.hex(),
        "backend": kind,
        "tap": tap_name,
        "nat": _nat_document(nat),
        "policy": None if policy is None else {
            "allow": list(policy.allow), "deny": list(policy.deny),
            "host_loopback": policy.host_loopback, "host_addrs": list(policy.host_addrs)},
        "pcap": None if capture is None else {"path": capture.path, "max_bytes": capture.max_bytes},
        "sandbox": bool(getattr(config, "net_sandbox", True)),
    }
    front = None
    if listener is None:
        front, vhost_user = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        vhost_user = listener
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [vhost_user.fileno()] + ([tap_fd] if tap_fd is not None else [])
    try:
        argv, env = child_command(theirs.fileno())
        process = subprocess.Popen(
            argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # Its own session: the terminal's Ctrl-C is the VMM's to act on.
            start_new_session=True, env=env)
        _send(ours, document, fds)
    except OSError as error:
        ours.close()
        if front is not None:
            front.close()
        raise VoidboxError(f"net{spec.index}: cannot start the network backend: {error}") from None
    finally:
        theirs.close()
        vhost_user.close()
        if tap_fd is not None:
            os.close(tap_fd)
    child = BackendProcess(process, ours, f"net{spec.index}")
    child.frontend_socket = front
    return child


def child_command(control_fd: int) -> tuple[list[str], dict]:
    """The child's command line and environment.

    -S: no site (PYTHONPATH finds this voidbox, which needs nothing else): its .pth hooks
    are not the child's to run, and they cost ~15 ms of its start-up. -c rather than -m:
    runpy and what it imports cost another ~6 ms. -P: -c would put the working directory
    first on sys.path, so a `voidbox` directory there (anyone's, in /tmp) would be what
    the child imports and runs.
    """
    return ([sys.executable, "-S", "-P", "-c", CHILD_MAIN, "net", "serve", "--vmm-fd",
             str(control_fd)], _child_environment())


def _child_environment() -> dict:
    """The child imports this very voidbox, wherever it was imported from."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _nat_document(nat) -> dict:
    doc = {name: getattr(nat, name) for name in _field_names(type(nat))}
    doc["forwards"] = [[f.proto, f.host_addr, f.host_port, f.guest_port] for f in nat.forwards]
    doc["dns_upstreams"] = [list(u) for u in nat.dns_upstreams]
    return doc


def _nat_from_document(doc: dict):
    from ..net.config import Forward, NatConfig

    known = set(_field_names(NatConfig))
    values = {k: v for k, v in doc.items() if k in known}
    values["forwards"] = [Forward(str(p), str(a), int(hp), int(gp))
                          for p, a, hp, gp in doc.get("forwards", [])]
    values["dns_upstreams"] = [(str(a), int(port)) for a, port in doc.get("dns_upstreams", [])]
    return NatConfig(**values)


def _field_names(cls) -> list[str]:
    return [entry[0] for entry in cls.__record_fields__]


# ---- the wire between them: a length, JSON, and file descriptors --------------------------

# What the child says is checked as another program's would be: once it has served a guest
# it may be that guest's (the sandbox is what holds it), so nothing it sends may reach the
# VMM's terminal or state unchecked.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_COUNTERS = 1024


def _from_child(sock: socket.socket, timeout: float) -> dict:
    """One document from the child; descriptors it should not have sent are closed."""
    document, fds = _receive(sock, timeout)
    for fd in fds:
        os.close(fd)
    return document


def _line(text) -> str:
    """One printable line of at most 300 characters."""
    text = str(text)
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


def _counters(raw) -> dict:
    """The child's counters: names as identifiers, numbers as numbers, a bounded many."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for key, value in raw.items():
        if len(out) >= MAX_COUNTERS:
            break
        if _NAME.fullmatch(key) and type(value) in (int, float):
            out[key] = value
    return out

def _send(sock: socket.socket, document: dict, fds=()) -> None:
    data = json.dumps(document).encode()
    payload = _LENGTH.pack(len(data)) + data
    sent = socket.send_fds(sock, [payload], list(fds))
    if sent < len(payload):
        sock.sendall(payload[sent:])


def _receive(sock: socket.socket, timeout: float | None) -> tuple[dict, list[int]]:
    """One document and the fds that came with it; EOFError if the peer closed first."""
    sock.settimeout(timeout)
    # Exactly one document: never a byte of the next one.
    data, fds, _flags, _addr = socket.recv_fds(sock, _LENGTH.size, MAX_FDS)
    try:
        if not data:
            raise EOFError("closed")
        while len(data) < _LENGTH.size:
            data += _recv_some(sock, _LENGTH.size - len(data))
        (length,) = _LENGTH.unpack(data)
        if length > MAX_DOCUMENT:
            raise ValueError(f"a {length}-byte document")
        body = bytearray()
        while len(body) < length:
            body += _recv_some(sock, min(length - len(body), 1 << 20))
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return document, fds


def _recv_some(sock: socket.socket, n: int) -> bytes:
    chunk = sock.recv(n)
    if not chunk:
        raise EOFError("closed")
    return chunk


# ---- the child's side -------------------------------------------------------------------

def main(control_fd: int) -> None:
    """The child's entry point: serve, then exit without the interpreter's teardown
    (everything was closed explicitly; the VMM waits for this exit)."""
    status = serve_for_vmm(control_fd)
    sys.stderr.flush()
    os._exit(status)


def serve_for_vmm(control_fd: int) -> int:
    """`voidbox net serve --vmm-fd N`: serve the card the VMM describes on its control socket."""
    from ..net.netns import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)
    control = socket.socket(fileno=control_fd)
    try:
        document, fds = _receive(control, READY_TIMEOUT)
    except (OSError, ValueError, EOFError) as error:
        sys.stderr.write(f"voidbox: net serve --vmm-fd: no configuration from the VMM: {error}\n")
        return int(ExitStatus.USAGE)
    try:
        return _serve(control, document, fds)
    except VoidboxError as error:
        _tell(control, {"error": str(error), "status": int(error.exit_status)})
        return int(error.exit_status)


def _tell(control: socket.socket, document: dict) -> None:
    try:
        control.settimeout(EXIT_TIMEOUT)
        _send(control, document)
    except OSError:
        pass  # the VMM is gone: nobody to tell


def _serve(control: socket.socket, document: dict, fds: list[int]) -> int:
    import select
    from types import SimpleNamespace

    from ..cards import card_counters, open_nic
    from ..eventloop import EventLoop
    from ..net.policy import Policy
    from .backend import VhostUserServer
    from .serve import log_to_stderr

    if len(fds) != (2 if document.get("backend") == "tap" else 1):
        for fd in fds:
            os.close(fd)
        raise VoidboxError("net serve --vmm-fd: the VMM sent the wrong descriptors")
    card = str(document.get("card", "net0"))
    vhost_user = socket.socket(fileno=fds[0])
    nat = _nat_from_document(document["nat"])
    rules = document.get("policy")
    policy = None if rules is None else Policy(
        tuple(rules["allow"]), tuple(rules["deny"]), bool(rules["host_loopback"]),
        tuple(rules["host_addrs"]))
    capture = None
    if document.get("pcap"):
        from ..net.pcap import PcapSpec

        capture = PcapSpec(document["pcap"]["path"], int(document["pcap"]["max_bytes"]))
    import logging

    log_to_stderr(logging.WARNING)  # its frontend's end is the VM's: nothing to say
    loop = EventLoop()
    wanted = SimpleNamespace(nat=nat, policy=policy, net_fallback="fail", pcap=capture)
    spec = SimpleNamespace(backend=document["backend"], tap=document.get("tap"),
                           mac=bytes.fromhex(document["mac"]), index=0,
                           tap_fd=fds[1] if len(fds) > 1 else None)
    device = open_nic(spec, wanted, loop, loop.call_soon)
    backend = device.backend

    def frontend_gone() -> None:
        # One frontend only: its guest's flows end with it, and so does this process.
        drop = getattr(backend, "drop_flows", None)
        if drop is not None:
            drop()
        loop.stop()

    server = VhostUserServer(device, f"{card} backend", loop, on_disconnect=frontend_gone)
    server.start_on(vhost_user)
    def counters() -> dict:
        out = card_counters([device])[0]
        out.pop("card", None)
        out.pop("backend", None)
        return out

    def asked(_events: int) -> None:
        # The VMM asks for the counters; its going away (even SIGKILLed) hangs up.
        try:
            request, fds = _receive(control, EXIT_TIMEOUT)
        except (OSError, ValueError, EOFError):
            loop.stop()
            return
        for fd in fds:
            os.close(fd)
        if request.get("get") == "counters":
            _tell(control, {"counters": counters()})

    loop.watch(control.fileno(), select.EPOLLIN | select.EPOLLRDHUP, asked)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: loop.stop())
    ready = {"ready": True, "backend": type(backend).__name__, "pid": os.getpid(), "sandbox": None}
    if document.get("sandbox", True):
        # Everything is open and read: from here on the process that parses the guest's
        # frames has no files, no capabilities and a seccomp allow-list. This process
        # stays behind as its waiter (the VMM's child), the sandboxed one is its child.
        from .. import sandbox as sandboxing

        engine = getattr(backend, "engine", None)
        if engine is not None:
            engine.prepare_sandbox()
        applied = sandboxing.enter(sandboxing.Plan(
            name=f"voidbox-{card}", max_fds=nat.max_flows + sandboxing.FD_MARGIN))
        ready.update(pid=applied.pid, sandbox=applied.summary())
    _tell(control, ready)
    try:
        loop.run()
    finally:
        server.close()
        final = counters()
        device.close()
        loop.close()
    _tell(control, {"counters": final})
    control.close()
    return 0

