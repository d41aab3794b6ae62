"""The vhost-user backend (`net serve`'s) serves a frontend from inside the sandbox.

The server, a VirtioNet on the NAT behind a VhostUserServer, runs in a child that opens
its socket, enters voidbox.sandbox and then serves. The test is the frontend of
tests/unit/test_vhost_user_backend.py (memfd guest memory passed by SCM_RIGHTS, the driver
mock's rings, kick and call eventfds): ARP, then a UDP datagram through the NAT to a host
echo server and back, then a second frontend after the first one left. Every system
call those paths make must be on the allow-list, or the child dies of SIGSYS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

from tests.requires import requires
from tests.unit.netframes import GATEWAY, guest_udp_frame
from tests.unit.test_vhost_user_backend import Frontend, arp_round_trip
from voidbox import sandbox
from voidbox.net.packets import IPPROTO_UDP, parse_ethernet, parse_ipv4, parse_udp

WAIT = 30  # a failure bound, never asserted as a timing
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SERVER = """\
import json, signal, sys
from voidbox import sandbox
from voidbox.eventloop import EventLoop
from voidbox.net.backend import SlirpBackend
from voidbox.net.config import NatConfig
from voidbox.net.policy import Policy
from voidbox.vhost_user.backend import VhostUserServer
from voidbox.virtio.net import VirtioNet

loop = EventLoop()
backend = SlirpBackend(loop, NatConfig(), Policy(host_loopback=True))
device = VirtioNet(backend, bytes.fromhex("525400123456"), schedule=loop.call_soon)
backend.attach(device.receive, device.rx_room, device.stream_port())
server = VhostUserServer(device, sys.argv[1], loop, on_disconnect=backend.drop_flows)
server.start()
backend.engine.prepare_sandbox()
signal.signal(signal.SIGTERM, lambda *_: loop.stop())
applied = sandbox.enter(sandbox.Plan(name="vb-vhost-test", max_fds=64))
print(json.dumps({"pid": applied.pid, "seccomp": applied.seccomp}), flush=True)
loop.run()
# VhostUserServer.close() would unlink the socket's path: a file the sandbox no longer
# sees (and unlink is not on the list). Its creator outside removes it.
device.close()
print("stopped", flush=True)
"""


class RemoteRig:
    """The Frontend's view of a server in another process: pumping is waiting."""

    def __init__(self):
        self.loop = SimpleNamespace(run_once=time.sleep)
        self.server = SimpleNamespace(session=True)
        # Frontend.start waits for two live queues: the replies below are the real check.
        self.device = SimpleNamespace(queues=(0, 1))

    def pump(self, until=lambda: False, rounds: int = 50) -> None:
        for _ in range(rounds * 4):
            time.sleep(0.01)
            if until():
                return


def udp_echo_round_trip(front: Frontend, echo: socket.socket) -> None:
    port = echo.getsockname()[1]
    front.transmit(guest_udp_frame(GATEWAY, 40000, port, b"through the sandbox"))
    data, peer = echo.recvfrom(100)
    echo.sendto(data.upper(), peer)
    frames: list[bytes] = []
    front.rig.pump(lambda: frames.extend(front.received()) or frames)
    assert len(frames) == 1
    _eth, packet = parse_ethernet(frames[0])
    ip, payload = parse_ipv4(packet)
    assert ip.proto == IPPROTO_UDP and ip.src == GATEWAY
    hdr, body = parse_udp(ip.src, ip.dst, payload)
    assert (hdr.sport, hdr.dport, bytes(body)) == (port, 40000, b"THROUGH THE SANDBOX")


@requires(all(p.ok for p in sandbox.support()), "the host lacks a piece of the sandbox: "
          + ", ".join(f"{p.name} ({p.detail})" for p in sandbox.support() if not p.ok))
def test_the_vhost_user_backend_serves_from_the_sandbox(tmp_path):
    path = tmp_path / "net.sock"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SERVER), str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT), cwd="/")
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(WAIT)
    try:
        line = child.stdout.readline()
        assert line, child.communicate(timeout=WAIT)[1]
        applied = json.loads(line)
        assert applied["seccomp"] == "kill"
        with open(f"/proc/{applied['pid']}/status") as f:
            assert "Seccomp:\t2" in f.read()
        rig = RemoteRig()
        for _ in range(2):  # the second frontend finds the server as the first left it
            front = Frontend(rig, path)
            front.start()
            arp_round_trip(front)
            udp_echo_round_trip(front, echo)
            front.close()
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=WAIT)
    finally:
        echo.close()
        child.kill()
        child.wait(WAIT)
        path.unlink(missing_ok=True)
    assert child.returncode == 0, (child.returncode, err)
    assert out.splitlines()[-1] == "stopped"
