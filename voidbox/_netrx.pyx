# cython: language_level=3
"""Host TCP data straight into a virtio-net card's RX buffers: the compiled twin of
voidbox/virtio/_netrx_py.py (read its docstring for the contract).

What this twin adds: one recvmsg(MSG_PEEK) per burst over iovecs that point into guest
memory, at each RX chain's payload (after FRAME_HEADROOM, or FRAME_HEADROOM6 for an IPv6
flow, bytes of headers), so host data
is copied once, by the kernel, from the socket into the guest's buffers. The headers are
built in a small local buffer and scattered into the frame's first chain; without
GUEST_CSUM the TCP checksum is summed over the payload where it landed (with it, the
guest finishes it). The system call and the per-frame loop run without the GIL. Chains of
the pure ring twin take the pure twin's path.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, EMSGSIZE, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from voidbox._ring cimport Chain, Virtqueue, vb_segment
from voidbox.includes.sockio cimport iovec, peek_iov, readv, writev
from voidbox._slirp cimport (
    csum_finish,
    csum_partial,
    pseudo_sum,
    pseudo_sum6,
    write_ipv4_header,
    write_ipv6_header,
    write_tcp_header,
)

from voidbox.virtio._netrx_py import CSUM_START as _CSUM_START
from voidbox.virtio._netrx_py import CSUM_START6 as _CSUM_START6
from voidbox.virtio._netrx_py import FRAME_HEADROOM as _FRAME_HEADROOM
from voidbox.virtio._netrx_py import FRAME_HEADROOM6 as _FRAME_HEADROOM6
from voidbox.virtio._netrx_py import MAX_CHAINS as _MAX_CHAINS
from voidbox.virtio._netrx_py import MAX_GSO_PAYLOAD6 as _MAX_GSO_PAYLOAD6
from voidbox.virtio._netrx_py import STREAM_BLOCKED, STREAM_DRAINED, STREAM_EOF, STREAM_MORE
from voidbox.virtio._netrx_py import RingStream as _PureRingStream
from voidbox.virtio._netrx_py import SO_PEEK_OFF as _SO_PEEK_OFF
from voidbox.virtio._netrx_py import frame_payload_cap
from voidbox.ring import REQUIRE_WRITABLE, QueueError
from voidbox.virtio._netrx_py import readv_into_chains as _pure_readv_into_chains
from voidbox.virtio._netrx_py import writev_from_chain as _pure_writev_from_chain

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    enum:
        FIONREAD

cdef extern from "<sys/socket.h>" nogil:
    int getsockopt(int fd, int level, int name, void *value, unsigned int *length)
    enum:
        SOL_SOCKET

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLRDHUP

cdef extern from "<endian.h>" nogil:
    uint16_t htobe16(uint16_t x)
    uint16_t htole16(uint16_t x)

cdef enum:
    VNET_HDR_LEN = 12
    ETH_HLEN = 14
    IPV4_HLEN = 20
    IPV6_HLEN = 40
    TCP_HLEN = 20
    HEADROOM = VNET_HDR_LEN + ETH_HLEN + IPV4_HLEN + TCP_HLEN
    HEADROOM6 = VNET_HDR_LEN + ETH_HLEN + IPV6_HLEN + TCP_HLEN  # the most headers take
    CSUM_START = ETH_HLEN + IPV4_HLEN
    CSUM_START6 = ETH_HLEN + IPV6_HLEN
    MAX_MSS6 = 65535 - IPV6_HLEN - TCP_HLEN  # packets no longer than IPv4's largest
    TCP_CSUM_OFFSET = 16
    VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
    VIRTIO_NET_HDR_GSO_TCPV4 = 1
    VIRTIO_NET_HDR_GSO_TCPV6 = 4
    TCP_FLAG_ACK = 0x10
    TCP_FLAG_PSH = 0x08
    # Segments one chain may hold; iovecs per burst are bounded by MAX_IOV.
    MAX_IOV = 1024
    CHAINS_CAP = 256

cdef uint64_t SEQ_MASK = 0xFFFFFFFF

assert HEADROOM == _FRAME_HEADROOM and CHAINS_CAP == _MAX_CHAINS and CSUM_START == _CSUM_START
assert HEADROOM6 == _FRAME_HEADROOM6 and CSUM_START6 == _CSUM_START6
assert MAX_MSS6 == _MAX_GSO_PAYLOAD6
cdef int SO_PEEK_OFF_C = _SO_PEEK_OFF
cdef int REQUIRE_WRITABLE_C = REQUIRE_WRITABLE


def unread_beyond_peek(int sockfd):
    """As the pure twin's: SIOCINQ minus SO_PEEK_OFF (at least 0), in two system calls and
    no socket object; an error is the OSError the pure twin's calls raise."""
    cdef int inq = 0, off = 0
    cdef unsigned int size = sizeof(off)
    if ioctl(sockfd, FIONREAD, &inq) < 0 or getsockopt(sockfd, SOL_SOCKET, SO_PEEK_OFF_C,
                                                       &off, &size) < 0:
        raise OSError(errno, os_strerror(errno))
    return max(0, inq - max(off, 0))


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept:
    """a / b rounded up, for a >= 0 and b > 0: the pure twin's -(-a // b). (This module
    is built with cdivision, where // truncates, so the pure twin's idiom would not do.)"""
    return (a + b - 1) // b


