"""Pure-Python twin of voidbox/_slirp.pyx: the user-mode NAT's per-packet hot path.

Same functions, same results, same errors as the compiled module; tests run against both.
voidbox.net.fastpath picks one of the two.

- Sequence-number comparisons on uint32 with wraparound (RFC 9293 §3.4: "arithmetic
  modulo 2**32"), valid while the two numbers are less than 2**31 apart.
- The Internet checksum (RFC 1071) and the TCP checksum over the IPv4 pseudo-header
  (RFC 9293 §3.1, "Checksum") or, for 16-byte addresses, the IPv6 one (RFC 8200 §8.1).
- Building a whole IPv4 + TCP packet (RFC 791 §3.1, RFC 9293 §3.1), or IPv6 + TCP
  (RFC 8200 §3), into a caller's buffer.
"""

import struct
import sys

SEQ_MOD = 1 << 32
SEQ_MASK = SEQ_MOD - 1
SEQ_HALF = 1 << 31
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1  # the compiled seq_add takes a long long

IPV4_HEADER_LEN = 20
TCP_HEADER_LEN = 20
TCP_MAX_OPTIONS_LEN = 40
IPPROTO_TCP = 6
IPV4_VERSION_IHL = 0x45  # version 4, header length 5 words (no IP options)
IPV4_FLAG_DF = 0x4000  # RFC 791 §3.1: don't fragment
IPV4_DEFAULT_TTL = 64
IPV4_MAX_TOTAL_LEN = 0xFFFF
IPV6_HEADER_LEN = 40
IPV6_VERSION_BYTE = 0x60  # version 6, traffic class and flow label zero
IPV6_DEFAULT_HOP_LIMIT = 64
IPV6_MAX_PAYLOAD_LEN = 0xFFFF
_IPV6_HDR = struct.Struct("!BBHHBB16s16s")

_LITTLE = sys.byteorder == "little"
_IPV4_HDR = struct.Struct("!BBHHHBBH4s4s")
_TCP_HDR = struct.Struct("!HHIIBBHHH")


def _refuse(*numbers: int) -> None:
    """Raise as the compiled twin's uint32_t arguments do for a number outside 0..2**32-1."""
    for x in numbers:
        if x < 0:
            raise OverflowError("can't convert negative value to uint32_t")
        if x > SEQ_MASK:
            raise OverflowError("value too large to convert to uint32_t")


def seq_lt(a: int, b: int) -> bool:
    """a < b in sequence space (RFC 9293 §3.4)."""
    if not (0 <= a <= SEQ_MASK and 0 <= b <= SEQ_MASK):
        _refuse(a, b)
    return 0 < ((b - a) & SEQ_MASK) < SEQ_HALF


def seq_le(a: int, b: int) -> bool:
    """a <= b in sequence space (RFC 9293 §3.4)."""
    if not (0 <= a <= SEQ_MASK and 0 <= b <= SEQ_MASK):
        _refuse(a, b)
    return ((b - a) & SEQ_MASK) < SEQ_HALF


def seq_gt(a: int, b: int) -> bool:
    """a > b in sequence space (RFC 9293 §3.4)."""
    if not (0 <= a <= SEQ_MASK and 0 <= b <= SEQ_MASK):
        _refuse(a, b)
    return 0 < ((a - b) & SEQ_MASK) < SEQ_HALF


def seq_ge(a: int, b: int) -> bool:
    """a >= b in sequence space (RFC 9293 §3.4)."""
    if not (0 <= a <= SEQ_MASK and 0 <= b <= SEQ_MASK):
        _refuse(a, b)
    return ((a - b) & SEQ_MASK) < SEQ_HALF


def seq_add(a: int, n: int) -> int:
    """a + n modulo 2**32; n is a signed 64-bit distance."""
    if not (0 <= a <= SEQ_MASK and _I64_MIN <= n <= _I64_MAX):
        _refuse(a)
        raise OverflowError("Python int too large to convert to C long")
    return (a + n) & SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """a - b as a signed 32-bit distance (positive when a is after b)."""
    if not (0 <= a <= SEQ_MASK and 0 <= b <= SEQ_MASK):
        _refuse(a, b)
    d = (a - b) & SEQ_MASK
    return d - SEQ_MOD if d >= SEQ_HALF else d


