"""Egress policy (--allow/--deny CIDR[:PORTS]) and port-forward specs.

Every protocol's new flows are checked against two addresses: the one the guest sent to
(10.0.2.2) and the host destination it is translated to (127.0.0.1). A rule matches if
it matches either, so `--deny 10.0.2.2` and `--deny 127.0.0.1` both keep the guest off
the host's loopback. Of all the rules matching either address, the most specific wins:
the longest prefix first, then a rule naming ports over one that does not, then a user
rule over a built-in default, then deny over allow (so `--deny 0.0.0.0/0 --allow
127.0.0.1` still lets the guest reach the host's loopback through 10.0.2.2). With no
matching rule the destination is allowed. The link-local range
169.254.0.0/16 (cloud metadata services) is denied by default; an --allow for it or a
narrower range overrides that.

The host itself is off limits by default, as a sandbox's should be: its loopback
(127.0.0.0/8, which the gateway 10.0.2.2 leads to) and its own addresses (read once, from
/proc/net/fib_trie's local routes) are denied by built-in rules unless `host_loopback`
(`--host-loopback`) is given; a narrower --allow (`--allow 10.0.2.2:8080`,
`--allow 192.0.2.5`) opens one of them, a broad one (`--allow 0.0.0.0/0`) does not.
"""

from __future__ import annotations

import ipaddress

from voidbox.errors import UsageError
from voidbox.net.config import HOST_LOOPBACK, Forward
from voidbox.net.options import parse_int

from .._records import dataclass

DEFAULT_DENY = ("169.254.0.0/16",)
# Denied unless --host-loopback: the host's loopback, and (host_addresses()) its own
# addresses, on which its private services listen as well.
HOST_DENY = ("127.0.0.0/8",)
FIB_TRIE = "/proc/net/fib_trie"
# Verdicts remembered per (address, port): every new flow asks, and parsing the address
# and walking the rules costs more than the socket set-up. Cleared when full.
VERDICT_CACHE_MAX = 4096
MAX_PORT = 65535


@dataclass(frozen=True)
class Rule:
    """One --allow or --deny rule."""

    network: ipaddress.IPv4Network
    ports: tuple[tuple[int, int], ...] | None  # inclusive ranges; None means every port
    allow: bool
    user: bool = True

    def matches(self, ip: ipaddress.IPv4Address, port: int | None) -> bool:
        if ip not in self.network:
            return False
        if self.ports is None:
            return True
        if port is None:
            # A rule naming ports says nothing about portless protocols (ICMP).
            return False
        return any(lo <= port <= hi for lo, hi in self.ports)

    def specificity(self) -> tuple[int, int, int, int]:
        return (self.network.prefixlen, self.ports is not None, self.user, not self.allow)


def _parse_port(text: str, spec: str) -> int:
    """A port typed in spec: plain decimal digits, 1-65535 (int() would take '+80', '8_0')."""
    return parse_int(text, "port", 1, MAX_PORT, where=f" in {spec!r}")


