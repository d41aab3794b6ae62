# cython: language_level=3
"""The NAT's TCP state machine (RFC 9293) in C: the compiled twin of voidbox/net/tcp.py's
TcpCore, whose docstrings are the specification; every method here does what the pure
method of the same name does, on C fields, and is tested against it (test_twin_parity.py).

No Python object is created per segment: a guest segment comes in as a buffer and is
parsed on the stack (Hdr), segments for the guest wait in a fixed array (OutSeg) and are
written by emit() straight into the caller's packet buffer, and the results are action
bits (small ints). Optional values of the pure twin (None) are C flags or INFINITY here.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.math cimport INFINITY, fabs
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from voidbox._slirp cimport seq_ge_c, seq_gt_c, seq_le_c, seq_lt_c, write_ip_tcp

from voidbox.net.tcp import STATES, TcpState

cdef extern from "Python.h":
    object _PyLong_FromByteArray(const unsigned char *b, size_t n, int little_endian,
                                 int is_signed)

# RFC 9293 §3.1 control bits.
cdef enum:
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10

# RFC 9293 §3.2, RFC 7323 §2 option kinds and lengths.
cdef enum:
    TCPOPT_EOL = 0
    TCPOPT_NOP = 1
    TCPOPT_MSS = 2
    TCPOPT_WINDOW = 3
    TCPOLEN_MSS = 4
    TCPOLEN_WINDOW = 3
    TCP_HEADER_LEN = 20
    TCP_DEFAULT_MSS = 536
    TCP_MIN_SND_MSS = 48
    TCP_MAX_WSCALE = 14
    TCP_MAX_WINDOW_FIELD = 0xFFFF
    MAX_RETRIES = 8
    KEEPALIVE_PROBES = 9
    DUPACK_THRESHOLD = 3
    FLOW_KEY_MAX = 36  # two IPv6 addresses and two ports

# Action bits (voidbox/net/tcp.py A_*).
cdef enum:
    A_DELIVER = 0x01
    A_CONSUME = 0x02
    A_REWIND = 0x04
    A_SHUT_WR = 0x08
    A_ABORT = 0x10
    A_CLOSE = 0x20
    A_RST = 0x40
    A_MALFORMED = 0x80

# Indexes into voidbox.net.tcp.STATES (the order of TcpState).
cdef enum:
    CLOSED = 0
    LISTEN = 1
    SYN_SENT = 2
    SYN_RECEIVED = 3
    ESTABLISHED = 4
    FIN_WAIT_1 = 5
    FIN_WAIT_2 = 6
    CLOSE_WAIT = 7
    CLOSING = 8
    LAST_ACK = 9
    TIME_WAIT = 10

cdef double RTO_INITIAL = 1.0
cdef double RTO_MIN = 0.2
cdef double RTO_MAX = 60.0
cdef double RTO_CLOCK_GRANULARITY = 0.001
cdef double TIME_WAIT_S = 2.0
cdef double KEEPALIVE_INTERVAL_S = 75.0

assert STATES[TIME_WAIT] is TcpState.TIME_WAIT and STATES[SYN_SENT] is TcpState.SYN_SENT
cdef dict STATE_INDEX = {s: i for i, s in enumerate(STATES)}


cdef inline uint32_t seq_add_c(uint32_t a, int64_t n) noexcept nogil:
    return <uint32_t>(a + <uint64_t>n)


cdef inline int32_t seq_diff_c(uint32_t a, uint32_t b) noexcept nogil:
    return <int32_t>(a - b)


cdef inline uint32_t get32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef int parse_hdr(const uint8_t *p, Py_ssize_t n, Hdr *h) noexcept nogil:
    cdef Py_ssize_t hlen, i
    cdef uint8_t kind, olen
    if n < TCP_HEADER_LEN:
        return -1
    hlen = (p[12] >> 4) * 4
    if hlen < TCP_HEADER_LEN or hlen > n:
        return -1
    h.seq = get32(p + 4)
    h.ack = get32(p + 8)
    h.flags = p[13]
    h.window = (p[14] << 8) | p[15]
    h.hlen = hlen
    h.plen = n - hlen
    h.mss = 0
    h.wscale = -1
    i = TCP_HEADER_LEN
    while i < hlen:  # every pass advances i by at least 1; every read is below hlen <= n
        kind = p[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= hlen:
            return -1
        olen = p[i + 1]
        if olen < 2 or i + olen > hlen:
            return -1
        if kind == TCPOPT_MSS and olen == TCPOLEN_MSS:
            h.mss = (p[i + 2] << 8) | p[i + 3]
        elif kind == TCPOPT_WINDOW and olen == TCPOLEN_WINDOW:
            h.wscale = p[i + 2]
        i += olen
    return 0


cdef inline object opt_double(double v):
    return None if v == INFINITY else v


cdef inline double from_opt(object v) except? -1.0:
    return INFINITY if v is None else <double>v


def flow_key(src_ip, dst_ip, tcp):
    """The flow table's key for a guest segment (see voidbox.net.tcp.flow_key)."""
    cdef Py_buffer s, d, t
    cdef unsigned char key[FLOW_KEY_MAX]
    cdef Py_ssize_t i, n = 0
    PyObject_GetBuffer(src_ip, &s, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(dst_ip, &d, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(tcp, &t, PyBUF_SIMPLE)
            try:
                if s.len + d.len + 4 > FLOW_KEY_MAX or t.len < 4:
                    raise ValueError("addresses of 4 or 16 bytes and a segment with ports")
                for i in range(s.len):  # bounded by s.len, checked above
                    key[n] = (<const uint8_t *>s.buf)[i]
                    n += 1
                for i in range(d.len):
                    key[n] = (<const uint8_t *>d.buf)[i]
                    n += 1
                for i in range(4):  # t.len >= 4
                    key[n] = (<const uint8_t *>t.buf)[i]
                    n += 1
            finally:
                PyBuffer_Release(&t)
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)
    return _PyLong_FromByteArray(key, n, 0, 0)


cdef class TcpCore:
    """See voidbox.net.tcp.TcpCore."""

    def __init__(self, int port, int guest_port, uint32_t iss, *, int mss, wscale=7,
                 int max_retries=MAX_RETRIES, double rto_initial=RTO_INITIAL,
                 double rto_min=RTO_MIN, double rto_max=RTO_MAX, double time_wait=TIME_WAIT_S,
                 idle_timeout=None, double keepalive_interval=KEEPALIVE_INTERVAL_S,
                 int keepalive_probes=KEEPALIVE_PROBES, handshake_timeout=None,
                 fin_timeout=None):
        self.port = port
        self.guest_port = guest_port
        self.st = CLOSED
        self.iss = iss
        self.snd_una = self.snd_nxt = self.snd_max = iss
        self.snd_wnd = 0
        self.snd_wl1 = self.snd_wl2 = 0
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_wnd = TCP_MAX_WINDOW_FIELD
        self.our_mss = mss
        self.our_ws = -1 if wscale is None else min(<int>wscale, TCP_MAX_WSCALE)
        self.wscale_ok = False
        self.snd_mss = TCP_DEFAULT_MSS
        self.snd_wscale = self.rcv_wscale = 0
        self.synack_sent = False
        self.has_fin = False
        self.fin_received = False
        self.max_retries = max_retries
        self.retries = 0
        self.rto = self.rto_base = rto_initial
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.has_srtt = False
        self.rttvar = 0.0
        self.has_rtt_seq = False
        self.rtt_time = 0.0
        self.rto_dl = INFINITY
        self.time_wait = time_wait
        self.tw_dl = INFINITY
        self.dupacks = 0
        self.recover = iss
        self.retransmits = 0
        self.guest_blocked = False
        self.idle_t = from_opt(idle_timeout)
        self.keepalive_interval = keepalive_interval
        self.keepalive_probes = keepalive_probes
        self.handshake_t = from_opt(handshake_timeout)
        self.fin_t = from_opt(fin_timeout)
        self.born = self.last_heard = 0.0
        self.ka_sent = 0
        self.ka_next = 0.0
        self.expired = False
        self.consume_n = 0
        self.deliver_off = self.deliver_len = 0
        self.has_last_ack = False
        self.ack_due = False
        self.nout = 0
        self.has_data = False
        self.mask = 0

    # ---- the pure twin's optional attributes ------------------------------------------

    @property
    def state(self):
        return STATES[self.st]

    @state.setter
    def state(self, value):
        self.st = STATE_INDEX[value]

    @property
    def our_wscale(self):
        return None if self.our_ws < 0 else self.our_ws

    @property
    def fin_seq(self):
        return self.fin_v if self.has_fin else None

    @property
    def srtt(self):
        return self.srtt_v if self.has_srtt else None

    @property
    def rtt_seq(self):
        return self.rtt_seq_v if self.has_rtt_seq else None

    @property
    def rto_deadline(self):
        return opt_double(self.rto_dl)

    @property
    def tw_deadline(self):
        return opt_double(self.tw_dl)

    @property
    def idle_timeout(self):
        return opt_double(self.idle_t)

    @property
    def handshake_timeout(self):
        return opt_double(self.handshake_t)

    @property
    def fin_timeout(self):
        return opt_double(self.fin_t)

    @property
    def last_ack(self):
        return self.last_ack_v if self.has_last_ack else None

    @last_ack.setter
    def last_ack(self, value):
        self.has_last_ack = value is not None
        if value is not None:
            self.last_ack_v = value

    @property
    def n_out(self):
        return self.nout

    @property
    def deadline(self):
        return opt_double(self.deadline_c())

    @property
    def closed(self):
        return self.st == CLOSED

    # ---- helpers ----------------------------------------------------------------------

    cdef int queue(self, uint32_t seq, uint32_t ack, uint8_t flags, uint16_t window,
                   uint16_t mss, int wscale) except -1:
        cdef OutSeg *o
        if self.nout >= OUT_MAX:
            raise AssertionError("TcpCore output queue overflow: the caller never drained it")
        if flags & RST:
            self.mask |= A_RST
        o = &self.out[self.nout]  # nout < OUT_MAX, checked above
        o.seq = seq
        o.ack = ack
        o.flags = flags
        o.window = window
        o.mss = mss
        o.wscale = wscale
        o.hold = True
        self.nout += 1
        return 0

    cdef void take_syn_options(self, int mss, int wscale) noexcept:
        if not mss:
            mss = TCP_DEFAULT_MSS
        self.snd_mss = max(TCP_MIN_SND_MSS, min(mss, self.our_mss))
        self.wscale_ok = self.our_ws >= 0 and wscale >= 0
        if self.wscale_ok:
            self.snd_wscale = min(wscale, TCP_MAX_WSCALE)
            self.rcv_wscale = self.our_ws
        else:
            self.snd_wscale = self.rcv_wscale = 0

    cdef int syn(self, uint8_t flags, uint32_t seq) except -1:
        cdef int ws = -1
        if self.st == SYN_SENT or self.wscale_ok:
            ws = self.our_ws
        return self.queue(seq, self.rcv_nxt if flags & ACK else 0, flags,
                          <uint16_t>min(self.rcv_wnd, TCP_MAX_WINDOW_FIELD), self.our_mss, ws)

    cdef uint16_t window_field_c(self) noexcept:
        return <uint16_t>min(max(self.rcv_wnd, 0) >> self.rcv_wscale, TCP_MAX_WINDOW_FIELD)

    def window_field(self):
        return self.window_field_c()

    cdef int ack_c(self, bint hold) except -1:
        self.queue(self.snd_nxt, self.rcv_nxt, ACK, self.window_field_c(), 0, -1)
        self.out[self.nout - 1].hold = hold  # queue() just stored entry nout - 1
        return 0

    cdef bint in_flight_any(self) noexcept:
        return self.snd_una != self.snd_max

    cdef int64_t in_flight_c(self) noexcept:
        cdef uint32_t end = self.snd_nxt
        if self.has_fin and seq_gt_c(end, self.fin_v):
            end = self.fin_v
        if self.snd_una == self.iss and (self.st == SYN_SENT or self.st == SYN_RECEIVED):
            return 0
        return max(0, seq_diff_c(end, self.snd_una))

    def in_flight(self):
        return self.in_flight_c()

    cdef bint probe_needed(self) noexcept:
        return (self.snd_wnd == 0 and self.st in (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1,
                                                  CLOSING, LAST_ACK)
                and not self.has_fin and not self.in_flight_any())

    cdef void arm(self, double now, bint restart) noexcept:
        cdef bint pending = (self.st == SYN_SENT or (self.st == SYN_RECEIVED and self.synack_sent)
                             or self.in_flight_any() or self.probe_needed())
        if not pending:
            self.rto_dl = INFINITY
        elif restart or self.rto_dl == INFINITY:
            self.rto_dl = now + self.rto

    cdef void rtt_sample(self, double r) noexcept:
        cdef double rto
        if not self.has_srtt:
            self.has_srtt = True
            self.srtt_v = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * fabs(self.srtt_v - r)
            self.srtt_v = 0.875 * self.srtt_v + 0.125 * r
        rto = self.srtt_v + max(RTO_CLOCK_GRANULARITY, 4 * self.rttvar)
        self.rto = self.rto_base = min(max(rto, self.rto_min), self.rto_max)

    cdef int abort_c(self, bint rst) except -1:
        if rst:
            self.queue(self.snd_nxt, self.rcv_nxt, RST | ACK, 0, 0, -1)
        self.st = CLOSED
        self.rto_dl = self.tw_dl = INFINITY
        self.mask |= A_ABORT
        return self.mask

    cdef int close_c(self) noexcept:
        self.st = CLOSED
        self.rto_dl = self.tw_dl = INFINITY
        self.mask |= A_CLOSE
        return self.mask

    cdef double deadline_c(self) noexcept:
        return min(self.rto_dl, self.tw_dl, self.limit_deadline())

    cdef double limit_deadline(self) noexcept:
        cdef int st = self.st
        cdef double idle
        if st == ESTABLISHED or st == CLOSE_WAIT:
            idle = self.idle_t
        elif st == FIN_WAIT_2:
            idle = self.fin_t
        elif st == SYN_RECEIVED or st == SYN_SENT:
            return self.born + self.handshake_t
        elif st == FIN_WAIT_1 or st == CLOSING or st == LAST_ACK:
            return self.last_heard + self.fin_t
        else:
            return INFINITY
        if idle == INFINITY:
            return INFINITY
        if self.ka_sent:
            return self.ka_next
        return self.last_heard + idle

    cdef int limit_reached(self, double now) except -1:
        cdef int st = self.st
        if ((st == ESTABLISHED or st == CLOSE_WAIT or st == FIN_WAIT_2)
                and self.ka_sent < self.keepalive_probes):
            self.ka_sent += 1
            self.ka_next = now + self.keepalive_interval
            return self.probe()
        self.expired = True
        if st == SYN_RECEIVED and not self.synack_sent:
            return self.refuse()
        return self.abort_c(True)

    # ---- construction -----------------------------------------------------------------

    def open_passive(self, tcp, double now):
        cdef Py_buffer b
        cdef Hdr h
        cdef int bad
        PyObject_GetBuffer(tcp, &b, PyBUF_SIMPLE)
        bad = parse_hdr(<const uint8_t *>b.buf, b.len, &h)
        PyBuffer_Release(&b)
        if bad:
            return A_MALFORMED
        self.born = self.last_heard = now
        self.st = SYN_RECEIVED
        self.irs = h.seq
        self.rcv_nxt = seq_add_c(h.seq, 1)
        self.take_syn_options(h.mss, h.wscale)
        self.snd_wnd = h.window
        self.snd_wl1 = h.seq
        return 0

    def open_active(self, double now):
        self.mask = 0
        self.born = self.last_heard = now
        self.st = SYN_SENT
        self.snd_nxt = self.snd_max = seq_add_c(self.iss, 1)
        self.arm(now, True)
        self.syn(SYN, self.iss)
        return self.mask

    # ---- host events ------------------------------------------------------------------

    def host_connected(self, double now):
        self.mask = 0
        self.consume_n = 0
        if self.st != SYN_RECEIVED or self.synack_sent:
            return 0
        self.synack_sent = True
        self.snd_nxt = self.snd_max = seq_add_c(self.iss, 1)
        self.arm(now, True)
        self.syn(SYN | ACK, self.iss)
        return self.mask

    def host_refused(self):
        self.mask = 0
        self.consume_n = 0
        return self.refuse()

    cdef int refuse(self) except -1:
        self.queue(0, self.rcv_nxt, RST | ACK, 0, 0, -1)
        return self.abort_c(False)

    def host_eof(self, double now):
        self.mask = 0
        self.consume_n = 0
        if self.has_fin or self.st not in (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING,
                                           LAST_ACK):
            return 0
        self.has_fin = True
        self.fin_v = self.snd_nxt
        if self.st == ESTABLISHED:
            self.st = FIN_WAIT_1
        elif self.st == CLOSE_WAIT:
            self.st = LAST_ACK
        self.send_fin(now)
        return self.mask

    cdef int send_fin(self, double now) except -1:
        self.queue(self.fin_v, self.rcv_nxt, FIN | ACK, self.window_field_c(), 0, -1)
        self.snd_nxt = seq_add_c(self.fin_v, 1)
        if seq_gt_c(self.snd_nxt, self.snd_max):
            self.snd_max = self.snd_nxt
        self.arm(now, False)
        return 0

    def host_reset(self):
        self.mask = 0
        self.consume_n = 0
        return self.host_reset_c()

    cdef int host_reset_c(self) except -1:
        if self.st == CLOSED:
            return self.mask
        if self.st == SYN_RECEIVED and not self.synack_sent:
            return self.refuse()
        return self.abort_c(True)

    def window_update(self, double now):
        self.mask = 0
        self.consume_n = 0
        self.guest_blocked = False
        if self.st in (ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2):
            self.ack_c(True)
        return self.mask

    def flush_ack(self):
        cdef bint due = self.ack_due
        self.ack_due = False
        if (not due or self.st == CLOSED
                or (self.has_last_ack and self.last_ack_v == self.rcv_nxt)):
            return 0
        self.ack_c(False)
        return 1

    # ---- host-to-guest data -----------------------------------------------------------

    cdef int64_t send_budget_c(self) noexcept:
        cdef int64_t budget
        if self.st not in (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK):
            return 0
        budget = seq_diff_c(seq_add_c(self.snd_una, self.snd_wnd), self.snd_nxt)
        if self.has_fin:
            budget = min(budget, seq_diff_c(self.fin_v, self.snd_nxt))
        return max(0, budget)

    def send_budget(self):
        return self.send_budget_c()

    def send_data(self, Py_ssize_t n, double now):
        cdef bint new
        cdef uint32_t seq
        self.mask = 0
        self.consume_n = 0
        self.has_data = False
        if n <= 0:
            return 0
        new = self.snd_nxt == self.snd_max
        seq = self.snd_nxt
        self.snd_nxt = seq_add_c(seq, n)
        self.data_fin = self.has_fin and self.snd_nxt == self.fin_v
        if self.data_fin:
            self.snd_nxt = seq_add_c(self.snd_nxt, 1)
        self.has_data = True
        self.data_seq = seq
        self.data_ack = self.rcv_nxt
        self.data_window = self.window_field_c()
        self.data_len = n
        self.data_mss = self.snd_mss
        self.after_send(new, now)
        return 0

    def data_segments(self):
        cdef Py_ssize_t off = 0, length
        cdef int flags
        out = []
        if not self.has_data:
            return out
        self.has_data = False
        while off < self.data_len:
            length = min(<Py_ssize_t>self.data_mss, self.data_len - off)
            flags = ACK
            if off + length >= self.data_len:
                flags |= PSH | (FIN if self.data_fin else 0)
            out.append((seq_add_c(self.data_seq, off), self.data_ack, flags, self.data_window,
                        off, length))
            off += length
        return out

    def emit_data(self, buf, Py_ssize_t off, src_ip, dst_ip, int ip_id, payload, send):
        cdef Py_buffer b, s, d, p
        cdef Py_ssize_t start = 0, length, n
        cdef int flags, count = 0
        if not self.has_data:
            return 0
        self.has_data = False
        PyObject_GetBuffer(buf, &b, PyBUF_WRITABLE)
        try:
            PyObject_GetBuffer(src_ip, &s, PyBUF_SIMPLE)
            try:
                PyObject_GetBuffer(dst_ip, &d, PyBUF_SIMPLE)
                try:
                    PyObject_GetBuffer(payload, &p, PyBUF_SIMPLE)
                    try:
                        if s.len != d.len or (s.len != 4 and s.len != 16):
                            raise ValueError("IPv4 addresses are 4 bytes, IPv6 ones 16")
                        if p.len < self.data_len or off < 0 or off > b.len:
                            raise ValueError("payload or buffer shorter than the run")
                        while start < self.data_len:
                            length = min(<Py_ssize_t>self.data_mss, self.data_len - start)
                            flags = ACK
                            if start + length >= self.data_len:
                                flags |= PSH | (FIN if self.data_fin else 0)
                            # start + length <= data_len <= p.len, checked above.
                            n = write_ip_tcp(<uint8_t *>b.buf + off, b.len - off,
                                             <const uint8_t *>s.buf, <const uint8_t *>d.buf,
                                             s.len, <uint16_t>(ip_id + count), self.port,
                                             self.guest_port,
                                             seq_add_c(self.data_seq, start), self.data_ack,
                                             flags, self.data_window, NULL, 0,
                                             <const uint8_t *>p.buf + start, length)
                            if n < 0:
                                raise ValueError("output buffer too small for the packet")
                            self.has_last_ack = True
                            self.last_ack_v = self.data_ack
                            count += 1
                            send(buf, n)
                            start += length
                    finally:
                        PyBuffer_Release(&p)
                finally:
                    PyBuffer_Release(&d)
            finally:
                PyBuffer_Release(&s)
        finally:
            PyBuffer_Release(&b)
        return count

    cdef void after_send(self, bint new, double now) noexcept:
        if seq_gt_c(self.snd_nxt, self.snd_max):
            self.snd_max = self.snd_nxt
        if new and not self.has_rtt_seq:
            self.has_rtt_seq = True
            self.rtt_seq_v = self.snd_nxt
            self.rtt_time = now
        self.arm(now, False)

    def stream_sent(self, Py_ssize_t n, double now):
        cdef bint new
        if n <= 0:
            return
        new = self.snd_nxt == self.snd_max
        self.snd_nxt = seq_add_c(self.snd_nxt, n)
        self.after_send(new, now)

    # ---- output -----------------------------------------------------------------------

    def out_segments(self):
        cdef int i
        cdef OutSeg *o
        out = []
        for i in range(self.nout):  # nout <= OUT_MAX
            o = &self.out[i]
            if o.flags & ACK:
                self.has_last_ack = True
                self.last_ack_v = o.ack
            out.append((o.seq, o.ack, o.flags, o.window, o.mss if o.mss else None,
                        o.wscale if o.wscale >= 0 else None))
        self.nout = 0
        return out

    cdef bint holds_back(self, const OutSeg *o) noexcept:
        return (o.hold and o.flags == ACK
                and not (self.has_last_ack and o.ack == self.last_ack_v)
                and o.seq == self.snd_nxt)

    def holds_unacked_ack(self):
        cdef int i
        for i in range(self.nout):
            if not self.holds_back(&self.out[i]):
                return True
        return False

    def emit(self, buf, Py_ssize_t off, src_ip, dst_ip, int ip_id, bint clamp, send):
        cdef Py_buffer b, s, d
        cdef int i, k = self.nout, sent = 0
        cdef OutSeg o
        cdef uint8_t opts[8]
        cdef Py_ssize_t nopt, n
        if not k:
            return 0
        self.nout = 0
        PyObject_GetBuffer(buf, &b, PyBUF_WRITABLE)
        try:
            PyObject_GetBuffer(src_ip, &s, PyBUF_SIMPLE)
            try:
                PyObject_GetBuffer(dst_ip, &d, PyBUF_SIMPLE)
                try:
                    if s.len != d.len or (s.len != 4 and s.len != 16):
                        raise ValueError("IPv4 addresses are 4 bytes, IPv6 ones 16")
                    if off < 0 or off > b.len:
                        raise ValueError("offset outside the buffer")
                    for i in range(k):  # k <= OUT_MAX
                        o = self.out[i]
                        if self.holds_back(&o):
                            self.ack_due = True
                            continue
                        if o.flags & ACK:
                            if clamp and seq_gt_c(o.ack, self.rcv_nxt):
                                o.ack = self.rcv_nxt
                            self.has_last_ack = True
                            self.last_ack_v = o.ack
                        nopt = 0
                        if o.flags & SYN:
                            # RFC 9293 §3.2 MSS; NOP first so the 3-byte window scale
                            # ends on a 4-byte boundary (RFC 7323 §2.2).
                            if o.mss:
                                opts[0] = TCPOPT_MSS
                                opts[1] = TCPOLEN_MSS
                                opts[2] = o.mss >> 8
                                opts[3] = o.mss & 0xFF
                                nopt = 4
                            if o.wscale >= 0:
                                opts[nopt] = TCPOPT_NOP
                                opts[nopt + 1] = TCPOPT_WINDOW
                                opts[nopt + 2] = TCPOLEN_WINDOW
                                opts[nopt + 3] = o.wscale
                                nopt += 4
                        n = write_ip_tcp(<uint8_t *>b.buf + off, b.len - off,
                                         <const uint8_t *>s.buf, <const uint8_t *>d.buf,
                                         s.len, <uint16_t>(ip_id + sent), self.port,
                                         self.guest_port, o.seq, o.ack, o.flags, o.window,
                                         opts, nopt, NULL, 0)
                        if n < 0:
                            raise ValueError("output buffer too small for the packet")
                        sent += 1
                        send(buf, n)
                finally:
                    PyBuffer_Release(&d)
            finally:
                PyBuffer_Release(&s)
        finally:
            PyBuffer_Release(&b)
        return sent

    # ---- timers -----------------------------------------------------------------------

    def on_timer(self, double now):
        self.mask = 0
        self.consume_n = 0
        if now >= self.tw_dl:
            return self.close_c()
        if now >= self.limit_deadline():
            self.limit_reached(now)
            if self.st == CLOSED:
                return self.mask
        if now < self.rto_dl:
            return self.mask
        self.retries += 1
        if self.retries > self.max_retries:
            self.snd_nxt = self.snd_una
            return self.abort_c(True)
        self.rto = min(self.rto * 2, self.rto_max)
        self.has_rtt_seq = False
        self.rto_dl = now + self.rto
        if self.st == SYN_SENT:
            self.syn(SYN, self.iss)
        elif self.st == SYN_RECEIVED:
            self.syn(SYN | ACK, self.iss)
        elif self.in_flight_any():
            self.retransmits += 1
            self.snd_nxt = self.snd_una
            self.dupacks = 0
            if self.has_fin and self.snd_una == self.fin_v:
                self.send_fin(now)
            elif self.snd_wnd == 0:
                self.mask |= A_REWIND
                self.probe()
            else:
                self.mask |= A_REWIND
        elif self.probe_needed():
            self.probe()
        else:
            self.rto_dl = INFINITY
        return self.mask

    cdef int probe(self) except -1:
        return self.queue(seq_add_c(self.snd_una, -1), self.rcv_nxt, ACK,
                          self.window_field_c(), 0, -1)

    # ---- guest segments ---------------------------------------------------------------

    def in_order(self, tcp):
        cdef Py_buffer b
        cdef const uint8_t *p
        cdef bint ok = False
        PyObject_GetBuffer(tcp, &b, PyBUF_SIMPLE)
        p = <const uint8_t *>b.buf
        if b.len >= TCP_HEADER_LEN:  # the reads below stop at byte 13
            ok = (not p[13] & (SYN | RST | FIN) and self.st == ESTABLISHED
                  and get32(p + 4) == self.rcv_nxt)
        PyBuffer_Release(&b)
        return ok

    def guest_segment(self, tcp, double now):
        cdef Py_buffer b
        cdef Hdr h
        cdef int bad
        PyObject_GetBuffer(tcp, &b, PyBUF_SIMPLE)
        bad = parse_hdr(<const uint8_t *>b.buf, b.len, &h)
        PyBuffer_Release(&b)
        if bad:
            return A_MALFORMED
        self.mask = 0
        self.consume_n = 0
        return self.segment(&h, now)

    cdef int segment(self, const Hdr *h, double now) except -1:
        cdef int st = self.st
        cdef uint8_t flags = h.flags
        cdef int64_t span
        cdef uint32_t seg_end
        cdef int32_t skip
        cdef bint fin
        self.last_heard = now
        self.ka_sent = 0
        if st == CLOSED:
            # RFC 9293 §3.10.7.1 (voidbox.net.tcp.reset_for).
            if flags & RST:
                return self.mask
            if flags & ACK:
                self.queue(h.ack, 0, RST, 0, 0, -1)
            else:
                self.queue(0, seq_add_c(h.seq, h.plen + (1 if flags & SYN else 0)
                                        + (1 if flags & FIN else 0)), RST | ACK, 0, 0, -1)
            return self.mask
        if st == SYN_SENT:
            return self.syn_sent(h, now)
        if st == SYN_RECEIVED and not self.synack_sent:
            if flags & RST and h.seq == self.rcv_nxt:
                return self.abort_c(False)
            return self.mask

        if flags & RST:
            span = max(<int64_t>self.window_field_c() << self.rcv_wscale, TCP_MAX_WINDOW_FIELD)
            if seq_ge_c(h.seq, self.rcv_nxt) and seq_lt_c(h.seq, seq_add_c(self.rcv_nxt, span)):
                if st == TIME_WAIT:
                    return self.close_c()
                return self.abort_c(False)
            return self.mask
        if flags & SYN:
            if st == SYN_RECEIVED and h.seq == self.irs and not flags & ACK:
                self.syn(SYN | ACK, self.iss)
                return self.mask
            self.ack_c(True)
            return self.mask
        if not flags & ACK:
            return self.mask

        if st == SYN_RECEIVED:
            if seq_gt_c(h.ack, self.snd_una) and seq_le_c(h.ack, self.snd_max):
                self.st = st = ESTABLISHED
                self.snd_una = h.ack
                self.snd_wnd = <int64_t>h.window << self.snd_wscale
                self.snd_wl1 = h.seq
                self.snd_wl2 = h.ack
                self.retries = 0
                self.arm(now, True)
            else:
                self.queue(h.ack, 0, RST, 0, 0, -1)
                return self.mask
        else:
            if seq_gt_c(h.ack, self.snd_max):
                self.ack_c(True)
                return self.mask
            self.process_ack(h, now)
            st = self.st
            if st == CLOSED:
                return self.mask

        fin = flags & FIN != 0
        if h.plen == 0 and not fin:
            if seq_lt_c(h.seq, self.rcv_nxt):
                self.ack_c(True)
            return self.mask
        seg_end = seq_add_c(h.seq, h.plen + (1 if fin else 0))
        if seq_le_c(seg_end, self.rcv_nxt):
            if st == TIME_WAIT and fin:
                self.tw_dl = now + self.time_wait
            self.ack_c(True)
            return self.mask
        if seq_gt_c(h.seq, self.rcv_nxt):
            self.ack_c(True)
            return self.mask
        if st not in (SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2):
            self.ack_c(True)
            return self.mask
        skip = seq_diff_c(self.rcv_nxt, h.seq)
        if h.plen > skip:
            self.deliver_off = h.hlen + skip
            self.deliver_len = h.plen - skip
            self.pend_fin = fin
            self.pend_st = st
            self.mask |= A_DELIVER
            return self.mask
        return self.finish(fin, True, st, now)

    def delivered(self, Py_ssize_t n, double now):
        cdef bint accepted_all = True
        self.mask = 0
        if n < 0:
            self.nout = 0
            return self.host_reset_c()
        if n:
            self.rcv_nxt = seq_add_c(self.rcv_nxt, n)
        if n < self.deliver_len:
            accepted_all = False
            self.guest_blocked = True
        return self.finish(self.pend_fin, accepted_all, self.pend_st, now)

    cdef int finish(self, bint fin, bint accepted_all, int st, double now) except -1:
        if fin and accepted_all:
            self.rcv_nxt = seq_add_c(self.rcv_nxt, 1)
            self.fin_received = True
            self.mask |= A_SHUT_WR
            if st == SYN_RECEIVED or st == ESTABLISHED:
                self.st = CLOSE_WAIT
            elif st == FIN_WAIT_1:
                self.st = CLOSING
            elif st == FIN_WAIT_2:
                self.enter_time_wait(now)
        self.ack_c(True)
        return self.mask

    cdef void enter_time_wait(self, double now) noexcept:
        self.st = TIME_WAIT
        self.rto_dl = INFINITY
        self.tw_dl = now + self.time_wait

    cdef int syn_sent(self, const Hdr *h, double now) except -1:
        cdef uint8_t flags = h.flags
        if flags & ACK and h.ack != self.snd_max:
            if not flags & RST:
                self.queue(h.ack, 0, RST, 0, 0, -1)
            return self.mask
        if flags & RST:
            if flags & ACK:
                return self.abort_c(False)
            return self.mask
        if not flags & SYN or not flags & ACK:
            return self.mask
        self.irs = h.seq
        self.rcv_nxt = seq_add_c(h.seq, 1)
        self.take_syn_options(h.mss, h.wscale)
        self.snd_una = h.ack
        self.snd_wnd = h.window
        self.snd_wl1 = h.seq
        self.snd_wl2 = h.ack
        self.st = ESTABLISHED
        self.retries = 0
        self.arm(now, True)
        self.ack_c(True)
        return self.mask

    cdef int process_ack(self, const Hdr *h, double now) except -1:
        cdef uint32_t ack = h.ack
        cdef bint advanced = seq_gt_c(ack, self.snd_una)
        cdef int64_t data, old
        cdef int st
        if advanced:
            data = seq_diff_c(ack, self.snd_una)
            if self.has_fin and seq_gt_c(ack, self.fin_v):
                data -= 1
            if data > 0:
                self.consume_n += data
                self.mask |= A_CONSUME
            if self.has_rtt_seq and seq_ge_c(ack, self.rtt_seq_v):
                self.rtt_sample(now - self.rtt_time)
                self.has_rtt_seq = False
            self.snd_una = ack
            self.rto = self.rto_base
            if seq_lt_c(self.snd_nxt, ack):
                self.snd_nxt = ack
            self.retries = 0
            self.dupacks = 0
        old = self.snd_wnd
        if seq_lt_c(self.snd_wl1, h.seq) or (self.snd_wl1 == h.seq
                                             and seq_le_c(self.snd_wl2, ack)):
            self.snd_wnd = <int64_t>h.window << self.snd_wscale
            self.snd_wl1 = h.seq
            self.snd_wl2 = ack
            if old == 0 and self.snd_wnd:
                self.retries = 0
        if not advanced:
            if self.snd_wnd == 0:
                self.retries = 0
            if (self.in_flight_any() and ack == self.snd_una and h.plen == 0
                    and not h.flags & FIN and self.snd_wnd == old):
                self.dupacks += 1
                if self.dupacks == DUPACK_THRESHOLD and seq_ge_c(self.snd_una, self.recover):
                    self.recover = self.snd_max
                    self.retransmits += 1
                    self.has_rtt_seq = False
                    self.snd_nxt = self.snd_una
                    if self.has_fin and self.snd_una == self.fin_v:
                        self.send_fin(now)
                    else:
                        self.mask |= A_REWIND
        if advanced or self.rto_dl == INFINITY:
            self.arm(now, advanced)
        if self.has_fin and seq_gt_c(self.snd_una, self.fin_v):
            st = self.st
            if st == FIN_WAIT_1:
                self.st = FIN_WAIT_2
            elif st == CLOSING:
                self.enter_time_wait(now)
            elif st == LAST_ACK:
                self.close_c()
        return 0