cdef object os_strerror(int err):
    import os

    return os.strerror(err)


cdef uint64_t add_piece(uint64_t acc, const uint8_t *p, size_t n, size_t *odd) noexcept nogil:
    """Add p[0:n] to a native-order one's complement sum (RFC 1071 §2) that already covers
    odd[0] (mod 2) bytes: a piece starting at an odd offset is summed byte-swapped."""
    cdef uint64_t s
    if n == 0:
        return acc
    s = csum_partial(p, <Py_ssize_t>n, 0)
    if odd[0] & 1:
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        s = ((s & 0xFF) << 8) | (s >> 8)  # RFC 1071 §2(B): byte order independence
    odd[0] += n
    return acc + s


cdef void scatter(const vb_segment *segs, uint32_t nsegs, size_t offset, const uint8_t *src,
                  size_t n) noexcept nogil:
    """Copy src[0:n] into the segments' bytes from offset on (the caller checked the room)."""
    cdef uint32_t i
    cdef size_t take
    for i in range(nsegs):
        if n == 0:
            return
        if offset >= segs[i].len:
            offset -= segs[i].len
            continue
        take = min(<size_t>segs[i].len - offset, n)
        memcpy(segs[i].host + offset, src, take)  # host: validated for len bytes by the ring
        src += take
        n -= take
        offset = 0


