"""Structure-aware mutations of guest Ethernet frames.

Each mutator knows where the Ethernet, IPv4 and TCP/UDP/ICMP headers are (as far as the
frame says) and changes one thing: a bit, a byte at a header offset, a length field, the
IHL, fragment offset and flags, TCP flags or options, an address or port, the frame's
length. `mutate` applies one to four of them, then recomputes the checksums half the time
(so both the checksum checks and what lies behind them are exercised). `refragment` splits
a valid packet into fragments: out of order, duplicated, overlapping or not.
"""

from __future__ import annotations

import random
import struct

from tests.fuzz.frames import PORT_TCP, PORT_UDP, fix_checksums
from voidbox.net.packets import ETH_HLEN, IP_MF, IPPROTO_TCP, IPPROTO_UDP, checksum

_IP = ETH_HLEN
INTERESTING8 = (0x00, 0x01, 0x02, 0x05, 0x0F, 0x10, 0x3F, 0x40, 0x7F, 0x80, 0xFE, 0xFF)
INTERESTING16 = (0, 1, 7, 8, 19, 20, 21, 28, 40, 60, 64, 576, 1480, 1500, 1501, 0x7FFF,
                 0x8000, 0xFFF8, 0xFFFE, 0xFFFF)
ADDRESSES = tuple(bytes(a) for a in (
    (10, 0, 2, 2), (10, 0, 2, 3), (10, 0, 2, 15), (10, 0, 2, 77), (10, 0, 2, 255),
    (10, 0, 2, 0), (127, 0, 0, 1), (127, 1, 2, 3), (0, 0, 0, 0), (255, 255, 255, 255),
    (224, 0, 0, 1), (169, 254, 169, 254), (8, 8, 8, 8), (192, 168, 1, 1),
))
PORTS = (0, 1, 53, 67, 68, 80, 443, 1023, 1024, 33333, 65535, PORT_TCP, PORT_UDP)
MACS = (b"\xff" * 6, b"\x52\x55\x0a\x00\x02\x02", b"\x01\x00\x5e\x00\x00\x01", b"\x00" * 6,
        b"\x52\x54\x00\x12\x34\x56")
ETHERTYPES = (0x0800, 0x0806, 0x86DD, 0x8100, 0x0000, 0xFFFF)


def _layout(buf: bytearray):
    """(ihl, l4 offset, proto) as the frame claims them, or None if it has no IPv4 header."""
    if len(buf) < _IP + 20 or buf[12:14] != b"\x08\x00":
        return None
    ihl = max(20, (buf[_IP] & 0x0F) * 4)
    return ihl, _IP + ihl, buf[_IP + 9]


def _put16(buf: bytearray, at: int, value: int) -> None:
    if at + 2 <= len(buf):
        struct.pack_into("!H", buf, at, value & 0xFFFF)


def bit_flip(rng, buf):
    for _ in range(rng.randint(1, 4)):
        if buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)


def header_byte(rng, buf):
    """An interesting or random value at an offset inside the headers."""
    lay = _layout(buf)
    end = min(len(buf), (lay[1] + 40) if lay else 14 + 28)
    if end:
        buf[rng.randrange(end)] = rng.choice(INTERESTING8) if rng.random() < 0.7 else rng.randrange(256)


def truncate(rng, buf):
    if buf:
        del buf[rng.randrange(len(buf)):]


def extend(rng, buf):
    n = rng.choice((1, 2, 7, 8, 60, rng.randrange(1, 1600)))
    buf += bytes(n) if rng.random() < 0.5 else rng.randbytes(n)


def ip_total_length(rng, buf):
    if _layout(buf):
        n = len(buf) - _IP
        _put16(buf, _IP + 2, rng.choice(INTERESTING16 + (n - 1, n, n + 1, rng.randrange(65536))))


def ihl(rng, buf):
    if _layout(buf):
        buf[_IP] = (buf[_IP] & 0xF0) | rng.randrange(16)
        if rng.random() < 0.3:
            buf[_IP] = (rng.randrange(16) << 4) | (buf[_IP] & 0x0F)


def fragment_field(rng, buf):
    if _layout(buf):
        flags = rng.choice((0, IP_MF, 0x4000, 0x8000, IP_MF | 0x4000))
        offset = rng.choice((0, 1, 2, 4, 0x1FFF, 0x1FFE, rng.randrange(0x2000)))
        _put16(buf, _IP + 6, flags | offset)
        if rng.random() < 0.5:
            _put16(buf, _IP + 4, rng.choice((0, 1, 0x5858, 0xFFFF)))  # identification


def address(rng, buf):
    if _layout(buf):
        at = _IP + (16 if rng.random() < 0.8 else 12)
        buf[at:at + 4] = rng.choice(ADDRESSES) if rng.random() < 0.9 else rng.randbytes(4)


def protocol(rng, buf):
    if _layout(buf):
        buf[_IP + 9] = rng.choice((1, 6, 17, 0, 2, 41, 58, 255))


def port(rng, buf):
    lay = _layout(buf)
    if lay and lay[2] in (IPPROTO_TCP, IPPROTO_UDP):
        _put16(buf, lay[1] + (2 if rng.random() < 0.8 else 0), rng.choice(PORTS))


def l4_length(rng, buf):
    """UDP length, TCP data offset, or ICMP type/code."""
    lay = _layout(buf)
    if not lay:
        return
    _, l4, proto = lay
    if proto == IPPROTO_UDP:
        _put16(buf, l4 + 4, rng.choice(INTERESTING16 + (len(buf) - l4, len(buf) - l4 + 1)))
    elif proto == IPPROTO_TCP and l4 + 13 <= len(buf):
        buf[l4 + 12] = (rng.randrange(16) << 4) | (buf[l4 + 12] & 0x0F)
    elif l4 + 2 <= len(buf):
        buf[l4] = rng.choice((0, 3, 5, 8, 11, 13, 255))
        buf[l4 + 1] = rng.choice((0, 1, 3, 4, 255))


