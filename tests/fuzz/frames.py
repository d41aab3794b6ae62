"""Frames for the fuzzer: the seed corpus builders, the corpus file format, and the
in-place rewrites that fit a stored frame to this run (ports, guest port, ACK number).

Corpus files (tests/fuzz/corpus/*.hex) are text: one guest frame per line as hex, a line
starting with `verified ` is delivered with csum_verified=True (an offloaded checksum, as
virtio_net_hdr NEEDS_CSUM/DATA_VALID says), `#` starts a comment. A file is one case: its
frames are sent in order to one engine.

Placeholder ports: a frame's endpoints that are the test's own sockets cannot have fixed
port numbers (tests run in parallel on one machine), so stored frames say PORT_TCP or
PORT_UDP (TCP/UDP destination port to 10.0.2.2) and the replayer rewrites them to the
ports of this run's listener and echo socket, recomputing the checksum if it was valid.
"""

from __future__ import annotations

import os
import struct

from tests.unit.netframes import DNS, GATEWAY, GUEST, GUEST_HW, frame_of
from voidbox.net.dhcp import DHCP_MAGIC
from voidbox.net.fastpath import tcp_checksum
from voidbox.net.packets import (
    ARPOP_REQUEST,
    ETH_BROADCAST,
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    IP_MF,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    build_arp,
    build_ethernet,
    build_icmp,
    build_ipv4,
    build_ipv4_fragments,
    build_udp,
    checksum,
    ones_sum,
    pseudo_header_sum,
)
from voidbox.net.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCPOPT_MSS,
    TCPOPT_NOP,
    TCPOPT_SACK_PERMITTED,
    TCPOPT_TIMESTAMP,
    TCPOPT_WINDOW,
)

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
PORT_TCP = 0xBEEF  # stands for the test's TCP listener on 127.0.0.1
PORT_UDP = 0xBEEE  # stands for the test's UDP echo socket on 127.0.0.1
ZERO4 = b"\x00" * 4
GUEST_PORT = 40000
ISN = 1000
LOOPBACK = bytes([127, 0, 0, 1])
_IP = ETH_HLEN  # where the IPv4 header starts in a frame


# ---------------------------------------------------------------- building

def tcp_segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
                payload: bytes = b"", options: bytes = b"", window: int = 65535,
                partial_csum: bool = False) -> bytes:
    """A TCP segment (RFC 9293 §3.1). partial_csum puts only the pseudo-header sum in the
    checksum field, as a guest offloading its checksum leaves it (virtio NEEDS_CSUM)."""
    options += b"\x00" * (-len(options) % 4)
    off = (20 + len(options)) // 4
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                                off << 4, flags, window, 0, 0) + options + payload)
    if partial_csum:
        csum = pseudo_header_sum(src, dst, IPPROTO_TCP, len(seg))
    else:
        csum = tcp_checksum(src, dst, bytes(seg))
    struct.pack_into("!H", seg, 16, csum)
    return bytes(seg)


def tcp_frame(dport: int, seq: int, ack: int, flags: int, payload: bytes = b"", *,
              dst: bytes = GATEWAY, sport: int = GUEST_PORT, options: bytes = b"",
              partial_csum: bool = False) -> bytes:
    seg = tcp_segment(GUEST, dst, sport, dport, seq, ack, flags, payload, options,
                      partial_csum=partial_csum)
    return frame_of(build_ipv4(GUEST, dst, IPPROTO_TCP, seg))


def udp_frame(dst: bytes, sport: int, dport: int, data: bytes, src: bytes = GUEST) -> bytes:
    return frame_of(build_ipv4(src, dst, IPPROTO_UDP, build_udp(src, dst, sport, dport, data)))


def dns_query(ident: int = 0x1234, name: bytes = b"\x07example\x04test\x00") -> bytes:
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"


def dhcp_message(kind: int, options: bytes = b"") -> bytes:
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x1234ABCD, 0, 0, ZERO4,
                        ZERO4, ZERO4, ZERO4, GUEST_HW.ljust(16, b"\x00"), b"", b"")
    return fixed + DHCP_MAGIC + bytes((53, 1, kind)) + options + b"\xff"


def dhcp_frame(kind: int, options: bytes = b"") -> bytes:
    udp = build_udp(ZERO4, b"\xff" * 4, 68, 67, dhcp_message(kind, options))
    return build_ethernet(ETH_BROADCAST, GUEST_HW, ETH_P_IP,
                          build_ipv4(ZERO4, b"\xff" * 4, IPPROTO_UDP, udp))


def echo_frame(dst: bytes, ident: int, seq: int, data: bytes) -> bytes:
    return frame_of(build_ipv4(GUEST, dst, IPPROTO_ICMP, build_icmp(8, 0, (ident << 16) | seq, data)))


