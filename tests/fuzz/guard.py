"""The egress guard: no socket the NAT relays create can reach anything but the test's own
loopback endpoints.

This is the second line of defence behind the fuzzer's Policy. The relay modules
(voidbox.net.tcp_nat, udp, icmp, dns) call `socket.socket(...)` through their module-global
`socket`; `install()` swaps that global, for those modules only, for a copy of the socket
module whose `socket` is GuardedSocket. GuardedSocket checks every destination *before*
the system call:

- connect, connect_ex, sendto, bind: the address must be in 127.0.0.0/8, and for TCP and
  UDP sockets its port must be one the test owns (`allowed_ports`) or 0; ICMP sockets (ping or
  raw) have no ports, so for them loopback is the whole rule;
- send, sendall, sendmsg: only on a socket whose connect passed the check above
  (sendmsg with an address is checked like sendto).

A refused destination raises EgressBlocked (an AssertionError) and nothing is sent.
`unguarded_sockets()` is the check that nothing slipped around the swap: every socket fd
in the process must be one the guard made, one the test made, or one that was already open.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import socket
import types
import weakref

from voidbox.net import dns, icmp, tcp_nat, udp

RELAY_MODULES = (tcp_nat, udp, icmp, dns)
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


class EgressBlocked(AssertionError):
    """The NAT tried to reach something other than the test's own loopback endpoints."""


class Guard:
    def __init__(self, allowed_ports):
        self.allowed_ports = frozenset(allowed_ports)
        self.sockets: weakref.WeakSet = weakref.WeakSet()
        # The latest destinations checked, (proto, ip, port): bounded, a long run makes
        # hundreds of thousands.
        self.attempts: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=1024)
        self.blocked: list[str] = []

    def check(self, sock: socket.socket, address, what: str) -> None:
        if sock.family != socket.AF_INET or not isinstance(address, tuple) or len(address) != 2:
            self._refuse(f"{what} on a non-IPv4 socket or with address {address!r}")
        host, port = address
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            self._refuse(f"{what} to a non-literal address {host!r} (no name lookups)")
        proto = "icmp" if sock.proto == socket.IPPROTO_ICMP or sock.type == socket.SOCK_RAW \
            else "tcp" if sock.type == socket.SOCK_STREAM else "udp"
        self.attempts.append((proto, str(ip), port))
        if ip not in LOOPBACK:
            self._refuse(f"{what} {proto} to {ip}:{port}: not loopback, it would leave the machine")
        # Port 0 is no destination (connect fails or sends nowhere), and a policy rule cannot
        # name it (ports are 1-65535), so the fuzz policy's port-list deny does not cover it.
        if proto != "icmp" and what != "bind" and port and port not in self.allowed_ports:
            self._refuse(f"{what} {proto} to {ip}:{port}: not one of the test's own ports "
                         f"{sorted(self.allowed_ports)}")

    def _refuse(self, message: str):
        self.blocked.append(message)
        raise EgressBlocked(message)

    def socket_class(self):
        guard = self

        class GuardedSocket(socket.socket):
            """socket.socket whose destinations are checked by the Guard before any syscall."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._guard_peer = None
                guard.sockets.add(self)

            def connect(self, address):
                guard.check(self, address, "connect")
                self._guard_peer = address
                return super().connect(address)

            def connect_ex(self, address):
                guard.check(self, address, "connect")
                self._guard_peer = address
                return super().connect_ex(address)

            def bind(self, address):
                guard.check(self, address, "bind")
                return super().bind(address)

            def sendto(self, data, *args):
                guard.check(self, args[-1], "sendto")
                return super().sendto(data, *args)

            def _connected(self, what):
                if self._guard_peer is None:
                    guard._refuse(f"{what} on a socket the guard never saw connected")

            def send(self, data, *args):
                self._connected("send")
                return super().send(data, *args)

            def sendall(self, data, *args):
                self._connected("sendall")
                return super().sendall(data, *args)

            def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
                if address is not None:
                    guard.check(self, address, "sendmsg")
                    return super().sendmsg(buffers, ancdata, flags, address)
                self._connected("sendmsg")
                return super().sendmsg(buffers, ancdata, flags)

        return GuardedSocket

    def install(self, monkeypatch) -> None:
        """Give the relay modules a socket module whose socket class is guarded."""
        shim = types.ModuleType("socket_guarded_for_fuzzing")
        shim.__dict__.update(socket.__dict__)
        shim.socket = self.socket_class()
        for module in RELAY_MODULES:
            assert module.socket is socket, f"{module.__name__} no longer uses the socket module"
            monkeypatch.setattr(module, "socket", shim)

    def live_fds(self) -> set[int]:
        return {s.fileno() for s in list(self.sockets) if s.fileno() >= 0}


def socket_fds() -> set[int]:
    """Every fd of this process that is a socket."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                out.add(int(name))
        except OSError:
            pass  # the listing's own fd, closed by now
    return out


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def unguarded_sockets(guard: Guard, known: set[int]) -> set[int]:
    """Socket fds that neither the guard nor the test (`known`) accounts for."""
    return socket_fds() - guard.live_fds() - known