def tcp_flags(rng, buf):
    lay = _layout(buf)
    if lay and lay[2] == IPPROTO_TCP and lay[1] + 14 <= len(buf):
        buf[lay[1] + 13] = rng.choice((0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x01, 0x03,
                                       0x06, 0x3F, 0xFF, 0x00, 0x29, rng.randrange(256)))


def tcp_numbers(rng, buf):
    """Sequence, acknowledgment or window: near the stored value or anywhere."""
    lay = _layout(buf)
    if lay and lay[2] == IPPROTO_TCP and lay[1] + 16 <= len(buf):
        at = lay[1] + rng.choice((4, 8))
        old = struct.unpack_from("!I", buf, at)[0]
        new = rng.choice((old + rng.randint(-3, 3), old + 0x7FFFFFFF, old ^ 0x80000000, 0,
                          0xFFFFFFFF, rng.randrange(1 << 32)))
        struct.pack_into("!I", buf, at, new & 0xFFFFFFFF)
        if rng.random() < 0.3:
            _put16(buf, lay[1] + 14, rng.choice((0, 1, 0xFFFF, rng.randrange(65536))))


def tcp_options(rng, buf):
    """Replace the TCP options with hostile ones (lengths 0, 1, past the header, repeats)."""
    lay = _layout(buf)
    if not (lay and lay[2] == IPPROTO_TCP and lay[1] + 20 <= len(buf)):
        return
    l4 = lay[1]
    opts = bytearray()
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice((0, 1, 2, 3, 4, 5, 8, 30, 254, 255))
        if kind in (0, 1):
            opts.append(kind)
            continue
        length = rng.choice((0, 1, 2, 3, 4, 10, 40, 255, rng.randrange(256)))
        opts += bytes((kind, length)) + rng.randbytes(max(0, min(length, 40) - 2))
    opts = opts[:40]
    opts += b"\x00" * (-len(opts) % 4)
    old_off = (buf[l4 + 12] >> 4) * 4
    old_end = l4 + max(20, min(old_off, len(buf) - l4))
    buf[l4 + 20:old_end] = opts
    buf[l4 + 12] = ((20 + len(opts)) // 4) << 4 | (buf[l4 + 12] & 0x0F)
    if rng.random() < 0.8:  # keep the IPv4 total length in step with the new header
        _put16(buf, _IP + 2, len(buf) - _IP)


def ethernet(rng, buf):
    if len(buf) >= 14:
        if rng.random() < 0.5:
            buf[0:6] = rng.choice(MACS)
        else:
            _put16(buf, 12, rng.choice(ETHERTYPES))


def splice(rng, buf):
    """Copy a run of the frame over another place in it (headers inside payloads)."""
    if len(buf) > 4:
        a, b = rng.randrange(len(buf)), rng.randrange(len(buf))
        n = rng.randrange(1, min(64, len(buf)))
        buf[b:b + n] = buf[a:a + n]


MUTATORS = (bit_flip, header_byte, header_byte, truncate, extend, ip_total_length, ihl,
            fragment_field, address, protocol, port, port, l4_length, tcp_flags, tcp_flags,
            tcp_numbers, tcp_options, ethernet, splice)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    buf = bytearray(frame)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        rng.choice(MUTATORS)(rng, buf)
    out = bytes(buf)
    if rng.random() < 0.5:
        out = fix_checksums(out)
    return out


def refragment(rng: random.Random, frame: bytes) -> list[bytes]:
    """Split an IPv4 frame into fragments (8-byte multiples; shuffled, duplicated or
    overlapping at random). Returns [frame] if it has no parseable IPv4 header."""
    buf = bytearray(frame)
    lay = _layout(buf)
    if lay is None:
        return [frame]
    ihl_bytes, l4, _ = lay
    total = struct.unpack_from("!H", buf, _IP + 2)[0]
    payload = bytes(buf[l4:_IP + total]) if _IP + ihl_bytes <= _IP + total <= len(buf) else bytes(buf[l4:])
    header = bytes(buf[_IP:l4])
    if not payload:
        return [frame]
    pieces = []
    off = 0
    while off < len(payload):
        size = rng.choice((0, 8, 16, 24, 48, 64, 512, 1480)) if rng.random() < 0.9 else rng.randrange(1, 100)
        if rng.random() < 0.15 and off >= 8:
            off -= rng.choice((8, 16))  # overlap the previous piece
            off = max(off, 0)
        chunk = payload[off:off + size]
        last = off + size >= len(payload)
        pieces.append((off, chunk, not last))
        off += max(size, 8)
    if rng.random() < 0.3:
        rng.shuffle(pieces)
    if rng.random() < 0.2 and pieces:
        pieces.append(rng.choice(pieces))  # a duplicate
    out = []
    for offset, chunk, more in pieces:
        hdr = bytearray(header)
        struct.pack_into("!H", hdr, 2, len(hdr) + len(chunk))
        struct.pack_into("!H", hdr, 6, (IP_MF if more else 0) | ((offset // 8) & 0x1FFF))
        struct.pack_into("!H", hdr, 10, 0)
        struct.pack_into("!H", hdr, 10, checksum(hdr))
        out.append(bytes(buf[:_IP]) + bytes(hdr) + chunk)
    return out
