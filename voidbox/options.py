"""The command-line option tables: `boot`'s and the NAT's, in one place.

launch.py's fast path parses `voidbox boot` from BOOT_OPTIONS without click; cli.py builds
click options from the same tables, so the two never disagree, and `boot` and `net run`
(and `net serve`) take the NAT's options from NAT_OPTIONS. Values are checked by the
configuration layer (config.py, net/options.py), never here.
"""

from __future__ import annotations

import math

from ._records import named_tuple


@named_tuple
class Option:
    flag: str
    kind: type  # str, int, float (finite only: nan and inf are refused), or bool for a flag
    default: object
    help: str
    multiple: bool = False  # repeatable: the values in order, as a tuple
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.split("/")[0][2:].replace("-", "_")

    @property
    def switch(self) -> tuple[str, str] | None:
        """('--x', '--no-x') for an on/off switch written '--x/--no-x', else None."""
        on, slash, off = self.flag.partition("/")
        return (on, off) if slash else None


# The user-mode NAT's options, shared by `boot` and `net run` so the two never drift.
# Numbers stay text here: voidbox.net.options.config_from_options parses them strictly
# (int() and click's int type take '1_500', '+80' and ' 80').
NAT_OPTIONS = (
    Option("--mtu", str, None, "MTU of the guest's interface (576-65520; default 1500).",
           metavar="N"),
    Option("--forward", str, (), "Forward a host port to the guest (repeatable).", True,
           "PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT"),
    Option("--allow", str, (), "Allow egress (repeatable; see egress rules below).", True,
           "CIDR[:PORTS]"),
    Option("--deny", str, (), "Deny egress (repeatable; see egress rules below).", True,
           "CIDR[:PORTS]"),
    Option("--host-loopback", bool, False, "Let the guest reach the host's own services: "
           "its loopback through the gateway 10.0.2.2, and its own addresses. Off by default "
           "(a narrower --allow, e.g. --allow 10.0.2.2:8080, opens one)."),
    Option("--dns-upstream", str, (), "Relay 10.0.2.3 to this resolver instead of "
           "/etc/resolv.conf's (repeatable).", True, "IP[:PORT]"),
    Option("--max-flows", str, None, "Most flows open at once, TCP, UDP and ICMP together (default 65536).", metavar="N"),
    Option("--max-conn-rate", str, None, "New connections per second, e.g. 10 or 2.5 "
           "(default unlimited).", metavar="RATE"),
    Option("--pcap", str, None, "Write every frame crossing the guest's interface, both "
           "ways, to FILE (pcap, mode 0600; an earlier capture there is replaced, any other "
           "file is refused). Captures slow bulk TCP: "
           "host data then takes the Python path.", metavar="FILE"),
    Option("--pcap-max-bytes", str, None, "Stop capturing, with a note, before FILE grows "
           "past N bytes (default 67108864, 64 MiB).", metavar="N"),
    Option("--ipv6/--no-ipv6", bool, True, "IPv6 on the guest's link: the prefix fd00::/64 "
           "by router advertisement (SLAAC), the gateway fd00::2 (the host's ::1, as "
           "10.0.2.2 is its 127.0.0.1), DNS at fd00::3, ICMPv6, UDP and TCP over IPv6. "
           "On by default; --no-ipv6 drops every IPv6 frame."),
)
NAT_EPILOG = (
    "Egress rules (--allow, --deny): CIDR[:PORTS], PORTS a list of ports and ranges, e.g. "
    "10.0.0.0/8:80,443,8000-8100. A rule matches either the address the guest sees "
    "(10.0.2.2 = the gateway, 10.0.2.3 = DNS, other addresses as they are) or the translated "
    "host destination (10.0.2.2 -> 127.0.0.1); the most specific rule matching either wins "
    "(longest prefix, then a rule with ports, then deny). So --deny 10.0.2.2 keeps the "
    "command off the host's loopback, and --deny 0.0.0.0/0 --allow 127.0.0.1 allows only "
    "it. By default the host itself is denied: 127.0.0.0/8 (so the gateway 10.0.2.2), the "
    "host's own addresses, and 169.254.0.0/16 (cloud metadata); --host-loopback opens the "
    "first two, a narrower --allow opens one address or port. DNS at 10.0.2.3:53 is the "
    "NAT's own service and is always served. --forward listens on 127.0.0.1 unless given "
    "another HOSTADDR.")

# IPv6 in the NAT (NDP, router advertisements, DHCPv6, ICMPv6, UDP and TCP over IPv6): on
# by default. Kept apart from NAT_OPTIONS until `boot`'s body (commands.boot_command)
# passes it to config_from_options; `net run` and `net serve` take it now.

