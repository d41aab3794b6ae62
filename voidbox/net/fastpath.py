"""Selects the NAT's per-packet hot path: compiled voidbox._slirp, or its pure-Python twin.

voidbox._twins.pick chooses (VOIDBOX_PURE=1 forces the twin); `COMPILED` says which one
was chosen.
"""

from voidbox._twins import pick

impl = pick("voidbox._slirp", "voidbox.net._slirp_py")
COMPILED = impl.__name__ == "voidbox._slirp"

seq_lt = impl.seq_lt
seq_le = impl.seq_le
seq_gt = impl.seq_gt
seq_ge = impl.seq_ge
seq_add = impl.seq_add
seq_diff = impl.seq_diff
inet_checksum = impl.inet_checksum
tcp_checksum = impl.tcp_checksum
build_ipv4_tcp = impl.build_ipv4_tcp
build_ipv6_tcp = impl.build_ipv6_tcp
guest_ipv4_split = impl.guest_ipv4_split
guest_ipv6_split = impl.guest_ipv6_split
FramePort = impl.FramePort
keep_freed_heap = impl.keep_freed_heap
STREAM_MORE = impl.STREAM_MORE
STREAM_DRAINED = impl.STREAM_DRAINED
STREAM_EOF = impl.STREAM_EOF
STREAM_BLOCKED = impl.STREAM_BLOCKED
UDP_DRAINED = impl.UDP_DRAINED
UDP_BUDGET = impl.UDP_BUDGET
UDP_PAUSED = impl.UDP_PAUSED
UDP_OVERSIZE = impl.UDP_OVERSIZE
UDP_BLOCKED = impl.UDP_BLOCKED



def build_ip_tcp(out, src_ip, dst_ip, *args) -> int:
    """build_ipv4_tcp, or build_ipv6_tcp for 16-byte addresses (same arguments; IPv6 has
    no IP identification to use)."""
    build = build_ipv6_tcp if len(src_ip) == 16 else build_ipv4_tcp
    return build(out, src_ip, dst_ip, *args)


__all__ = [
    "COMPILED", "FramePort", "STREAM_BLOCKED", "STREAM_DRAINED", "STREAM_EOF", "STREAM_MORE",
    "UDP_BLOCKED", "UDP_BUDGET", "UDP_DRAINED", "UDP_OVERSIZE", "UDP_PAUSED",
    "build_ip_tcp", "build_ipv4_tcp", "build_ipv6_tcp", "guest_ipv4_split", "guest_ipv6_split",
    "impl", "inet_checksum", "keep_freed_heap", "seq_add", "seq_diff", "seq_ge",
    "seq_gt", "seq_le", "seq_lt", "tcp_checksum",
]
