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

IPv6 is the same with its own addresses: rules take IPv6 CIDRs (`2001:db8::/32`, with
ports in brackets: `[2001:db8::/32]:80,443`); the gateway fd00::2 leads to the host's ::1,
denied with 127.0.0.0/8 unless --host-loopback; link-local fe80::/10 is denied as
169.254.0.0/16 is; the host's own IPv6 addresses are read from /proc/net/if_inet6. An
IPv4-mapped destination (::ffff:127.0.0.1, which an AF_INET6 socket reaches over IPv4) is
matched as the IPv4 address it maps too, so no IPv4 rule can be walked around that way.
"""

from __future__ import annotations

import ipaddress

from voidbox.errors import UsageError
from voidbox.net.config import HOST_LOOPBACK, Forward
from voidbox.net.options import parse_int

from .._records import dataclass

# Link-local: cloud metadata (169.254.169.254) and the host's own links (RFC 4291 §2.5.6).
DEFAULT_DENY = ("169.254.0.0/16", "fe80::/10")
# Denied unless --host-loopback: the host's loopback, and (host_addresses()) its own
# addresses, on which its private services listen as well.
HOST_DENY = ("127.0.0.0/8", "::1/128")
FIB_TRIE = "/proc/net/fib_trie"
IF_INET6 = "/proc/net/if_inet6"
# Verdicts remembered per (address, port): every new flow asks, and parsing the address
# and walking the rules costs more than the socket set-up. Cleared when full.
VERDICT_CACHE_MAX = 4096
MAX_PORT = 65535


@dataclass(frozen=True)
class Rule:
    """One --allow or --deny rule."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    ports: tuple[tuple[int, int], ...] | None  # inclusive ranges; None means every port
    allow: bool
    user: bool = True

    def matches(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int | None) -> bool:
        if ip not in self.network:  # False across families
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
    """'10.0.0.0/8', '1.2.3.4:53', '0.0.0.0/0:80,443,8000-8100', '2001:db8::/32',
    '[::1]:8080' -> Rule. An IPv6 CIDR with ports is bracketed (its colons are its own)."""
    if spec.startswith("["):
        addr, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"bad rule {spec!r}: expected [IPV6CIDR]:PORTS")
        sep, ports = rest[:1], rest[1:]
        family = ipaddress.IPv6Network
    elif spec.count(":") > 1:
        addr, sep, ports = spec, "", ""
        family = ipaddress.IPv6Network
    else:
        addr, sep, ports = spec.partition(":")
        family = ipaddress.IPv4Network
    try:
        network = family(addr.strip(), strict=False)
    except ValueError:
        kind = "IPv6" if family is ipaddress.IPv6Network else "IPv4"
        raise UsageError(f"bad {kind} CIDR {addr!r} in rule {spec!r}") from None
    return Rule(network, _parse_ports(ports, spec) if sep else None, allow, user)


def _addresses(text: str) -> list:
    """The address a rule is matched against, and for an IPv4-mapped IPv6 one
    (::ffff:a.b.c.d, RFC 4291 §2.5.5.2) the IPv4 address it reaches as well."""
    addr = ipaddress.ip_address(text)
    mapped = getattr(addr, "ipv4_mapped", None)
    return [addr, mapped] if mapped is not None else [addr]


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
            defaults += [f"{a}/128" if ":" in a else f"{a}/32" for a in self.host_addrs]
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
            ips = _addresses(dst_ip)
            if guest_dst is not None:
                ips += _addresses(guest_dst)
            verdict = self._decide(ips, dst_port)
            if len(self._verdicts) >= VERDICT_CACHE_MAX:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _decide(self, ips: list, dst_port: int | None) -> bool:
        for rule in self.rules:
            if any(rule.matches(ip, dst_port) for ip in ips):
                return rule.allow
        return True


def host_addresses(trie: str | None = None, if_inet6: str | None = None) -> tuple[str, ...]:
    """The host's own addresses outside the loopback and link-local ranges (those have
    rules of their own): IPv4 from the /32 local routes of /proc/net/fib_trie (or `trie`),
    IPv6 from /proc/net/if_inet6 (or `if_inet6`). No netlink socket, no pyroute2 import:
    this runs at every start."""
    if if_inet6 is None and trie is not None:
        if_inet6 = ""  # a caller who gives the IPv4 table gives the IPv6 one too, or none
    found = set(_host_addresses6(if_inet6))
    if trie is None:
        try:
            with open(FIB_TRIE) as file:
                trie = file.read()
        except OSError:
            return tuple(sorted(found))
    lines = trie.splitlines()
    for prev, line in zip(lines, lines[1:], strict=False):
        if line.strip() == "/32 host LOCAL":
            addr = prev.strip().lstrip("|-+ ").strip()
            if addr and not addr.startswith("127."):
                found.add(addr)
    return tuple(sorted(found))


def _host_addresses6(if_inet6: str | None) -> list[str]:
    """IPv6 addresses of /proc/net/if_inet6 (32 hex digits first on each line), but ::1
    and fe80::/10."""
    if if_inet6 is None:
        try:
            with open(IF_INET6) as file:
                if_inet6 = file.read()
        except OSError:
            return []
    out = []
    for line in if_inet6.splitlines():
        fields = line.split()
        if not fields or len(fields[0]) != 32:
            continue
        try:
            addr = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        except ValueError:
            continue
        if not (addr.is_loopback or addr.is_link_local):
            out.append(str(addr))
    return out


def split_host_port(text: str, spec: str) -> list[str]:
    """'[::1]:8080:80' -> ['::1', '8080', '80']: an IPv6 address in brackets is one field."""
    if "[" not in text:
        return text.split(":")
    head, _, rest = text.partition("[")
    addr, bracket, tail = rest.partition("]")
    if not bracket or (head and not head.endswith(":")) or (tail and not tail.startswith(":")):
        raise UsageError(f"bad {spec!r}: an IPv6 address goes in brackets, [::1]")
    fields = head.split(":")[:-1] if head else []
    return [*fields, addr, *(tail[1:].split(":") if tail else [])]


def parse_forward(spec: str) -> Forward:
    """PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT, e.g. 'tcp:8080:80', 'udp:127.0.0.1:5353:53',
    'tcp:[::1]:8080:80' (an IPv6 host address in brackets)."""
    parts = split_host_port(spec, f"forward {spec}")
    if len(parts) not in (3, 4):
        raise UsageError(f"bad forward {spec!r}: expected PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT")
    proto = parts[0].lower()
    if proto not in ("tcp", "udp"):
        raise UsageError(f"bad forward {spec!r}: protocol must be tcp or udp")
    host_addr = parts[1] if len(parts) == 4 else HOST_LOOPBACK
    try:
        addr = ipaddress.ip_address(host_addr)
    except ValueError:
        raise UsageError(f"bad forward {spec!r}: {host_addr!r} is not an IP address") from None
    if addr.version == 6 and "[" not in spec:
        raise UsageError(f"bad forward {spec!r}: an IPv6 address goes in brackets, [::1]")
    host_addr = str(addr)
    return Forward(proto, host_addr, _parse_port(parts[-2], spec), _parse_port(parts[-1], spec))
