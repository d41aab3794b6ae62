"""Selects the NAT's per-packet hot path: compiled voidbox._slirp, or its pure-Python twin.

VOIDBOX_PURE=1 forces the twin (the test suite runs both). Without the environment
variable the compiled module is used when it is built; `COMPILED` says which one was chosen.
"""

import os

if os.environ.get("VOIDBOX_PURE") == "1":
    from voidbox.net import _slirp_py as impl
else:
    try:
        from voidbox import _slirp as impl
    except ImportError:  # not built (source checkout without build_ext): same API, slower
        from voidbox.net import _slirp_py as impl

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
STREAM_MORE = impl.STREAM_MORE
STREAM_DRAINED = impl.STREAM_DRAINED
STREAM_EOF = impl.STREAM_EOF
STREAM_BLOCKED = impl.STREAM_BLOCKED



def build_ip_tcp(out, src_ip, dst_ip, *args) -> int:
    """build_ipv4_tcp, or build_ipv6_tcp for 16-byte addresses (same arguments; IPv6 has
    no IP identification to use)."""
    build = build_ipv6_tcp if len(src_ip) == 16 else build_ipv4_tcp
    return build(out, src_ip, dst_ip, *args)


__all__ = [
    "COMPILED", "FramePort", "STREAM_BLOCKED", "STREAM_DRAINED", "STREAM_EOF", "STREAM_MORE",
    "build_ip_tcp", "build_ipv4_tcp", "build_ipv6_tcp", "guest_ipv4_split", "guest_ipv6_split", "impl", "inet_checksum", "seq_add", "seq_diff", "seq_ge",
    "seq_gt", "seq_le", "seq_lt", "tcp_checksum",
]