_BYTE_FORMATS = ("B", "@B", "c")  # what the compiled twin's uint8_t[::1] arguments take


def _bytes_view(obj, writable: bool = False) -> memoryview:
    """obj as a one-dimensional, contiguous memoryview of bytes, refused with the exception
    types the compiled twin's typed memoryviews (const uint8_t[::1]) raise."""
    mv = memoryview(obj)
    if writable and mv.readonly:
        raise BufferError("Object is not writable.")
    if not mv.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    if mv.ndim != 1:
        raise ValueError(f"Buffer has wrong number of dimensions (expected 1, got {mv.ndim})")
    if mv.format not in _BYTE_FORMATS:
        raise ValueError(f"Buffer dtype mismatch, expected 'const uint8_t' but got '{mv.format}'")
    return mv if mv.format == "B" else mv.cast("B")


def _sum16(data, acc: int = 0) -> int:
    """Native-order sum of 16-bit words, unfolded (RFC 1071 §2(B): byte order independence)."""
    mv = memoryview(data).cast("B")
    if len(mv) & 1:
        # An odd trailing byte is the high byte of a big-endian word padded with zero.
        mv = memoryview(bytes(mv) + b"\0")
    return acc + sum(mv.cast("H"))


def _fold(acc: int) -> int:
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    if _LITTLE:
        acc = ((acc & 0xFF) << 8) | (acc >> 8)
    return acc


def inet_checksum(data) -> int:
    """The Internet checksum of data (RFC 1071): one's complement of the one's complement sum.

    Over a header that includes its own checksum field the result is 0 when it is valid.
    """
    return ~_fold(_sum16(_bytes_view(data))) & 0xFFFF


def _pseudo_sum(src_ip, dst_ip, length: int) -> int:
    if len(src_ip) == 16 and len(dst_ip) == 16:
        # RFC 8200 §8.1: 32-bit length, three zero octets, next header.
        return _sum16(bytes(src_ip) + bytes(dst_ip) + struct.pack("!IxxxB", length, IPPROTO_TCP))
    if len(src_ip) != 4 or len(dst_ip) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    return _sum16(bytes(src_ip) + bytes(dst_ip) + struct.pack("!BBH", 0, IPPROTO_TCP, length))


def tcp_checksum(src_ip, dst_ip, segment) -> int:
    """TCP checksum over the pseudo-header and segment (RFC 9293 §3.1; RFC 8200 §8.1 for
    16-byte addresses).

    With the segment's checksum field included the result is 0 when the segment is intact.
    """
    src_ip, dst_ip, seg = _bytes_view(src_ip), _bytes_view(dst_ip), _bytes_view(segment)
    if len(src_ip) == 16 and len(dst_ip) == 16:
        if len(seg) > IPV6_MAX_PAYLOAD_LEN:
            raise ValueError("TCP segment longer than an IPv6 packet can carry")
        return ~_fold(_sum16(seg, _pseudo_sum(src_ip, dst_ip, len(seg)))) & 0xFFFF
    if len(src_ip) != 4 or len(dst_ip) != 4:  # checked first, as the compiled twin does
        raise ValueError("IPv4 addresses are 4 bytes, IPv6 ones 16")
    if len(seg) > IPV4_MAX_TOTAL_LEN - IPV4_HEADER_LEN:
        raise ValueError("TCP segment longer than an IPv4 packet can carry")
    return ~_fold(_sum16(seg, _pseudo_sum(src_ip, dst_ip, len(seg)))) & 0xFFFF


ETH_HEADER_LEN = 14
ETHERTYPE_IPV4 = b"\x08\x00"
IPV4_FRAGMENT_BITS = 0x3FFF  # MF and the fragment offset (RFC 791 §3.1)


def _from_guest(f: memoryview, gateway_mac: bytes, guest_mac: bytes, ethertype: bytes) -> bool:
    """An Ethernet header from guest_mac to gateway_mac with this EtherType."""
    return f[0:6] == gateway_mac and f[6:12] == guest_mac and f[12:14] == ethertype


