"""A tiny authoritative DNS server for tests: answers A queries (and AAAA, for names whose
table address is an IPv6 one) from a fixed table."""

from __future__ import annotations

import socket
import struct
import threading

TYPE_A = 1
TYPE_AAAA = 28  # RFC 3596
CLASS_IN = 1
FLAG_QR_AA = 0x8400
RCODE_NXDOMAIN = 3


def _qname(msg: bytes, i: int) -> tuple[str, int]:
    labels = []
    while msg[i]:
        n = msg[i]
        labels.append(msg[i + 1 : i + 1 + n].decode())
        i += 1 + n
    return ".".join(labels), i + 1


def answer(query: bytes, table: dict[str, str], pad_answers: int = 0) -> bytes:
    ident, _flags, qd = struct.unpack_from("!HHH", query)
    name, end = _qname(query, 12)
    qtype, _qclass = struct.unpack_from("!HH", query, end)
    question = query[12 : end + 4]
    addr = table.get(name.lower().rstrip("."))
    rtype = TYPE_AAAA if addr is not None and ":" in addr else TYPE_A
    if addr is None or qtype != rtype:
        rcode = 0 if addr is not None else RCODE_NXDOMAIN
        return struct.pack("!HHHHHH", ident, FLAG_QR_AA | rcode, 1, 0, 0, 0) + question
    count = 1 + pad_answers
    if rtype == TYPE_AAAA:
        rdata = socket.inet_pton(socket.AF_INET6, addr)
    else:
        rdata = socket.inet_aton(addr)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", rtype, CLASS_IN, 60, len(rdata)) + rdata
    return struct.pack("!HHHHHH", ident, FLAG_QR_AA, 1, count, 0, 0) + question + rr * count


class DnsServer:
    """Serves table over UDP on 127.0.0.1 (or bind, e.g. ::1; an ephemeral port) in a
    thread."""

    def __init__(self, table: dict[str, str], pad_answers: int = 0, bind: str = "127.0.0.1"):
        self.table = table
        self.pad_answers = pad_answers
        self.sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.bind((bind, 0))
        self.addr = self.sock.getsockname()[:2]
        self.queries = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            self.queries += 1
            try:
                self.sock.sendto(answer(data, self.table, self.pad_answers), peer)
            except (OSError, struct.error, IndexError, UnicodeDecodeError):
                continue

    def close(self) -> None:
        self.sock.close()