def _parse_ports(text: str, spec: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for item in text.split(","):
        lo_s, sep, hi_s = item.partition("-")
        lo = _parse_port(lo_s, spec)
        hi = _parse_port(hi_s, spec) if sep else lo
        if hi < lo:
            raise UsageError(f"empty port range {item!r} in {spec!r}")
        ranges.append((lo, hi))
    return tuple(ranges)


def parse_rule(spec: str, allow: bool, user: bool = True) -> Rule:
    """'10.0.0.0/8', '1.2.3.4:53', '0.0.0.0/0:80,443,8000-8100' -> Rule."""
    addr, sep, ports = spec.partition(":")
    try:
        network = ipaddress.IPv4Network(addr.strip(), strict=False)
    except ValueError:
        raise UsageError(f"bad IPv4 CIDR {addr!r} in rule {spec!r}") from None
    return Rule(network, _parse_ports(ports, spec) if sep else None, allow, user)


class Policy:
    """The egress rule set (see the module docstring)."""

    def __init__(self, allow: list[str] | tuple[str, ...] = (), deny: list[str] | tuple[str, ...] = (),
                 host_loopback: bool = False, host_addrs: tuple[str, ...] | None = None):
        """host_addrs: the host's own addresses to deny with its loopback (default: read
        from the kernel); ignored with host_loopback."""
        self.host_loopback = host_loopback
        # The inputs, as given: a backend in another process rebuilds the same rules from
        # them (voidbox.vhost_user.child) without reading the host's addresses again.
        self.allow, self.deny = tuple(allow), tuple(deny)
        if host_addrs is None and not host_loopback:
            host_addrs = tuple(host_addresses())
        self.host_addrs = tuple(host_addrs or ())
        defaults = list(DEFAULT_DENY)
        if not host_loopback:
            defaults += HOST_DENY
            defaults += [f"{a}/32" for a in self.host_addrs]
        rules = [parse_rule(s, allow=False, user=False) for s in defaults]
        rules += [parse_rule(s, allow=True) for s in allow]
        rules += [parse_rule(s, allow=False) for s in deny]
        # Most specific first, so the first match decides.
        self.rules = sorted(rules, key=Rule.specificity, reverse=True)
        self._verdicts: dict[tuple[str, str | None, int | None], bool] = {}

    def allows(self, proto: str, dst_ip: str, dst_port: int | None,
               guest_dst: str | None = None) -> bool:
        """Whether the guest may reach dst_ip[:dst_port] (the host destination) over proto
        ('tcp', 'udp', 'icmp'); guest_dst is the address the guest sent to, when it
        differs (the gateway for host loopback)."""
        if guest_dst == dst_ip:
            guest_dst = None
        key = (dst_ip, guest_dst, dst_port)  # no rule looks at proto
        verdict = self._verdicts.get(key)
        if verdict is None:
            ips = [ipaddress.IPv4Address(dst_ip)]
            if guest_dst is not None:
                ips.append(ipaddress.IPv4Address(guest_dst))
            verdict = self._decide(ips, dst_port)
            if len(self._verdicts) >= VERDICT_CACHE_MAX:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _decide(self, ips: list[ipaddress.IPv4Address], dst_port: int | None) -> bool:
        for rule in self.rules:
            if any(rule.matches(ip, dst_port) for ip in ips):
                return rule.allow
        return True


def host_addresses(trie: str | None = None) -> tuple[str, ...]:
    """The host's own IPv4 addresses outside 127.0.0.0/8: the /32 local routes of
    /proc/net/fib_trie, or of `trie` (no netlink socket, no pyroute2 import: this runs at
    every start)."""
    if trie is None:
        try:
            with open(FIB_TRIE) as file:
                trie = file.read()
        except OSError:
            return ()
    lines = trie.splitlines()
    found = set()
    for prev, line in zip(lines, lines[1:], strict=False):
        if line.strip() == "/32 host LOCAL":
            addr = prev.strip().lstrip("|-+ ").strip()
            if addr and not addr.startswith("127."):
                found.add(addr)
    return tuple(sorted(found))


def parse_forward(spec: str) -> Forward:
    """PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT, e.g. 'tcp:8080:80', 'udp:127.0.0.1:5353:53'."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise UsageError(f"bad forward {spec!r}: expected PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT")
    proto = parts[0].lower()
    if proto not in ("tcp", "udp"):
        raise UsageError(f"bad forward {spec!r}: protocol must be tcp or udp")
    host_addr = parts[1] if len(parts) == 4 else HOST_LOOPBACK
    try:
        ipaddress.IPv4Address(host_addr)
    except ValueError:
        raise UsageError(f"bad forward {spec!r}: {host_addr!r} is not an IPv4 address") from None
    return Forward(proto, host_addr, _parse_port(parts[-2], spec), _parse_port(parts[-1], spec))
