"""The NAT's command-line options (shared by `boot` and `net run`), parsed strictly into a
NatConfig, a Policy and a capture: the configuration layer of the network.

Strict numbers: ports, port ranges, the MTU, counts, rates.

Python's int() and float() take '+80', ' 80', '8_0', fullwidth or other scripts' digits,
'nan', 'inf' and '1e3'; click's int type is int(). What a user types here is plain ASCII
decimal digits (a rate may have a decimal fraction, '2.5') or a one-line usage error.
Python callers may pass an int (or, for a rate, a float) instead of the text.
"""

from __future__ import annotations

import ipaddress
import math
import re

from voidbox.errors import UsageError
from voidbox.net.config import DNS_PORT, MAX_MTU, MIN_MTU, NatConfig

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at start-up
if TYPE_CHECKING:
    from voidbox.net.pcap import PcapSpec
    from voidbox.net.policy import Policy

MAX_PORT = 65535

INTEGER = re.compile(r"[0-9]+")
RATE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
# More digits than any limit here needs; also keeps int() clear of its digit limit.
MAX_DIGITS = 20


def parse_int(value: str | int, what: str, lo: int, hi: int | None = None, where: str = "") -> int:
    """value as an int in [lo, hi] (no upper bound if hi is None), else UsageError.

    what names the number in the message ('port', '--mtu'); where is appended to it
    (" in 'tcp:80:80'").
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and INTEGER.fullmatch(value):
        number = int(value) if len(value) <= MAX_DIGITS else None
    else:
        raise UsageError(f"bad {what} {value!r}{where}: expected a decimal number")
    if number is None or number < lo or (hi is not None and number > hi):
        shown = value if number is not None else f"{value[:MAX_DIGITS]}..."
        if hi is not None:
            bounds = f"out of range {lo}-{hi}"
        elif number is None:
            bounds = "is too large"
        else:
            bounds = f"must be at least {lo}"
        raise UsageError(f"{what} {shown} {bounds}{where}")
    return number


def parse_rate(value: str | float, what: str) -> float:
    """value as a finite, positive float ('2.5', '100'), else UsageError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and RATE.fullmatch(value):
        number = float(value)
    else:
        raise UsageError(f"bad {what} {value!r}: expected a decimal number such as 10 or 2.5")
    if not (math.isfinite(number) and number > 0):
        shown = value if len(str(value)) <= MAX_DIGITS else f"{str(value)[:MAX_DIGITS]}..."
        raise UsageError(f"{what} {shown} must be finite and greater than 0")
    return number


def parse_dns_upstream(spec: str) -> tuple[str, int]:
    """'IP', 'IP:PORT', 'IPV6' or '[IPV6]:PORT' -> (ip, port)."""
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"bad DNS upstream {spec!r}: expected IP[:PORT] or [IPV6]:PORT")
        sep, port = rest[:1], rest[1:]
    elif spec.count(":") > 1:
        host, sep, port = spec, "", ""
    else:
        host, sep, port = spec.partition(":")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise UsageError(f"bad DNS upstream {spec!r}: expected IP[:PORT] or [IPV6]:PORT") from None
    if "%" in host:
        raise UsageError(f"bad DNS upstream {spec!r}: a zone index is not supported")
    num = parse_int(port, "port", 1, MAX_PORT, where=f" in DNS upstream {spec!r}") if sep else DNS_PORT
    return host, num


def config_from_options(mtu: str | int | None = None, forwards=(), allow=(), deny=(),
                        dns_upstreams=(), max_flows: str | int | None = None,
                        max_conn_rate: str | float | None = None,
                        host_loopback: bool = False,
                        ipv6: bool = True) -> tuple[NatConfig, Policy]:
    """The NAT configuration and policy for `voidbox net run` options (strings as typed;
    numbers are plain decimal, see voidbox.net.options). None leaves NatConfig's default."""
    from voidbox.net.policy import Policy, parse_forward  # policy imports this module

    config = NatConfig(ipv6=bool(ipv6))
    if mtu is not None:
        config.mtu = parse_int(mtu, "--mtu", MIN_MTU, MAX_MTU)
    if max_flows is not None:
        config.max_flows = parse_int(max_flows, "--max-flows", 1)
    if max_conn_rate is not None:
        config.max_conn_rate = parse_rate(max_conn_rate, "--max-conn-rate")
    taken = {}  # (proto, host_port) -> [(host_addr, spec)]
    for spec in forwards:
        forward = parse_forward(spec)
        # A second bind of one protocol's host port would fail, or with SO_REUSEADDR steal
        # the first's traffic; 0.0.0.0 binds every address, so it collides with any.
        for addr, other in taken.get((forward.proto, forward.host_port), ()):
            # "::" binds every IPv6 address and, unless IPV6_V6ONLY, every IPv4 one too.
            if {"0.0.0.0", "::"} & {addr, forward.host_addr} or addr == forward.host_addr:
                raise UsageError(f"--forward {other!r} and {spec!r} both take "
                                 f"{forward.proto} port {forward.host_port}")
        taken.setdefault((forward.proto, forward.host_port), []).append((forward.host_addr, spec))
        config.forwards.append(forward)
    config.dns_upstreams = [parse_dns_upstream(d) for d in dns_upstreams]
    return config, Policy(allow=list(allow), deny=list(deny), host_loopback=host_loopback)


def pcap_from_options(path: str | None = None,
                      max_bytes: str | int | None = None) -> PcapSpec | None:
    """The capture `--pcap FILE --pcap-max-bytes N` ask for (None: no capture).

    Apart from config_from_options because a capture belongs to the guest's interface,
    not to the NAT: a VM's TAP-backed NIC has no NatConfig and can still be captured.
    """
    if path is None and max_bytes is None:
        return None  # the common case: the capture module is not even imported
    from voidbox.net.pcap import DEFAULT_MAX_BYTES, MIN_MAX_BYTES, PcapSpec

    if max_bytes is not None:
        limit = parse_int(max_bytes, "--pcap-max-bytes", MIN_MAX_BYTES)
        if path is None:
            raise UsageError("--pcap-max-bytes needs --pcap FILE")
    else:
        limit = DEFAULT_MAX_BYTES
    if path is None:
        return None
    if not path:
        raise UsageError("--pcap needs a file name")
    return PcapSpec(path, limit)
