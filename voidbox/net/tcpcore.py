"""Selects the NAT's TCP state machine: compiled voidbox._tcp, or its pure-Python twin
voidbox.net.tcp (the readable specification).

VOIDBOX_PURE=1 forces the twin (the test suite runs both). Without the environment
variable the compiled module is used when it is built; `COMPILED` says which one was chosen.
Both export TcpCore and flow_key with the same interface (see voidbox.net.tcp).
"""

import os

if os.environ.get("VOIDBOX_PURE") == "1":
    from voidbox.net import tcp as impl
else:
    try:
        from voidbox import _tcp as impl
    except ImportError:  # not built (source checkout without build_ext): same API, slower
        from voidbox.net import tcp as impl

COMPILED = impl.__name__ == "voidbox._tcp"
TcpCore = impl.TcpCore
flow_key = impl.flow_key

__all__ = ["COMPILED", "TcpCore", "flow_key", "impl"]
