"""Selects the UDP relay's per-datagram work: compiled voidbox._udp, or its pure-Python twin
voidbox.net._udp_py (the readable specification).

VOIDBOX_PURE=1 forces the twin (the test suite runs both). Without the environment
variable the compiled module is used when it is built; `COMPILED` says which one was chosen.
"""

import os

if os.environ.get("VOIDBOX_PURE") == "1":
    from voidbox.net import _udp_py as impl
else:
    try:
        from voidbox import _udp as impl
    except ImportError:  # not built (source checkout without build_ext): same API, slower
        from voidbox.net import _udp_py as impl

COMPILED = impl.__name__ == "voidbox._udp"
guest_udp_split = impl.guest_udp_split
build_ipv4_udp = impl.build_ipv4_udp

__all__ = ["COMPILED", "build_ipv4_udp", "guest_udp_split", "impl"]
