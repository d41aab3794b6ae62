"""Host-side TCP and UDP echo server for bench/net_compare.py (stdlib only).

    python3 bench/net/echo_server.py [--bind 127.0.0.1 | --bind ::1] [--max-seconds 1800]

Binds a TCP listener and a UDP socket on ephemeral ports of --bind, prints one JSON line
{"tcp": PORT, "udp": PORT} on stdout, then echoes every byte and datagram back from one
selector loop (no thread or process per connection, so the server adds the same small
cost to every peer). Accepted sockets get TCP_NODELAY: a 1-byte echo must leave at once,
not wait for Nagle's algorithm (RFC 896) to coalesce it. Exits when stdin reaches EOF
(the runner died or closed it) or after --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time

BACKLOG = 512
RECV_BYTES = 65536
MAX_CONNECTIONS = 4096  # the bench opens connections one at a time; anything above is a leak
MAX_PENDING = 1 << 20  # unsent echo bytes kept per connection before it is dropped
POLL_SECONDS = 1.0


def serve(bind: str, max_seconds: float) -> None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((bind, 0))
    listener.listen(BACKLOG)
    listener.setblocking(False)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((bind, 0))
    udp.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(udp, selectors.EVENT_READ, "udp")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    pending: dict[socket.socket, bytearray] = {}
    print(json.dumps({"tcp": listener.getsockname()[1], "udp": udp.getsockname()[1]}), flush=True)

    def drop(conn: socket.socket) -> None:
        sel.unregister(conn)
        pending.pop(conn, None)
        conn.close()

    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        for key, events in sel.select(POLL_SECONDS):
            kind, sock = key.data, key.fileobj
            if kind == "stdin":
                if not sys.stdin.buffer.raw.read(RECV_BYTES):
                    return
            elif kind == "accept":
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                if len(pending) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pending[conn] = bytearray()
                sel.register(conn, selectors.EVENT_READ, "conn")
            elif kind == "udp":
                try:
                    data, peer = udp.recvfrom(RECV_BYTES)
                    udp.sendto(data, peer)
                except (BlockingIOError, ConnectionRefusedError):
                    pass
            else:
                buf = pending[sock]
                if events & selectors.EVENT_READ:
                    try:
                        data = sock.recv(RECV_BYTES)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        drop(sock)
                        continue
                    if data == b"":
                        drop(sock)
                        continue
                    if data:
                        buf += data
                if buf:
                    try:
                        sent = sock.send(buf)
                    except BlockingIOError:
                        sent = 0
                    except OSError:
                        drop(sock)
                        continue
                    del buf[:sent]
                if len(buf) > MAX_PENDING:
                    drop(sock)
                    continue
                # Wait for writability only while echo bytes are queued.
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if buf else 0)
                if want != key.events:
                    sel.modify(sock, want, "conn")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args()
    serve(args.bind, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
