"""Both ends of the NAT's scale checks (tests/netns/test_scale.py, bench/nat_scale.py).

    serve N                   on the host: accept N connections on 127.0.0.1 (the port is
                              the first line printed), echo each one's byte, close each when
                              its client does; then print a JSON summary and exit
    client HOST PORT N OUT [SYNC]
                              in the namespace: open N connections at once, each sends one
                              byte and reads it back, all held open together; then half-close
                              them all, read each to EOF, close, and write a JSON result to OUT
    limit HOST PORT N OUT     in the namespace: hold N connections (each exchanging a byte),
                              then try one more and time how it fails; write OUT

With SYNC (a directory), the client writes SYNC/ready and waits for SYNC/begin before it
connects, writes SYNC/open once every connection has exchanged its byte and waits for
SYNC/go before closing, so a watcher can measure the NAT before and meanwhile.
Every process ends by SIGALRM after TIMEOUT seconds; sockets time out after IO_TIMEOUT.
"""

import errno
import json
import os
import selectors
import signal
import socket
import sys
import time

TIMEOUT = int(os.environ.get("SCALE_TIMEOUT", "600"))
IO_TIMEOUT = 60
CONNECT_WINDOW = 256  # connections being set up at once: the rest wait their turn
GO_POLL_S = 0.05


def raise_fd_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(n):
    n = int(n)
    raise_fd_limit()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    ls.setblocking(False)
    print(ls.getsockname()[1], flush=True)
    sel = selectors.EpollSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    accepted = echoed = closed = 0
    while closed < n:
        for key, _ in sel.select(IO_TIMEOUT):
            if key.data is None:
                while accepted < n:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    accepted += 1
                    sel.register(c, selectors.EVENT_READ, "conn")
                continue
            c = key.fileobj
            try:
                data = c.recv(16)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                c.send(data)
                echoed += len(data)
                continue
            sel.unregister(c)
            c.close()
            closed += 1
    print(json.dumps({"accepted": accepted, "echoed": echoed, "closed": closed}), flush=True)


def open_all(addr, n, sel):
    """n connections, each having sent one byte and read it back; (socks, failures)."""
    socks, failures = [], []
    todo, busy = n, 0
    done = 0
    while done + len(failures) < n:
        while todo and busy < CONNECT_WINDOW:
            s = socket.socket()
            s.setblocking(False)
            err = s.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                failures.append(os.strerror(err))
                s.close()
                todo -= 1
                continue
            sel.register(s, selectors.EVENT_WRITE, "connecting")
            todo -= 1
            busy += 1
        events = sel.select(IO_TIMEOUT)
        if not events:
            failures.append("timed out")
            break
        for key, _ in events:
            s = key.fileobj
            if key.data == "connecting":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    failures.append(os.strerror(err))
                    sel.unregister(s)
                    s.close()
                    busy -= 1
                    continue
                s.send(b"x")
                sel.modify(s, selectors.EVENT_READ, "echo")
            else:
                got = s.recv(1)
                sel.unregister(s)
                busy -= 1
                if got == b"x":
                    socks.append(s)
                    done += 1
                else:
                    failures.append(f"echo {got!r}")
                    s.close()
    return socks, failures


def close_all(socks, sel):
    """Half-close every connection and read each to EOF (the server closes on ours)."""
    for s in socks:
        s.shutdown(socket.SHUT_WR)
        sel.register(s, selectors.EVENT_READ)
    left, eof = len(socks), 0
    while left:
        events = sel.select(IO_TIMEOUT)
        if not events:
            break
        for key, _ in events:
            s = key.fileobj
            try:
                data = s.recv(16)
            except OSError:
                data = None
            if data:
                continue
            eof += data == b""
            sel.unregister(s)
            s.close()
            left -= 1
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return eof


def handshake(sync, say, wait_for, res):
    with open(os.path.join(sync, say + ".tmp"), "w") as f:
        json.dump(res, f)
    os.rename(os.path.join(sync, say + ".tmp"), os.path.join(sync, say))
    while not os.path.exists(os.path.join(sync, wait_for)):
        time.sleep(GO_POLL_S)


def client(host, port, n, out, sync=None):
    raise_fd_limit()
    addr, n = (host, int(port)), int(n)
    sel = selectors.EpollSelector()
    if sync:
        handshake(sync, "ready", "begin", {})
    t0 = time.monotonic()
    socks, failures = open_all(addr, n, sel)
    res = {"open": len(socks), "failures": failures[:10], "failed": len(failures),
           "open_seconds": time.monotonic() - t0}
    if sync:
        handshake(sync, "open", "go", res)
    t1 = time.monotonic()
    res["eof"] = close_all(socks, sel)
    res["close_seconds"] = time.monotonic() - t1
    res["seconds"] = time.monotonic() - t0
    with open(out, "w") as f:
        json.dump(res, f)


def limit(host, port, n, out):
    raise_fd_limit()
    addr, n = (host, int(port)), int(n)
    sel = selectors.EpollSelector()
    socks, failures = open_all(addr, n, sel)
    res = {"open": len(socks), "failures": failures[:10]}
    t = time.monotonic()
    try:
        socket.create_connection(addr, timeout=IO_TIMEOUT).close()
        res["extra"] = "connected"
    except ConnectionRefusedError:
        res["extra"] = "refused"
    except OSError as e:
        res["extra"] = repr(e)
    res["extra_seconds"] = time.monotonic() - t
    res["eof"] = close_all(socks, sel)
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    signal.alarm(TIMEOUT)  # whatever happens, this process ends
    {"serve": serve, "client": client, "limit": limit}[sys.argv[1]](*sys.argv[2:])
