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