class RingStream(_PureRingStream):
    """A virtio-net card's stream port; see voidbox/virtio/_netrx_py.py."""

    def send_tcp_stream(self, int sockfd, const uint8_t[::1] eth_header,
                        const uint8_t[::1] src_ip, const uint8_t[::1] dst_ip,
                        int src_port, int dst_port, uint64_t seq, uint64_t ack, int window,
                        int mss, Py_ssize_t budget, int ip_id):
        card = self.card
        queue = card._queue(0)
        if queue is None or not isinstance(queue, Virtqueue):
            return _PureRingStream.send_tcp_stream(
                self, sockfd, eth_header, src_ip, dst_ip, src_port, dst_port, seq, ack,
                window, mss, budget, ip_id)
        cdef bint v6 = src_ip.shape[0] == 16 and dst_ip.shape[0] == 16
        if eth_header.shape[0] != ETH_HLEN or not (
                v6 or (src_ip.shape[0] == 4 and dst_ip.shape[0] == 4)):
            raise ValueError("Ethernet header is 14 bytes, IPv4 addresses 4, IPv6 ones 16")
        if not 0 < mss <= (MAX_MSS6 if v6 else 65535 - IPV4_HLEN - TCP_HLEN):
            raise ValueError("mss out of range")
        cdef Py_ssize_t want, unread
        cdef Py_ssize_t headroom = HEADROOM6 if v6 else HEADROOM
        with card._lock:
            if self.paused:
                return 0, 0, 0, STREAM_BLOCKED
            unread = unread_beyond_peek(sockfd)
            want = min(budget, unread)
            if want <= 0:
                return 0, 0, 0, self._empty_status(sockfd)
            offloads = card.rx_offloads()
            gso = offloads.tso6 if v6 else offloads.tso4
            chains, caps, firsts = self._take_planned_c(queue, want, mss,
                                                        frame_payload_cap(mss, gso, v6),
                                                        offloads.merge, headroom)
            if not chains:
                card.counters["rx_starved"] += 1
                return 0, 0, 0, STREAM_BLOCKED
            return self._fill(card, queue, chains, caps, firsts, offloads.csum, gso, v6,
                              sockfd, eth_header, src_ip, dst_ip, src_port, dst_port, seq,
                              ack, window, mss, unread, ip_id)

    def _take_planned_c(self, Virtqueue queue, Py_ssize_t want, Py_ssize_t mss,
                        Py_ssize_t frame_cap, bint merge, Py_ssize_t headroom):
        """The pure twin's _take_planned, with C integers, for a compiled ring's chains
        (the pure twin's path, taken for a pure ring, keeps the pure methods)."""
        cdef list chains = [], caps = [], firsts = []
        cdef Py_ssize_t left = want, room = 0, take, count, typical, index, writable
        cdef list more
        count = ceil_div(want, mss) if frame_cap == mss else 1
        while left > 0 and len(chains) < CHAINS_CAP:
            more = self._take_c(queue, max(1, min(count, CHAINS_CAP - len(chains))), headroom)
            if not more:
                break
            for index in range(len(more)):
                if left <= 0:
                    self._give_back(more[index:])
                    break
                writable = (<Chain>more[index]).writable
                if merge and room > 0:
                    take = min(writable, room)
                    firsts.append(False)
                else:
                    room = min(frame_cap, left)
                    take = min(writable - headroom, room)
                    firsts.append(True)
                chains.append(more[index])
                caps.append(take)
                room -= take
                left -= take
            typical = (<Chain>chains[len(chains) - 1]).writable
            if merge:
                count = ceil_div(left + ceil_div(left, frame_cap) * headroom, typical)
            else:
                count = ceil_div(left, min(typical - headroom, frame_cap))
        return chains, caps, firsts

    def _take_c(self, Virtqueue queue, Py_ssize_t n, Py_ssize_t headroom):
        """The pure twin's _take: n RX chains big enough for headers and a byte (at most a
        ring's worth of too-small ones going back per call)."""
        card = self.card
        held = card._rx_held
        cdef list out = []
        cdef Chain chain
        cdef Py_ssize_t refused = 0
        while len(out) < n:
            if refused >= queue.size:
                card.counters["rx_too_small_burst"] += 1
                queue.enable_notifications()
                break
            if not held:
                try:
                    more = queue.pop(n - len(out), REQUIRE_WRITABLE_C)
                    if not more and queue.enable_notifications():
                        continue  # buffers arrived while we looked
                except QueueError:
                    card.counters["rx_queue_errors"] += 1
                    card.rx_ring_error = True
                    break
                if not more:
                    break
                held.extend(more)
            chain = <Chain>held.popleft()
            if chain.writable <= <uint64_t>headroom:
                queue.push(chain.head, 0)  # too small for a segment: back, unused
                card.counters["rx_buffer_too_small"] += 1
                refused += 1
                continue
            out.append(chain)
        if refused and queue.needs_notification():
            card.interrupt(1, 0)  # the buffers went back unused: the driver refills
        return out

    def _empty_status(self, int sockfd):
        """As the pure twin's, with poll(2) called directly."""
        cdef pollfd p
        p.fd = sockfd
        p.events = POLLRDHUP
        p.revents = 0
        cdef bint hup = poll(&p, 1, 0) > 0
        if unread_beyond_peek(sockfd) > 0:
            return STREAM_MORE
        return STREAM_EOF if hup else STREAM_DRAINED

    def _fill(self, card, queue, list chains, list plan_caps, list plan_firsts, bint csum,
              bint gso, bint v6, int sockfd, const uint8_t[::1] eth,
              const uint8_t[::1] src_ip, const uint8_t[::1] dst_ip, int src_port,
              int dst_port, uint64_t seq, uint64_t ack, int window, int mss,
              Py_ssize_t unread, int ip_id):
        """Peek into the chains' payload iovecs, then write each frame's headers (IPv4 or,
        with v6, IPv6 ones: only their lengths and the pseudo-header differ)."""
        cdef Py_ssize_t nchains = len(chains)
        cdef Py_ssize_t i, j, k, m
        cdef uint32_t s
        cdef size_t niov = 0, cap, skip, take
        cdef size_t caps[CHAINS_CAP]  # payload each chain's iovecs cover, then holds
        cdef bint first[CHAINS_CAP]  # the chain starts a frame: headers in front
        cdef vb_segment *segs[CHAINS_CAP]  # each chain's segments, for the nogil loop
        cdef uint32_t nsegs[CHAINS_CAP]
        cdef iovec iov[MAX_IOV]
        cdef Chain c
        # Headers in front of each frame's payload, where the TCP header and its checksum
        # start, and the frame's hdr_len for a GSO header.
        cdef size_t iphl = IPV6_HLEN if v6 else IPV4_HLEN
        cdef size_t headroom = VNET_HDR_LEN + ETH_HLEN + iphl + TCP_HLEN
        cdef uint16_t csum_start = <uint16_t>(ETH_HLEN + iphl)
        cdef uint16_t packet_headers = <uint16_t>(ETH_HLEN + iphl + TCP_HLEN)
        for i in range(nchains):
            c = <Chain>chains[i]
            segs[i] = c.segs
            nsegs[i] = c.info.nsegs
            first[i] = plan_firsts[i]
            skip = headroom if first[i] else 0
            cap = min(<size_t>plan_caps[i], <size_t>c.writable - skip)
            caps[i] = cap
            for s in range(c.info.nsegs):
                if cap == 0 or niov >= MAX_IOV:
                    break
                if skip >= c.segs[s].len:
                    skip -= c.segs[s].len
                    continue
                take = min(<size_t>c.segs[s].len - skip, cap)
                iov[niov].iov_base = c.segs[s].host + skip  # host: validated by the ring
                iov[niov].iov_len = take
                niov += 1
                cap -= take
                skip = 0
            caps[i] -= cap  # what the iovecs cover (less if MAX_IOV cut it short)
        cdef ssize_t got
        cdef int err = 0
        with nogil:
            got = peek_iov(sockfd, iov, niov, &err)
        if got <= 0:
            self._give_back(chains)
            if got == 0:
                return 0, 0, 0, STREAM_EOF
            return 0, 0, 0, (STREAM_DRAINED if err == EAGAIN else -err)
        used = []
        cdef size_t done = 0, n, rest, odd
        cdef uint8_t hdr[HEADROOM6]  # room for either family's headers
        cdef uint8_t *t = hdr + VNET_HDR_LEN + ETH_HLEN + iphl
        cdef uint8_t flags
        cdef uint64_t acc
        cdef uint16_t le
        cdef Py_ssize_t frames = 0, merged = 0, gso_frames = 0
        i = 0
        while i < nchains and done < <size_t>got:
            j = i + 1
            while j < nchains and not first[j]:
                j += 1
            # The frame is chains i..j-1; the peek may end inside it: chains i..k-1 hold it.
            rest = <size_t>got - done
            k = i
            while k < j and rest > 0 and caps[k] > 0:
                caps[k] = min(caps[k], rest)
                rest -= caps[k]
                k += 1
            if k == i:
                break
            n = <size_t>got - done - rest
            flags = TCP_FLAG_ACK | (TCP_FLAG_PSH if done + n >= <size_t>got else 0)
            with nogil:
                memset(hdr, 0, VNET_HDR_LEN)
                le = htole16(<uint16_t>(k - i))  # num_buffers (§5.1.6.4)
                memcpy(hdr + 10, &le, 2)
                memcpy(hdr + VNET_HDR_LEN, &eth[0], ETH_HLEN)
                if v6:
                    write_ipv6_header(hdr + VNET_HDR_LEN + ETH_HLEN, <uint16_t>(TCP_HLEN + n),
                                      &src_ip[0], &dst_ip[0])
                else:
                    write_ipv4_header(hdr + VNET_HDR_LEN + ETH_HLEN,
                                      <uint16_t>(IPV4_HLEN + TCP_HLEN + n),
                                      <uint16_t>((ip_id + frames) & 0xFFFF), &src_ip[0],
                                      &dst_ip[0])
                write_tcp_header(t, <uint16_t>src_port, <uint16_t>dst_port,
                                 <uint32_t>((seq + done) & SEQ_MASK),
                                 <uint32_t>(ack & SEQ_MASK), TCP_HLEN, flags,
                                 <uint16_t>window)
                if csum:
                    # GUEST_CSUM: the guest's to finish (see the pure twin's docstring);
                    # the field holds the pseudo-header sum over the whole packet.
                    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM
                    le = htole16(packet_headers)
                    memcpy(hdr + 2, &le, 2)
                    le = htole16(csum_start)
                    memcpy(hdr + 6, &le, 2)
                    le = htole16(TCP_CSUM_OFFSET)
                    memcpy(hdr + 8, &le, 2)
                    if gso and n > <size_t>mss:
                        hdr[1] = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
                        le = htole16(<uint16_t>mss)
                        memcpy(hdr + 4, &le, 2)
                if v6:
                    acc = pseudo_sum6(&src_ip[0], &dst_ip[0], TCP_HLEN + n)
                else:
                    acc = pseudo_sum(&src_ip[0], &dst_ip[0], TCP_HLEN + n)
                if csum:
                    le = htobe16(<uint16_t>~csum_finish(acc))
                else:
                    # The full checksum: header, then the payload where the kernel put
                    # it, piece by piece, chain by chain.
                    odd = 0
                    acc = add_piece(acc, t, TCP_HLEN, &odd)
                    acc = self_sum_payload(segs[i], nsegs[i], headroom, caps[i], acc, &odd)
                    for m in range(i + 1, k):
                        acc = self_sum_payload(segs[m], nsegs[m], 0, caps[m], acc, &odd)
                    le = htobe16(csum_finish(acc))
                memcpy(t + 16, &le, 2)
                scatter(segs[i], nsegs[i], 0, hdr, headroom)
            used.append(((<Chain>chains[i]).head, headroom + caps[i]))
            for m in range(i + 1, k):
                used.append(((<Chain>chains[m]).head, caps[m]))
            merged += k - i > 1
            gso_frames += hdr[1] != 0
            done += n
            frames += 1
            i = k
            if k < j:
                break  # the peek ended inside this frame's chains
        self._give_back(chains[i:])
        queue.push_many(used)
        self._count(frames, got, merged, gso_frames, frames if csum else 0, v6)
        if queue.needs_notification():
            card.interrupt(1, 0)  # the used-buffer kind, for receiveq1
        # Drained once the socket gave all it held: the caller need not ask again.
        return got, got, frames, (STREAM_DRAINED if got >= unread else STREAM_MORE)