def guest_ipv4_split(frame, gateway_mac: bytes, guest_mac: bytes, guest_ip: bytes):
    """The engine's fast path (voidbox.net.engine.Engine.guest_frame): for an Ethernet
    frame from guest_mac to gateway_mac carrying one whole IPv4 packet from guest_ip (a
    valid header and header checksum, lengths within the frame, not a fragment), return
    (protocol, destination address, payload start, payload end) as offsets in the frame;
    None for anything else, which the engine's full path then parses and counts."""
    f = _bytes_view(frame)
    if (len(f) < ETH_HEADER_LEN + IPV4_HEADER_LEN or len(gateway_mac) != 6
            or len(guest_mac) != 6 or len(guest_ip) != 4):
        return None
    if not _from_guest(f, gateway_mac, guest_mac, ETHERTYPE_IPV4):
        return None
    ip = f[ETH_HEADER_LEN:]
    if ip[0] >> 4 != 4:
        return None
    ihl = (ip[0] & 0x0F) * 4
    total = int.from_bytes(ip[2:4], "big")
    if (ihl < IPV4_HEADER_LEN or total < ihl or total > len(ip)
            or int.from_bytes(ip[6:8], "big") & IPV4_FRAGMENT_BITS
            or ip[12:16] != guest_ip or inet_checksum(ip[:ihl]) != 0):
        return None
    return ip[9], bytes(ip[16:20]), ETH_HEADER_LEN + ihl, ETH_HEADER_LEN + total


ETHERTYPE_IPV6 = b"\x86\xdd"


def guest_ipv6_split(frame, gateway_mac: bytes, guest_mac: bytes, prefix64: bytes):
    """guest_ipv4_split's IPv6 twin: for an Ethernet frame from guest_mac to gateway_mac
    carrying an IPv6 packet with no extension headers, TCP or UDP right after the fixed
    header (RFC 8200 §3), a payload length within the frame (not a jumbogram's 0 before a
    Hop-by-Hop header: that is not TCP or UDP), a source in the guest's /64 (prefix64, its
    first 8 bytes) and a destination that is not multicast, return (next header, source,
    destination, payload start, payload end); None for anything else. Which addresses of
    the /64 are the NAT's own is the caller's check."""
    f = _bytes_view(frame)
    if (len(f) < ETH_HEADER_LEN + IPV6_HEADER_LEN or len(gateway_mac) != 6
            or len(guest_mac) != 6 or len(prefix64) != 8):
        return None
    if not _from_guest(f, gateway_mac, guest_mac, ETHERTYPE_IPV6):
        return None
    ip = f[ETH_HEADER_LEN:]
    plen = int.from_bytes(ip[4:6], "big")
    if (ip[0] >> 4 != 6 or ip[6] not in (IPPROTO_TCP, 17)
            or IPV6_HEADER_LEN + plen > len(ip) or ip[8:16] != prefix64 or ip[24] == 0xFF):
        return None
    return (ip[6], bytes(ip[8:24]), bytes(ip[24:40]), ETH_HEADER_LEN + IPV6_HEADER_LEN,
            ETH_HEADER_LEN + IPV6_HEADER_LEN + plen)


