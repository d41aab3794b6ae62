"""Selects the UDP relay's per-datagram work: compiled voidbox._udp, or its pure-Python twin
voidbox.net._udp_py (the readable specification).

voidbox._twins.pick chooses (VOIDBOX_PURE=1 forces the twin); `COMPILED` says which one
was chosen.
"""

from voidbox._twins import pick

impl = pick("voidbox._udp", "voidbox.net._udp_py")
COMPILED = impl.__name__ == "voidbox._udp"
guest_udp_split = impl.guest_udp_split
build_ipv4_udp = impl.build_ipv4_udp

__all__ = ["COMPILED", "build_ipv4_udp", "guest_udp_split", "impl"]