cdef uint64_t self_sum_payload(const vb_segment *segs, uint32_t nsegs, size_t offset,
                               size_t n, uint64_t acc, size_t *odd) noexcept nogil:
    """Sum n payload bytes that start offset bytes into the chain's segments."""
    cdef uint32_t i
    cdef size_t take
    for i in range(nsegs):
        if n == 0:
            break
        if offset >= segs[i].len:
            offset -= segs[i].len
            continue
        take = min(<size_t>segs[i].len - offset, n)
        acc = add_piece(acc, segs[i].host + offset, take, odd)
        n -= take
        offset = 0
    return acc


# ---- a TAP's frames straight into RX chains, and TX chains straight to a TAP ---------------

def readv_into_chains(int fd, list chains):
    """As the pure twin's: one read(2) of a frame, but with iovecs over the chains' writable
    segments, so the kernel copies the TAP's frame straight into guest memory. The system
    call runs without the GIL."""
    cdef iovec iov[MAX_IOV]
    cdef size_t caps[CHAINS_CAP]  # bytes of each chain the iovecs cover
    cdef int niov = 0, nchains = len(chains), i, k
    cdef uint32_t s
    cdef ssize_t got
    cdef size_t total = 0, left, take, at
    cdef uint8_t flags = 0, gso_type = 0
    cdef uint8_t nb[2]
    cdef uint8_t overflow[1]
    cdef Chain c
    if nchains > CHAINS_CAP:
        nchains = CHAINS_CAP
    for i in range(nchains):
        if not isinstance(chains[i], Chain):
            return _pure_readv_into_chains(fd, chains)
    for i in range(nchains):
        c = <Chain>chains[i]
        caps[i] = 0
        for s in range(c.info.nsegs):
            if not c.segs[s].writable or c.segs[s].len == 0:
                continue
            if niov == MAX_IOV - 1:  # the last one is the overflow byte's
                break
            iov[niov].iov_base = c.segs[s].host  # validated by the ring
            iov[niov].iov_len = c.segs[s].len
            caps[i] += c.segs[s].len
            niov += 1
        total += caps[i]
    # One byte past the chains: a frame that does not fit reaches it, so a truncated read
    # (the TAP returns what it copied) shows as longer than the chains' room.
    iov[niov].iov_base = overflow
    iov[niov].iov_len = 1
    niov += 1
    with nogil:
        while True:
            got = readv(fd, iov, niov)
            if got >= 0 or errno != EINTR:
                break
    if got < 0:
        return -errno, 0, 0, None
    if <size_t>got > total:
        return got, 0, 0, None
    used = []
    left = got
    for i in range(nchains):
        if left == 0:
            break
        take = min(caps[i], left)
        used.append(((<Chain>chains[i]).head, take))
        left -= take
    # The header's flags and gso_type (bytes 0 and 1), and num_buffers into bytes 10-11
    # (the kernel writes 10 of the 12), wherever the segments cut them.
    nb[0] = len(used) & 0xFF
    nb[1] = (len(used) >> 8) & 0xFF
    at = 0
    for k in range(niov - 1):
        for i in range(<int>iov[k].iov_len):
            if at == 0:
                flags = (<uint8_t *>iov[k].iov_base)[i]
            elif at == 1:
                gso_type = (<uint8_t *>iov[k].iov_base)[i]
            elif at == 10 or at == 11:
                (<uint8_t *>iov[k].iov_base)[i] = nb[at - 10]
            elif at > 11:
                break
            at += 1
        if at > 11 or at >= <size_t>got:
            break
    return got, flags, gso_type, used