def fragment_frames(dst: bytes, proto: int, payload: bytes, mtu: int, ident: int) -> list[bytes]:
    return [frame_of(p) for p in build_ipv4_fragments(GUEST, dst, proto, payload, mtu, ident=ident)]


def raw_fragment(dst: bytes, proto: int, ident: int, offset: int, more: bool, data: bytes) -> bytes:
    """One IPv4 fragment with any offset (bytes, a multiple of 8) and any length."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(data), ident,
                                (IP_MF if more else 0) | (offset // 8), 64, proto, 0, GUEST, dst))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return frame_of(bytes(hdr) + data)


SYN_OPTIONS = (struct.pack("!BBH", TCPOPT_MSS, 4, 1460) + bytes((TCPOPT_SACK_PERMITTED, 2))
               + struct.pack("!BBII", TCPOPT_TIMESTAMP, 10, 1, 0)
               + bytes((TCPOPT_NOP, TCPOPT_WINDOW, 3, 7)))


def seeds() -> dict[str, list[tuple[bool, bytes]]]:
    """The seed corpus: valid frames for every path through the engine, by file name."""
    plain = {
        "seed-arp-request-gateway": [build_ethernet(ETH_BROADCAST, GUEST_HW, ETH_P_ARP, build_arp(
            ARPOP_REQUEST, GUEST_HW, GUEST, b"\x00" * 6, GATEWAY))],
        "seed-dhcp-discover": [dhcp_frame(1)],
        "seed-dhcp-request": [dhcp_frame(3, bytes((50, 4)) + GUEST + bytes((54, 4)) + GATEWAY)],
        "seed-dns-query-udp": [udp_frame(DNS, 33333, 53, dns_query())],
        "seed-tcp-session-gateway": [
            tcp_frame(PORT_TCP, ISN, 0, SYN, options=SYN_OPTIONS),
            tcp_frame(PORT_TCP, ISN + 1, 0, ACK),  # ack fitted to the SYN-ACK at replay
            tcp_frame(PORT_TCP, ISN + 1, 0, ACK | PSH, b"GET / HTTP/1.0\r\n\r\n"),
            tcp_frame(PORT_TCP, ISN + 19, 0, ACK),
            tcp_frame(PORT_TCP, ISN + 19, 0, ACK | FIN),
            tcp_frame(PORT_TCP, ISN + 20, 0, ACK),
        ],
        "seed-tcp-syn-then-rst": [
            tcp_frame(PORT_TCP, ISN, 0, SYN, options=struct.pack("!BBH", TCPOPT_MSS, 4, 536)),
            tcp_frame(PORT_TCP, ISN + 1, 0, ACK),
            tcp_frame(PORT_TCP, ISN + 1, 0, RST),
        ],
        "seed-tcp-dns-over-tcp": [
            tcp_frame(53, ISN, 0, SYN, dst=DNS),
            tcp_frame(53, ISN + 1, 0, ACK, dst=DNS),
            tcp_frame(53, ISN + 1, 0, ACK | PSH, struct.pack("!H", len(dns_query())) + dns_query(),
                      dst=DNS),
        ],
        "seed-udp-gateway": [udp_frame(GATEWAY, 33334, PORT_UDP, b"hello udp")],
        "seed-icmp-echo-gateway": [echo_frame(GATEWAY, 0x77, 1, b"ping" * 8)],
        "seed-icmp-echo-loopback": [echo_frame(LOOPBACK, 0x78, 1, b"ping" * 8)],
        "seed-fragments-icmp-echo-gateway": fragment_frames(
            GATEWAY, IPPROTO_ICMP, build_icmp(8, 0, (0x79 << 16) | 1, bytes(range(256)) * 12),
            1500, ident=0x4242),
        "seed-fragments-dns-query-udp": fragment_frames(
            DNS, IPPROTO_UDP, build_udp(GUEST, DNS, 33335, 53, dns_query() + b"\x00" * 100),
            68, ident=0x4343),
    }
    cases = {name: [(False, f) for f in frames] for name, frames in plain.items()}
    # Offloaded checksums: only the pseudo-header sum is in the field, and the frontend
    # vouches for the segment (csum_verified=True).
    udp_partial = bytearray(build_udp(GUEST, GATEWAY, 33336, PORT_UDP, b"offloaded"))
    struct.pack_into("!H", udp_partial, 6,
                     pseudo_header_sum(GUEST, GATEWAY, IPPROTO_UDP, len(udp_partial)))
    cases["seed-offload-tcp-partial-csum"] = [
        (True, tcp_frame(PORT_TCP, ISN, 0, SYN, partial_csum=True)),
        (True, tcp_frame(PORT_TCP, ISN + 1, 0, ACK, partial_csum=True)),
        (True, tcp_frame(PORT_TCP, ISN + 1, 0, ACK | PSH, b"x" * 1400, partial_csum=True)),
    ]
    cases["seed-offload-udp-partial-csum"] = [
        (True, frame_of(build_ipv4(GUEST, GATEWAY, IPPROTO_UDP, bytes(udp_partial))))]
    return cases


# ---------------------------------------------------------------- corpus files

def dumps(frames: list[tuple[bool, bytes]], comment: str = "") -> str:
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [("verified " if v else "") + bytes(f).hex() for v, f in frames]
    return "\n".join(lines) + "\n"


def loads(text: str) -> list[tuple[bool, bytes]]:
    frames = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        verified = line.startswith("verified ")
        frames.append((verified, bytes.fromhex(line.removeprefix("verified "))))
    return frames


def corpus_files() -> list[str]:
    return sorted(os.path.join(CORPUS, n) for n in os.listdir(CORPUS) if n.endswith(".hex"))


def load(path: str) -> list[tuple[bool, bytes]]:
    with open(path) as f:
        return loads(f.read())


# ---------------------------------------------------------------- fitting a frame to a run

def _l4(frame: bytearray):
    """(l4 offset, proto, l4 length) of an unfragmented, parseable IPv4 frame, else None."""
    if len(frame) < _IP + 20 or frame[12:14] != b"\x08\x00" or frame[_IP] >> 4 != 4:
        return None
    ihl = (frame[_IP] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, _IP + 2)[0]
    if ihl < 20 or total < ihl or _IP + total > len(frame):
        return None
    if struct.unpack_from("!H", frame, _IP + 6)[0] & (IP_MF | 0x1FFF):
        return None
    proto = frame[_IP + 9]
    need = 20 if proto == IPPROTO_TCP else 8
    if proto not in (IPPROTO_TCP, IPPROTO_UDP) or total - ihl < need:
        return None
    return _IP + ihl, proto, total - ihl


def _l4_sum(frame: bytearray, off: int, proto: int, length: int) -> int:
    src, dst = bytes(frame[_IP + 12:_IP + 16]), bytes(frame[_IP + 16:_IP + 20])
    return ones_sum(frame[off:off + length], pseudo_header_sum(src, dst, proto, length))


def rewrite(frame: bytes, verified: bool, *, ports: dict[int, int] | None = None,
            sport: int | None = None, ack_for=None) -> bytes:
    """The frame with placeholder destination ports replaced (ports: placeholder -> real),
    its source port replaced (sport), and its TCP ACK number set to ack_for(key) when that
    knows the flow; the L4 checksum is recomputed only if it was valid, so a deliberately
    bad checksum stays bad. Frames that do not parse are returned unchanged."""
    buf = bytearray(frame)
    where = _l4(buf)
    if where is None:
        return frame
    off, proto, length = where
    csum_at = off + (16 if proto == IPPROTO_TCP else 6)
    old_csum = struct.unpack_from("!H", buf, csum_at)[0]
    valid = not verified and (proto == IPPROTO_TCP or old_csum) and \
        _l4_sum(buf, off, proto, length) == 0xFFFF
    src_port, dst_port = struct.unpack_from("!HH", buf, off)
    if ports and dst_port in ports and buf[_IP + 16:_IP + 20] == GATEWAY:
        dst_port = ports[dst_port]
    if sport is not None:
        src_port = sport
    struct.pack_into("!HH", buf, off, src_port, dst_port)
    if proto == IPPROTO_TCP and ack_for is not None and buf[off + 13] & ACK:
        ack = ack_for((src_port, bytes(buf[_IP + 16:_IP + 20]), dst_port))
        if ack is not None:
            struct.pack_into("!I", buf, off + 8, ack)
    if valid:
        struct.pack_into("!H", buf, csum_at, 0)
        csum = (~_l4_sum(buf, off, proto, length)) & 0xFFFF
        if proto == IPPROTO_UDP and csum == 0:
            csum = 0xFFFF
        struct.pack_into("!H", buf, csum_at, csum)
    return bytes(buf)


def fix_checksums(frame: bytes) -> bytes:
    """The frame with its IPv4 header checksum and (unfragmented) TCP/UDP/ICMP checksum made
    valid again, as far as its lengths allow; used after a mutation half of the time."""
    buf = bytearray(frame)
    if len(buf) < _IP + 20 or buf[12:14] != b"\x08\x00":
        return frame
    ihl = (buf[_IP] & 0x0F) * 4
    if ihl < 20 or _IP + ihl > len(buf):
        return frame
    struct.pack_into("!H", buf, _IP + 10, 0)
    struct.pack_into("!H", buf, _IP + 10, checksum(buf[_IP:_IP + ihl]))
    total = struct.unpack_from("!H", buf, _IP + 2)[0]
    if total < ihl or _IP + total > len(buf) or \
            struct.unpack_from("!H", buf, _IP + 6)[0] & (IP_MF | 0x1FFF):
        return bytes(buf)
    off, length, proto = _IP + ihl, total - ihl, buf[_IP + 9]
    at = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2}.get(proto)
    if at is None or length < at + 2:
        return bytes(buf)
    struct.pack_into("!H", buf, off + at, 0)
    if proto == IPPROTO_ICMP:
        csum = checksum(buf[off:off + length])
    else:
        csum = (~_l4_sum(buf, off, proto, length)) & 0xFFFF
        if proto == IPPROTO_UDP and csum == 0:
            csum = 0xFFFF
    struct.pack_into("!H", buf, off + at, csum)
    return bytes(buf)


def regression_cases() -> dict[str, tuple[str, list[tuple[bool, bytes]]]]:
    """Issue 8's frame-shaped defects and the fuzzer's findings, by file name:
    (comment, frames)."""
    x = build_icmp(8, 0, (0x5858 << 16) | 1, b"X" * 56)  # 64 bytes: a valid echo request
    e = b"E" * 32
    return {
        "regress-defect10-zero-length-fragment-bypasses-overlap-check": (
            "Issue 8 defect 10: 'E'[0..32), an empty fragment at offset 0, 'X'[0..32), then\n"
            "'X'[32..64) last. The first and third overlap, so the datagram must be discarded;\n"
            "today the empty fragment replaces the first and the all-'X' echo request is\n"
            "delivered (and answered, 10.0.2.2 being local).",
            [(False, raw_fragment(GATEWAY, IPPROTO_ICMP, 0x5858, 0, True, e)),
             (False, raw_fragment(GATEWAY, IPPROTO_ICMP, 0x5858, 0, True, b"")),
             (False, raw_fragment(GATEWAY, IPPROTO_ICMP, 0x5858, 0, True, x[:32])),
             (False, raw_fragment(GATEWAY, IPPROTO_ICMP, 0x5858, 32, False, x[32:]))]),
        "regress-defect3-tcp-syn-to-dns-address-port-80": (
            "Issue 8 defect 3: a SYN to 10.0.2.3:80 must get a RST; today it is relayed to\n"
            "the first DNS upstream's address, port 80.",
            [(False, tcp_frame(80, ISN, 0, SYN, dst=DNS, sport=40003))]),
        "regress-defect11-tcp-syn-to-other-subnet-address": (
            "Issue 8 defect 11: a SYN to 10.0.2.77 (in the guest's subnet, neither gateway nor\n"
            "DNS) must get a RST whatever the policy; today it is relayed to 10.0.2.77.",
            [(False, tcp_frame(80, ISN, 0, SYN, dst=bytes([10, 0, 2, 77]), sport=40011))]),
        "found-icmp-echo-reply-larger-than-mtu-gateway": (
            "Fuzzer finding: a 3000-byte echo request to 10.0.2.2 in MTU-sized fragments is\n"
            "answered with one 3034-byte frame (voidbox/net/icmp.py:113 sends echo_reply\n"
            "unfragmented); it must fit 14 + MTU (1500) bytes per frame, as UDP replies do.",
            [(False, f) for f in fragment_frames(
                GATEWAY, IPPROTO_ICMP, build_icmp(8, 0, (0x5A5A << 16) | 1, b"q" * 2992), 1500,
                ident=0x5A5A)]),
        "found-icmp-echo-reply-larger-than-mtu-loopback": (
            "Fuzzer finding: the same through the ICMP relay (echo to 127.0.0.1): the host's\n"
            "reply goes to the guest as one 3034-byte frame (voidbox/net/icmp.py:258).",
            [(False, f) for f in fragment_frames(
                LOOPBACK, IPPROTO_ICMP, build_icmp(8, 0, (0x5B5B << 16) | 1, b"q" * 2992), 1500,
                ident=0x5B5B)]),
    }


def write_corpus() -> None:
    """Regenerate the seed and regression files (python -m tests.fuzz.frames)."""
    for name, frames in seeds().items():
        with open(os.path.join(CORPUS, name + ".hex"), "w") as f:
            f.write(dumps(frames, f"seed: {name.removeprefix('seed-')}; ports {PORT_TCP:#x}/"
                                  f"{PORT_UDP:#x} to 10.0.2.2 are placeholders"))
    for name, (comment, frames) in regression_cases().items():
        with open(os.path.join(CORPUS, name + ".hex"), "w") as f:
            f.write(dumps(frames, comment))


if __name__ == "__main__":
    write_corpus()
