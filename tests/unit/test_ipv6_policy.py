"""IPv6 in the NAT's configuration (voidbox/net/policy.py, options.py, config.py): rules
with IPv6 CIDRs, the IPv6 defaults, [::1] forms for forwards and DNS upstreams."""

import pytest

from voidbox.errors import UsageError
from voidbox.net.config import NatConfig
from voidbox.net.options import config_from_options, parse_dns_upstream
from voidbox.net.policy import Policy, host_addresses, parse_forward

IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 04 40 00 80     eth0
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
20010db8000000000000000000000042 05 40 00 80     eth1
"""


def test_the_host_is_closed_over_ipv6_by_default():
    p = Policy(host_addrs=("2001:db8::42",))
    assert not p.allows("tcp", "::1", 80, guest_dst="fd00::2")
    assert not p.allows("tcp", "2001:db8::42", 80)
    assert not p.allows("udp", "fe80::1", 53)  # link-local, as 169.254.0.0/16
    assert p.allows("tcp", "2001:db8::43", 80)
    open_ = Policy(host_loopback=True)
    assert open_.allows("tcp", "::1", 80, guest_dst="fd00::2")
    assert not open_.allows("udp", "fe80::1", 53)


def test_ipv4_mapped_destinations_meet_the_ipv4_rules():
    p = Policy(host_addrs=())
    assert not p.allows("tcp", "::ffff:127.0.0.1", 80)
    assert not Policy(deny=["192.0.2.0/24"], host_addrs=()).allows("udp", "::ffff:192.0.2.7", 53)


def test_ipv6_rules_with_and_without_ports():
    p = Policy(deny=["::/0"], allow=["[2001:db8::/32]:443", "fd00::2"], host_addrs=())
    assert p.allows("tcp", "2001:db8::1", 443) and not p.allows("tcp", "2001:db8::1", 80)
    # A rule naming the gateway's guest-side address opens the host's ::1 behind it.
    assert p.allows("tcp", "::1", 8080, guest_dst="fd00::2")
    assert not p.allows("tcp", "2001:db9::1", 443)
    assert Policy(deny=["0.0.0.0/0"], host_addrs=()).allows("tcp", "2001:db8::1", 80)


def test_host_addresses_reads_if_inet6():
    found = host_addresses(trie="", if_inet6=IF_INET6)
    assert found == ("2001:db8::42", "fd00::2")


@pytest.mark.parametrize("spec,expected", [
    ("tcp:[::1]:8080:80", ("tcp", "::1", 8080, 80)),
    ("udp:[::]:5353:53", ("udp", "::", 5353, 53)),
    ("tcp:[0:0::1]:1:2", ("tcp", "::1", 1, 2)),
    ("tcp:127.0.0.1:8080:80", ("tcp", "127.0.0.1", 8080, 80)),
])
def test_forwards_take_bracketed_ipv6_host_addresses(spec, expected):
    f = parse_forward(spec)
    assert (f.proto, f.host_addr, f.host_port, f.guest_port) == expected


@pytest.mark.parametrize("spec", ["tcp:::1:8080:80", "tcp:[::1:8080:80", "tcp:[::1]8080:80",
                                  "tcp:[nope]:1:2", "tcp:x[::1]:1:2"])
def test_bad_ipv6_forwards_are_usage_errors(spec):
    with pytest.raises(UsageError):
        parse_forward(spec)


def test_forwards_on_every_address_collide_across_families():
    with pytest.raises(UsageError, match="both take"):
        config_from_options(forwards=["tcp:[::]:8080:80", "tcp:127.0.0.1:8080:81"])


def test_dns_upstreams_in_both_families():
    assert parse_dns_upstream("::1") == ("::1", 53)
    assert parse_dns_upstream("[::1]:5353") == ("::1", 5353)
    assert parse_dns_upstream("127.0.0.1:5353") == ("127.0.0.1", 5353)
    for bad in ("[::1", "[::1]x", "fe80::1%eth0", "[::1]:0"):
        with pytest.raises(UsageError):
            parse_dns_upstream(bad)


def test_ipv6_can_be_turned_off():
    config, _policy = config_from_options(ipv6=False)
    assert config.ipv6 is False and NatConfig().ipv6 is True


def test_host_endpoint_over_ipv6():
    cfg = NatConfig(dns_upstreams=[("::1", 5353)])
    assert cfg.host_endpoint("fd00::2", 80) == ("::1", 80)
    assert cfg.host_endpoint("fd00::3", 53) == ("::1", 5353)
    assert cfg.host_endpoint("fd00::3", 80) is None
    assert cfg.host_endpoint("fd00::99", 80) is None
    assert cfg.host_endpoint("fe80::1", 80) is None
    assert cfg.host_endpoint("2001:db8::1", 80) == ("2001:db8::1", 80)