def writev_from_chain(int fd, bytes header, chain, Py_ssize_t offset):
    """As the pure twin's: one writev(2) of `header` and the chain's readable bytes from
    `offset`, the iovecs pointing into guest memory (the kernel copies them once)."""
    if not isinstance(chain, Chain):
        return _pure_writev_from_chain(fd, header, chain, offset)
    cdef Chain c = <Chain>chain
    cdef iovec iov[MAX_IOV]
    cdef int niov = 1
    cdef uint32_t s
    cdef size_t skip = offset
    cdef ssize_t put
    iov[0].iov_base = <void *>PyBytes_AS_STRING(header)
    iov[0].iov_len = PyBytes_GET_SIZE(header)
    for s in range(c.info.nsegs):
        if c.segs[s].writable:
            break  # device-readable segments come first (§2.7.4.2)
        if skip >= c.segs[s].len:
            skip -= c.segs[s].len
            continue
        if niov == MAX_IOV:
            return -EMSGSIZE
        iov[niov].iov_base = c.segs[s].host + skip
        iov[niov].iov_len = c.segs[s].len - skip
        skip = 0
        niov += 1
    with nogil:
        while True:
            put = writev(fd, iov, niov)
            if put >= 0 or errno != EINTR:
                break
    return put if put >= 0 else -errno
