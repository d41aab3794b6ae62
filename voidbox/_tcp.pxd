# C-level interface of voidbox/_tcp.pyx: the NAT's TCP state machine (RFC 9293), the
# compiled twin of voidbox/net/tcp.py's TcpCore. Every field is C data; the Python-level
# interface (properties and def methods) is the pure twin's, see voidbox/net/tcp.py.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t

cdef enum:
    OUT_MAX = 8  # queued segments; no sequence of entry points queues more undrained

# One segment for the guest, queued until emit() writes it.
cdef struct OutSeg:
    uint32_t seq
    uint32_t ack
    uint16_t window
    uint16_t mss      # SYN option; 0: none
    int wscale        # SYN option; -1: none
    uint8_t flags
    bint hold         # a pure ACK emit() may hold back (see TcpCore.emit)

# A guest segment's header as the state machine needs it (RFC 9293 §3.1, §3.2).
cdef struct Hdr:
    uint32_t seq
    uint32_t ack
    Py_ssize_t hlen
    Py_ssize_t plen
    int mss           # 0: no MSS option
    int wscale        # -1: no window scale option
    uint16_t window
    uint8_t flags

# Fill h from p[0:n]; -1 (no exception) if the header or its options are malformed.
cdef int parse_hdr(const uint8_t *p, Py_ssize_t n, Hdr *h) noexcept nogil


cdef class TcpCore:
    cdef readonly int port
    cdef readonly int guest_port
    cdef int st
    cdef readonly uint32_t iss
    cdef readonly uint32_t snd_una
    cdef readonly uint32_t snd_nxt
    cdef readonly uint32_t snd_max
    cdef readonly int64_t snd_wnd
    cdef readonly uint32_t snd_wl1
    cdef readonly uint32_t snd_wl2
    cdef readonly uint32_t irs
    cdef public uint32_t rcv_nxt
    cdef public int64_t rcv_wnd
    cdef readonly int our_mss
    cdef int our_ws          # -1: we offer no window scaling
    cdef readonly bint wscale_ok
    cdef public int snd_mss
    cdef readonly int snd_wscale
    cdef readonly int rcv_wscale
    cdef readonly bint synack_sent
    cdef bint has_fin
    cdef uint32_t fin_v
    cdef readonly bint fin_received
    cdef readonly int max_retries
    cdef readonly int retries
    cdef readonly double rto
    cdef readonly double rto_base
    cdef readonly double rto_min
    cdef readonly double rto_max
    cdef bint has_srtt
    cdef double srtt_v
    cdef readonly double rttvar
    cdef bint has_rtt_seq
    cdef uint32_t rtt_seq_v
    cdef readonly double rtt_time
    cdef double rto_dl       # INFINITY: not armed
    cdef readonly double time_wait
    cdef double tw_dl        # INFINITY: not in TIME-WAIT
    cdef readonly int dupacks
    cdef readonly uint32_t recover
    cdef readonly int64_t retransmits
    cdef public bint guest_blocked
    cdef double idle_t       # INFINITY: no limit (None at the Python level)
    cdef readonly double keepalive_interval
    cdef readonly int keepalive_probes
    cdef double handshake_t  # INFINITY: no limit
    cdef double fin_t        # INFINITY: no limit
    cdef readonly double born
    cdef readonly double last_heard
    cdef readonly int ka_sent
    cdef readonly double ka_next
    cdef readonly bint expired
    # Output.
    cdef readonly int64_t consume_n
    cdef readonly Py_ssize_t deliver_off
    cdef readonly Py_ssize_t deliver_len
    cdef bint has_last_ack
    cdef uint32_t last_ack_v
    cdef public bint ack_due
    cdef OutSeg out[OUT_MAX]
    cdef int nout
    cdef bint has_data
    cdef uint32_t data_seq
    cdef uint32_t data_ack
    cdef uint16_t data_window
    cdef Py_ssize_t data_len
    cdef int data_mss
    cdef bint data_fin
    cdef int mask
    cdef bint pend_fin
    cdef int pend_st

    cdef int queue(self, uint32_t seq, uint32_t ack, uint8_t flags, uint16_t window,
                   uint16_t mss, int wscale) except -1
    cdef void take_syn_options(self, int mss, int wscale) noexcept
    cdef int syn(self, uint8_t flags, uint32_t seq) except -1
    cdef uint16_t window_field_c(self) noexcept
    cdef int ack_c(self, bint hold) except -1
    cdef bint in_flight_any(self) noexcept
    cdef int64_t in_flight_c(self) noexcept
    cdef bint probe_needed(self) noexcept
    cdef void arm(self, double now, bint restart) noexcept
    cdef void rtt_sample(self, double r) noexcept
    cdef int abort_c(self, bint rst) except -1
    cdef int close_c(self) noexcept
    cdef double deadline_c(self) noexcept
    cdef double limit_deadline(self) noexcept
    cdef int limit_reached(self, double now) except -1
    cdef int refuse(self) except -1
    cdef int send_fin(self, double now) except -1
    cdef int host_reset_c(self) except -1
    cdef int64_t send_budget_c(self) noexcept
    cdef void after_send(self, bint new, double now) noexcept
    cdef int probe(self) except -1
    cdef bint holds_back(self, const OutSeg *o) noexcept
    cdef int segment(self, const Hdr *h, double now) except -1
    cdef int finish(self, bint fin, bint accepted_all, int st, double now) except -1
    cdef void enter_time_wait(self, double now) noexcept
    cdef int syn_sent(self, const Hdr *h, double now) except -1
    cdef int process_ack(self, const Hdr *h, double now) except -1
