"""Selects the NAT's TCP state machine: compiled voidbox._tcp, or its pure-Python twin
voidbox.net.tcp (the readable specification).

voidbox._twins.pick chooses (VOIDBOX_PURE=1 forces the twin); `COMPILED` says which one
was chosen.
Both export TcpCore and flow_key with the same interface (see voidbox.net.tcp).
"""

from voidbox._twins import pick

impl = pick("voidbox._tcp", "voidbox.net.tcp")
COMPILED = impl.__name__ == "voidbox._tcp"
TcpCore = impl.TcpCore
flow_key = impl.flow_key

__all__ = ["COMPILED", "TcpCore", "flow_key", "impl"]