# The backend sandbox (voidbox.sandbox) of the processes that parse a guest's frames:
# `net run`'s NAT (and `net serve`). On by default; a host that lacks a piece says so in
# one line, and this flag is the only way to run without it.
SANDBOX_OPTIONS = (
    Option("--no-sandbox", bool, False, "Run the network backend (the NAT; a VM's card "
           "backend process) without its sandbox (by default it "
           "runs with no capabilities, no_new_privs, an empty read-only root in its own "
           "mount, PID, IPC, UTS and, unprivileged, user namespaces, and a seccomp "
           "allow-list that kills it on any other system call; `voidbox doctor` shows "
           "what this host supports)."),
)

BOOT_OPTIONS = (
    Option("--kernel", str, None, "Kernel (bzImage or ELF vmlinux)."),
    Option("--initrd", str, None, "Initial ramdisk."),
    Option("--cmdline", str, None, "Replace the default kernel command line."),
    Option("--append", str, "", "Add to the kernel command line."),
    Option("--mem", str, "512M", "Guest memory (K, M, G suffixes)."),
    Option("--cpus", int, 1, "Number of vCPUs."),
    Option("--timeout", float, None, "Stop the VM after this many seconds (exit 3)."),
    Option("--readonly", bool, False, "Attach the disk image read-only."),
    Option("--accel", str, "auto", "Who runs the guest's CPUs: kvm (voidbox's own VMM), "
           "qemu (QEMU's TCG, or its KVM where usable, with voidbox's disk and network "
           "devices over vhost-user) or auto: kvm where /dev/kvm runs an unmodified guest, "
           "else qemu. `voidbox doctor` shows what auto picks.", metavar="auto|kvm|qemu"),
    Option("--net", str, ("slirp",), "A network card and its backend: slirp (the user-mode "
           "NAT, no root needed), tap:NAME (a TAP the user owns, e.g. made by `ip tuntap add "
           "mode tap user USER`, or a new one with CAP_NET_ADMIN), vhost-user:SOCKET (a "
           "vhost-user-net backend in another process, e.g. `voidbox net serve`; if it goes "
           "away the guest's link goes down) or none (repeatable: one card each; default "
           "one slirp).", True, "slirp|tap:NAME|vhost-user:SOCKET|none"),
    Option("--net-fallback", str, "slirp", "When a tap:NAME cannot be used: slirp serves "
           "the card with the NAT (a line on stderr says why), fail exits 1.",
           metavar="slirp|fail"),
    Option("--net-reconnect", bool, False, "When a vhost-user:SOCKET card's backend goes "
           "away, keep trying the socket and bring the guest's link back up with the next "
           "backend there (without it the link stays down)."),
    Option("--net-isolation", str, "process", "Where a slirp or tap card's backend runs: "
           "process (a child `voidbox net serve` on a socketpair, so the code that parses the "
           "guest's frames holds neither /dev/kvm nor guest memory beyond the rings' shared "
           "RAM) or none (inside the VMM, for debugging; says so on stderr).",
           metavar="process|none"),
    *SANDBOX_OPTIONS,
    Option("--stats", bool, False, "Print each network card's counters when the VM stops."),
    Option("--mac", str, None, "The first card's MAC (default: locally administered, stable "
           "for the image or kernel path).", metavar="MAC"),
    *NAT_OPTIONS,
)
_BY_FLAG = {option.flag: option for option in BOOT_OPTIONS if option.switch is None}
# On/off switches ('--x/--no-x'): each spelling -> (option, the value it sets).
_SWITCHES = {spelling: (option, spelling == option.switch[0])
             for option in BOOT_OPTIONS if option.switch is not None
             for spelling in option.switch}


def parse_boot_fast(args: list[str]) -> dict | None:
    """`boot`'s parameters from a plain argument list, or None to let click parse it.

    Plain means: known long options (`--opt value` or `--opt=value`, each at most once),
    values that do not start with "-", numbers that parse (floats finite), and at most one
    IMAGE.
    """
    params = {option.dest: option.default for option in BOOT_OPTIONS}
    params["image"] = None
    seen = set()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-"):
            if params["image"] is not None:
                return None
            params["image"] = arg
            continue
        flag, eq, value = arg.partition("=")
        if flag in _SWITCHES:
            option, on = _SWITCHES[flag]
            if eq or option.dest in seen:
                return None
            params[option.dest] = on
            seen.add(option.dest)
            continue
        option = _BY_FLAG.get(flag)
        if option is None or (flag in seen and not option.multiple):
            return None
        if option.kind is bool:
            if eq:
                return None
            params[option.dest] = True
            continue
        if not eq:
            if i >= len(args):
                return None
            value = args[i]
            i += 1
        if value.startswith("-"):
            return None
        try:
            parsed = option.kind(value)
        except ValueError:
            return None
        if option.multiple:
            # The first value replaces the default (click's multiple=True does the same).
            previous = params[option.dest] if flag in seen else ()
            params[option.dest] = (*previous, parsed)
        else:
            params[option.dest] = parsed
        seen.add(flag)
        if option.kind is float and not math.isfinite(params[option.dest]):
            return None  # click's FiniteFloat owns the message
    return params