def build_ipv4_tcp(out, src_ip, dst_ip, ip_id: int, src_port: int, dst_port: int, seq: int,
                   ack: int, flags: int, window: int, options, payload) -> int:
    """Write an IPv4 packet carrying one TCP segment into out; return its length.

    The IPv4 header has no options, DF set, TTL 64 and a valid header checksum (RFC 791 §3.1);
    the TCP header carries `options` (already padded to 4 bytes, RFC 9293 §3.1) and a valid
    checksum. Raises ValueError if out is too small or a field is out of range.
    """
    buf = _bytes_view(out, writable=True)
    src_ip, dst_ip = _bytes_view(src_ip), _bytes_view(dst_ip)
    opts = _bytes_view(options)
    data = _bytes_view(payload)
    nopt = len(opts)
    if nopt > TCP_MAX_OPTIONS_LEN or nopt & 3:
        raise ValueError("TCP options must be a multiple of 4 bytes, at most 40")
    if len(src_ip) != 4 or len(dst_ip) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF and 0 <= window <= 0xFFFF):
        raise ValueError("port or window out of range")
    tcp_len = TCP_HEADER_LEN + nopt + len(data)
    total = IPV4_HEADER_LEN + tcp_len
    if total > IPV4_MAX_TOTAL_LEN:
        raise ValueError("packet longer than IPv4 allows")
    if total > len(buf):
        raise ValueError("output buffer too small for the packet")
    _IPV4_HDR.pack_into(buf, 0, IPV4_VERSION_IHL, 0, total, ip_id & 0xFFFF, IPV4_FLAG_DF,
                        IPV4_DEFAULT_TTL, IPPROTO_TCP, 0, bytes(src_ip), bytes(dst_ip))
    struct.pack_into("!H", buf, 10, inet_checksum(buf[:IPV4_HEADER_LEN]))
    t = IPV4_HEADER_LEN
    data_offset = (TCP_HEADER_LEN + nopt) >> 2
    _TCP_HDR.pack_into(buf, t, src_port, dst_port, seq & SEQ_MASK, ack & SEQ_MASK,
                       data_offset << 4, flags & 0xFF, window, 0, 0)
    buf[t + TCP_HEADER_LEN:t + TCP_HEADER_LEN + nopt] = opts
    buf[t + TCP_HEADER_LEN + nopt:total] = data
    struct.pack_into("!H", buf, t + 16, tcp_checksum(src_ip, dst_ip, buf[t:total]))
    return total


def build_ipv6_tcp(out, src_ip, dst_ip, ip_id: int, src_port: int, dst_port: int, seq: int,
                   ack: int, flags: int, window: int, options, payload) -> int:
    """Write an IPv6 packet carrying one TCP segment into out; return its length.

    The IPv6 header has no extension headers, traffic class and flow label zero and hop
    limit 64 (RFC 8200 §3); ip_id is ignored (IPv6 identifies only fragments). The TCP
    header is as build_ipv4_tcp writes it, its checksum over the IPv6 pseudo-header.
    """
    buf = _bytes_view(out, writable=True)
    src_ip, dst_ip = _bytes_view(src_ip), _bytes_view(dst_ip)
    opts = _bytes_view(options)
    data = _bytes_view(payload)
    nopt = len(opts)
    if nopt > TCP_MAX_OPTIONS_LEN or nopt & 3:
        raise ValueError("TCP options must be a multiple of 4 bytes, at most 40")
    if len(src_ip) != 16 or len(dst_ip) != 16:
        raise ValueError("IPv6 addresses are 16 bytes")
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF and 0 <= window <= 0xFFFF):
        raise ValueError("port or window out of range")
    tcp_len = TCP_HEADER_LEN + nopt + len(data)
    total = IPV6_HEADER_LEN + tcp_len
    if tcp_len > IPV6_MAX_PAYLOAD_LEN:
        raise ValueError("packet longer than IPv6 allows")
    if total > len(buf):
        raise ValueError("output buffer too small for the packet")
    _IPV6_HDR.pack_into(buf, 0, IPV6_VERSION_BYTE, 0, 0, tcp_len, IPPROTO_TCP,
                        IPV6_DEFAULT_HOP_LIMIT, bytes(src_ip), bytes(dst_ip))
    t = IPV6_HEADER_LEN
    data_offset = (TCP_HEADER_LEN + nopt) >> 2
    _TCP_HDR.pack_into(buf, t, src_port, dst_port, seq & SEQ_MASK, ack & SEQ_MASK,
                       data_offset << 4, flags & 0xFF, window, 0, 0)
    buf[t + TCP_HEADER_LEN:t + TCP_HEADER_LEN + nopt] = opts
    buf[t + TCP_HEADER_LEN + nopt:total] = data
    struct.pack_into("!H", buf, t + 16, tcp_checksum(src_ip, dst_ip, buf[t:total]))
    return total


