"""Bytes a command wrote just before it exited still reach the host."""

import hashlib
import socket
import subprocess
import sys
import threading

import pytest

pytestmark = pytest.mark.netns

SIZE = 16 << 20

CLIENT = """
import socket, sys
data = bytes(range(256)) * ({size} // 256)
s = socket.create_connection(("10.0.2.2", {port}))
s.sendall(data)
s.close()  # and exit at once: the namespace's kernel still holds unsent bytes
"""


def test_data_written_just_before_exit_is_delivered():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    digest = hashlib.sha256()
    received = []

    def serve():
        conn, _ = server.accept()
        with conn:
            total = 0
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                total += len(chunk)
            received.append(total)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "voidbox", "net", "run", "--host-loopback", "--", sys.executable, "-c",
             CLIENT.format(size=SIZE, port=port)],
            capture_output=True, text=True, timeout=120,
        )
        thread.join(30)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert received == [SIZE]
    assert digest.hexdigest() == hashlib.sha256(bytes(range(256)) * (SIZE // 256)).hexdigest()


def test_the_drain_rests_between_turns_while_a_flow_stays_open():
    """The command exits with a TCP connection still open (a host listener that never
    accepts): the NAT drains for DRAIN_QUIET, and must wait for events between turns. It
    spun at 100% CPU there: the command's pidfd stays readable after it exits, and its
    level-triggered watch stopped every turn at once (about 4,400 turns a second)."""
    from voidbox.net.config import NatConfig
    from voidbox.net.policy import Policy
    from voidbox.net.run import DRAIN_MAX, run_in_netns

    listener = socket.create_server(("127.0.0.1", 0))  # never accepts: the flow stays open
    port = listener.getsockname()[1]
    stats: dict = {}
    try:
        client = (f"import socket, time; s = socket.create_connection(('10.0.2.2', {port})); "
                  "s.send(b'x'); time.sleep(0.2)")
        rc = run_in_netns([sys.executable, "-c", client], NatConfig(),
                          policy=Policy(host_loopback=True), stats=stats)
    finally:
        listener.close()
    assert rc == 0
    assert stats["active_tcp_flows_at_exit"] == 1  # the drain really had a flow to wait for
    # A turn waits up to 50 ms: at most DRAIN_MAX / 0.05 of them, whatever the machine.
    assert 0 < stats["drain_turns"] <= DRAIN_MAX / 0.05 + 5
    assert stats["flows"] == 0 and stats["watched"] == 0