# ---------------------------------------------------------------------------------------
# The allocator under a loop turn's batches (twin of _slirp.keep_freed_heap).
# ---------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_heap(trim_threshold: int, mmap_threshold: int) -> bool:
    """See _slirp.keep_freed_heap: mallopt(3) through ctypes; False where the C library
    has no mallopt, or refuses."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return (mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
            and mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1)


# ---------------------------------------------------------------------------------------
# Frame port (twin of _slirp.FramePort): see its docstrings for the contract.
# ---------------------------------------------------------------------------------------

import errno as _errno  # noqa: E402
import os as _os  # noqa: E402
import socket as _socket  # noqa: E402

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
ETH_HLEN = 14
TCP_CSUM_OFFSET = 16
TCP_FLAG_PSH = 0x08
TCP_FLAG_ACK = 0x10
SEG_HEADROOM = ETH_HLEN + IPV4_HEADER_LEN + TCP_HEADER_LEN
STREAM_MAX_FRAMES = 64
MAX_SEG_PAYLOAD = IPV4_MAX_TOTAL_LEN - IPV4_HEADER_LEN - TCP_HEADER_LEN
MAX_SEG_PAYLOAD6 = MAX_SEG_PAYLOAD - (IPV6_HEADER_LEN - IPV4_HEADER_LEN)  # same frame size
TSO_MIN_MSS = 536  # no GSO below the RFC 9293 §3.7.1 default MSS
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_UDP = 17
STREAM_MORE, STREAM_DRAINED, STREAM_EOF, STREAM_BLOCKED = range(4)
UDP_DRAINED, UDP_BUDGET, UDP_PAUSED, UDP_OVERSIZE, UDP_BLOCKED = range(5)
IPV4_UDP_HEADROOM = ETH_HLEN + IPV4_HEADER_LEN + 8  # Ethernet, IPv4 and UDP headers
_VNET_HDR = struct.Struct("<BBHHHH")  # virtio 1.2 §5.1.6 struct virtio_net_hdr


def _rx_checksum_state(data: bytearray, hl: int) -> int:
    """1: no L4 check needed; 0: check it; -1: drop (see _slirp.rx_checksum_state)."""
    if not hl:
        return 0
    flags = data[0]
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        _f, _g, _h, _s, start, off = _VNET_HDR.unpack_from(data)
        frame = memoryview(data)[hl:]
        field = start + off
        if field + 2 > len(frame):
            return -1
        if (len(frame) >= ETH_HLEN + IPV4_HEADER_LEN
                and struct.unpack_from("!H", frame, 12)[0] == ETH_P_IP
                and start == ETH_HLEN + (frame[ETH_HLEN] & 0x0F) * 4):
            return 1
        if (len(frame) >= ETH_HLEN + IPV6_HEADER_LEN
                and struct.unpack_from("!H", frame, 12)[0] == ETH_P_IPV6
                and start == ETH_HLEN + IPV6_HEADER_LEN
                and frame[ETH_HLEN + 6] in (IPPROTO_TCP, IPPROTO_UDP)):
            return 1
        c = inet_checksum(frame[start:])
        struct.pack_into("!H", frame, field, c or 0xFFFF)
        return 0
    return 1 if flags & VIRTIO_NET_HDR_F_DATA_VALID else 0


class FramePort:
    """Batched frame I/O on an fd carrying one Ethernet frame per read/write."""

    def __init__(self, fd: int, vnet_hdr_len: int = 0, max_frame: int = 65550,
                 batch: int = 64, tso: bool = False):
        if vnet_hdr_len not in (0, 10, 12):
            raise ValueError("vnet_hdr_len must be 0, 10 or 12")
        if tso and not vnet_hdr_len:
            raise ValueError("TSO needs the virtio_net_hdr")
        if max_frame < ETH_HLEN or batch < 1:
            raise ValueError("max_frame and batch must be positive")
        self.fd = fd
        self.vnet_hdr_len = vnet_hdr_len
        self.tso = tso
        self.max_frame = max_frame
        self.batch = batch
        self.rx_frames = self.rx_dropped = self.tx_frames = self.rx_oversize = 0
        self.tx_eagain = self.tx_dropped = self.stream_frames = self.stream_bytes = 0
        self.paused = False
        self.read_errno = 0

    def _read_frames(self):
        """Up to `batch` frames read and checked, yielded as (frame, checksum_verified)
        one read at a time, uncounted in rx_frames; dropped ones are counted in
        rx_dropped."""
        hl = self.vnet_hdr_len
        self.read_errno = 0
        for _ in range(self.batch):
            try:
                while True:
                    try:
                        data = _os.read(self.fd, hl + self.max_frame)
                        break
                    except InterruptedError:
                        continue
            except OSError as e:
                self.read_errno = e.errno
                return
            if not data:
                return
            if len(data) < hl + ETH_HLEN:
                self.rx_dropped += 1
                continue
            buf = bytearray(data)
            state = _rx_checksum_state(buf, hl)
            if state < 0:
                self.rx_dropped += 1
                continue
            yield bytes(buf[hl:]), state == 1

    def read_batch(self):
        out = list(self._read_frames())
        self.rx_frames += len(out)
        return out

    def read_each(self, on_frame, oversize: int = 0) -> int:
        """read_batch's frames handed to on_frame(frame, checksum_verified) each as soon
        as it is read, before the next read; frames longer than oversize (if > 0) counted
        in rx_oversize. An exception from on_frame ends the batch (the later frames stay
        unread in the fd)."""
        handed = 0
        for frame, verified in self._read_frames():
            if 0 < oversize < len(frame):
                self.rx_oversize += 1
            self.rx_frames += 1
            handed += 1
            on_frame(frame, verified)
        return handed

    def _writev(self, parts) -> int:
        try:
            _os.writev(self.fd, parts)
        except BlockingIOError:
            self.tx_eagain += 1
            return 0
        except OSError:
            self.tx_dropped += 1
            return -1
        return 1

    def write(self, frame) -> int:
        frame = _bytes_view(frame)
        if len(frame) == 0:
            return -1
        parts = [bytes(self.vnet_hdr_len), frame] if self.vnet_hdr_len else [frame]
        r = self._writev(parts)
        if r == 1:
            self.tx_frames += 1
        return r

    def send_udp4(self, sockfd: int, buf, eth_header, src_ip, dst_ip, src_port: int,
                  dst_port: int, ip_id: int, budget: int, mtu: int):
        """See _slirp.FramePort.send_udp4: datagrams of the connected UDP socket sockfd
        received into buf behind 42 bytes of headers, framed there and written; returns
        (frames written, identifications used, status, n)."""
        from voidbox.net._udp_py import build_ipv4_udp  # _udp_py imports this module

        eth_header, src_ip, dst_ip = _bytes_view(eth_header), _bytes_view(src_ip), _bytes_view(dst_ip)
        if len(eth_header) != ETH_HLEN or len(src_ip) != 4 or len(dst_ip) != 4:
            raise ValueError("Ethernet header is 14 bytes, IPv4 addresses 4")
        view = memoryview(buf)
        if len(view) < IPV4_UDP_HEADROOM:
            raise ValueError("the buffer has no room behind the headers")
        if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF and 0 <= ip_id <= 0xFFFF):
            raise ValueError("ports and the identification are 16-bit numbers")
        if self.paused:
            return 0, 0, UDP_PAUSED, 0
        written = ids = n = 0
        status = UDP_BUDGET
        payload = view[IPV4_UDP_HEADROOM:]
        sock = _socket.socket(fileno=sockfd)
        try:
            for _ in range(budget):
                try:
                    n = sock.recv_into(payload, len(payload), _socket.MSG_DONTWAIT)
                except BlockingIOError:
                    status = UDP_DRAINED
                    break
                except OSError:
                    continue  # the socket's pending error, reported once
                if IPV4_HEADER_LEN + 8 + n > mtu:
                    status = UDP_OVERSIZE
                    break
                view[:ETH_HLEN] = eth_header
                build_ipv4_udp(view, ETH_HLEN, src_ip, dst_ip, (ip_id + ids) & 0xFFFF,
                               src_port, dst_port, n)
                ids += 1
                frame = view[:IPV4_UDP_HEADROOM + n]
                try:
                    _os.writev(self.fd, [bytes(self.vnet_hdr_len), frame]
                               if self.vnet_hdr_len else [frame])
                except BlockingIOError:
                    self.tx_eagain += 1
                    status = UDP_BLOCKED
                    break
                except OSError:
                    self.tx_dropped += 1
                else:
                    written += 1
        finally:
            sock.detach()
        self.tx_frames += written
        return written, ids, status, n

    def send_tcp_stream(self, sockfd: int, eth_header, src_ip, dst_ip, src_port: int,
                        dst_port: int, seq: int, ack: int, window: int, mss: int,
                        budget: int, ip_id: int):
        eth_header, src_ip, dst_ip = _bytes_view(eth_header), _bytes_view(src_ip), _bytes_view(dst_ip)
        v6 = len(src_ip) == 16 and len(dst_ip) == 16
        if len(eth_header) != ETH_HLEN or not (v6 or (len(src_ip) == 4 and len(dst_ip) == 4)):
            raise ValueError("Ethernet header is 14 bytes, IPv4 addresses 4, IPv6 ones 16")
        max_seg = MAX_SEG_PAYLOAD6 if v6 else MAX_SEG_PAYLOAD
        if not (0 < mss <= max_seg) or budget < 0:
            raise ValueError("mss or budget out of range")
        if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF and 0 <= window <= 0xFFFF):
            raise ValueError("port or window out of range")
        if self.paused:
            return 0, 0, 0, STREAM_BLOCKED
        seg_cap = (max_seg // mss) * mss if self.tso and mss >= TSO_MIN_MSS else mss
        want = min(budget, seg_cap * STREAM_MAX_FRAMES)
        if want == 0:
            return 0, 0, 0, STREAM_MORE
        sock = _socket.socket(fileno=sockfd)
        try:
            data = sock.recv(want, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0, 0, 0, STREAM_DRAINED
        except OSError as e:
            return 0, 0, 0, -(e.errno or _errno.EIO)
        finally:
            sock.detach()
        got = len(data)
        if got == 0:
            return 0, 0, 0, STREAM_EOF
        status = STREAM_MORE if got == want else STREAM_DRAINED
        hl = self.vnet_hdr_len
        done = frames = built = 0
        pkt = bytearray(IPV4_MAX_TOTAL_LEN)
        iphl = IPV6_HEADER_LEN if v6 else IPV4_HEADER_LEN
        build = build_ipv6_tcp if v6 else build_ipv4_tcp
        while done < got:
            n = min(seg_cap, got - done)
            flags = TCP_FLAG_ACK | (TCP_FLAG_PSH if done + n >= got else 0)
            length = build(pkt, src_ip, dst_ip, (ip_id + built) & 0xFFFF, src_port,
                                    dst_port, (seq + done) & SEQ_MASK, ack, flags, window, b"",
                                    data[done:done + n])
            parts = []
            if hl:
                # NEEDS_CSUM: the field holds the (uncomplemented) pseudo-header sum.
                gso = n > mss
                gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
                vnet = _VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type if gso else 0,
                                      ETH_HLEN + iphl + TCP_HEADER_LEN if gso else 0,
                                      mss if gso else 0, ETH_HLEN + iphl, TCP_CSUM_OFFSET)
                parts.append(vnet.ljust(hl, b"\0"))
                struct.pack_into("!H", pkt, iphl + TCP_CSUM_OFFSET,
                                 _fold(_pseudo_sum(src_ip, dst_ip, TCP_HEADER_LEN + n)))
            parts += [bytes(eth_header), pkt[:length]]
            r = self._writev(parts)
            if r == 0:
                status = STREAM_BLOCKED
                break
            done += n  # a frame refused for good (r < 0) is lost on the wire
            built += 1
            frames += r > 0
        self.stream_frames += frames
        self.stream_bytes += done
        self.tx_frames += frames
        return done, got, frames, status
