"""Egress policy and forward specs (voidbox/net/policy.py)."""

import pytest

from voidbox.errors import UsageError
from voidbox.net.config import Forward
from voidbox.net.options import config_from_options
from voidbox.net.policy import Policy, host_addresses, parse_forward, parse_rule


def test_default_allows_everything_but_link_local_and_the_host():
    p = Policy()
    assert not p.allows("tcp", "127.0.0.1", 80)
    assert Policy(host_loopback=True).allows("tcp", "127.0.0.1", 80)
    assert p.allows("icmp", "8.8.8.8", None)
    assert not p.allows("tcp", "169.254.169.254", 80)
    assert not p.allows("icmp", "169.254.1.1", None)


def test_user_allow_overrides_default_deny_at_same_or_narrower_prefix():
    assert Policy(allow=["169.254.0.0/16"]).allows("udp", "169.254.1.2", 53)
    p = Policy(allow=["169.254.169.254/32:80"])
    assert p.allows("tcp", "169.254.169.254", 80)
    assert not p.allows("tcp", "169.254.169.254", 81)
    assert not p.allows("tcp", "169.254.169.253", 80)


def test_most_specific_rule_wins():
    p = Policy(allow=["10.1.0.0/16"], deny=["0.0.0.0/0", "10.1.2.0/24"])
    assert not p.allows("tcp", "8.8.8.8", 443)
    assert p.allows("tcp", "10.1.9.9", 443)
    assert not p.allows("tcp", "10.1.2.3", 443)


def test_port_rule_beats_portless_rule_of_same_prefix():
    p = Policy(allow=["127.0.0.1:8080"], deny=["127.0.0.1"])
    assert p.allows("tcp", "127.0.0.1", 8080)
    assert not p.allows("tcp", "127.0.0.1", 8081)
    # A rule naming ports does not apply to ICMP.
    assert not p.allows("icmp", "127.0.0.1", None)


def test_deny_wins_an_exact_tie():
    p = Policy(allow=["127.0.0.0/8"], deny=["127.0.0.0/8"])
    assert not p.allows("udp", "127.0.0.1", 53)


def test_port_lists_and_ranges():
    rule = parse_rule("0.0.0.0/0:53,8000-8002", allow=False)
    assert rule.ports == ((53, 53), (8000, 8002))
    p = Policy(deny=["0.0.0.0/0:53,8000-8002"])
    assert not p.allows("udp", "1.2.3.4", 8001)
    assert p.allows("udp", "1.2.3.4", 8003)


@pytest.mark.parametrize("spec", ["nonsense", "10.0.0.0/33", "[::1", ":::1", "fd00::/129",
                                  "[::1]x", "1.2.3.4:0", "1.2.3.4:70000", "1.2.3.4:9-8",
                                  "1.2.3.4:x"])
def test_bad_rules_are_usage_errors(spec):
    with pytest.raises(UsageError):
        Policy(deny=[spec])


def test_parse_forward():
    assert parse_forward("tcp:8080:80") == Forward("tcp", "127.0.0.1", 8080, 80)
    assert parse_forward("UDP:0.0.0.0:5353:53") == Forward("udp", "0.0.0.0", 5353, 53)


@pytest.mark.parametrize("spec", ["tcp:80", "sctp:1:2", "tcp:host:1:2", "tcp:1:2:3:4", "udp:0:53",
                                  "udp:1:65536"])
def test_bad_forwards_are_usage_errors(spec):
    with pytest.raises(UsageError):
        parse_forward(spec)


def test_net_run_options_become_config_and_policy():
    from voidbox.net.run import config_from_options

    config, policy = config_from_options(
        mtu=1400, forwards=["udp:5353:53"], deny=["127.0.0.1:22"],
        dns_upstreams=["127.0.0.53", "127.0.0.1:5353"])
    assert config.mtu == 1400
    assert config.forwards == [Forward("udp", "127.0.0.1", 5353, 53)]
    assert config.dns_upstreams == [("127.0.0.53", 53), ("127.0.0.1", 5353)]
    assert not policy.allows("tcp", "127.0.0.1", 22)


@pytest.mark.parametrize("kwargs", [{"mtu": 100}, {"mtu": 70000}, {"dns_upstreams": ["x"]},
                                    {"dns_upstreams": ["1.2.3.4:0"]}, {"forwards": ["tcp:1"]}])
def test_bad_net_run_options_are_usage_errors(kwargs):
    from voidbox.net.run import config_from_options

    with pytest.raises(UsageError):
        config_from_options(**kwargs)


# Defect 12: a port, port range, MTU, count or rate is plain decimal digits. Python's int()
# and float() also take '+80', ' 80', '8_0', '８０' (fullwidth digits), 'nan' and 'inf'.

LOOSE_NUMBERS = ["+80", "8_0", " 80", "80 ", "\t80", "80\n", "８０", "0x50", "80.0", "-80", ""]


@pytest.mark.parametrize("port", LOOSE_NUMBERS)
def test_rule_ports_are_plain_decimal(port):
    with pytest.raises(UsageError):
        parse_rule(f"1.2.3.4:{port}", allow=False)
    with pytest.raises(UsageError):
        parse_rule(f"1.2.3.4:70-{port}", allow=False)
    with pytest.raises(UsageError):
        parse_rule(f"1.2.3.4:22,{port}", allow=False)


@pytest.mark.parametrize("port", LOOSE_NUMBERS)
def test_forward_ports_are_plain_decimal(port):
    with pytest.raises(UsageError):
        parse_forward(f"tcp:{port}:80")
    with pytest.raises(UsageError):
        parse_forward(f"udp:127.0.0.1:5353:{port}")


def test_plain_decimal_ports_still_parse():
    assert parse_rule("1.2.3.4:0080,1-65535", allow=True).ports == ((80, 80), (1, 65535))
    assert parse_forward("tcp:0.0.0.0:65535:1") == Forward("tcp", "0.0.0.0", 65535, 1)


@pytest.mark.parametrize("kwargs", [
    *({"mtu": text} for text in ["1_500", "+1500", " 1500", "1500 ", "1500.0", "１５００", "nan"]),
    *({"dns_upstreams": [f"1.2.3.4:{port}"]} for port in LOOSE_NUMBERS),
    *({"max_flows": text} for text in ["0", "-1", "1_0", "+5", " 5", "5.0", "nan", "inf", "", "9" * 5000]),
    *({"max_conn_rate": text} for text in ["nan", "NaN", "inf", "-inf", "Infinity", "0", "0.0", "-1",
                                           "1e3", "+5", "1_0", " 5", "5.", ".5", "", "9" * 400]),
    {"max_conn_rate": float("nan")}, {"max_conn_rate": float("inf")}, {"max_conn_rate": 0.0},
])
def test_loose_numbers_in_net_run_options_are_usage_errors(kwargs):
    from voidbox.net.run import config_from_options

    with pytest.raises(UsageError) as error:
        config_from_options(**kwargs)
    assert "\n" not in str(error.value)


def test_plain_decimal_net_run_numbers_still_parse():
    from voidbox.net.run import config_from_options

    config, _ = config_from_options(mtu="1400", max_flows="7", max_conn_rate="2.5",
                                    dns_upstreams=["1.2.3.4:5353"])
    assert (config.mtu, config.max_flows, config.max_conn_rate) == (1400, 7, 2.5)
    assert config.dns_upstreams == [("1.2.3.4", 5353)]
    config, _ = config_from_options(max_conn_rate="100")
    assert config.max_conn_rate == 100.0
    # Python callers may pass numbers.
    config, _ = config_from_options(mtu=9000, max_flows=3, max_conn_rate=0.5)
    assert (config.mtu, config.max_flows, config.max_conn_rate) == (9000, 3, 0.5)
    config, _ = config_from_options()
    assert (config.mtu, config.max_flows, config.max_conn_rate) == (1500, 65536, None)


# Defect 2 (parsing): two forwards of one protocol may not share a host port. 0.0.0.0 binds
# every address, so it collides with any address on the same port.

@pytest.mark.parametrize("forwards", [
    ["tcp:8080:80", "tcp:8080:80"],
    ["tcp:8080:80", "tcp:127.0.0.1:8080:81"],
    ["udp:0.0.0.0:5353:53", "udp:127.0.0.1:5353:54"],
    ["udp:127.0.0.2:5353:53", "UDP:0.0.0.0:5353:54"],
    ["tcp:0.0.0.0:80:80", "tcp:0.0.0.0:80:81"],
    ["tcp:1000:1", "udp:1000:1", "tcp:2000:2", "tcp:1000:3"],
])
def test_forwards_sharing_a_host_port_are_usage_errors(forwards):
    from voidbox.net.run import config_from_options

    with pytest.raises(UsageError) as error:
        config_from_options(forwards=forwards)
    assert "\n" not in str(error.value)


def test_forwards_on_distinct_host_ports_are_fine():
    from voidbox.net.run import config_from_options

    forwards = ["tcp:8080:80", "udp:8080:80", "tcp:127.0.0.2:8080:80", "tcp:8081:80",
                "udp:0.0.0.0:5353:53"]
    config, _ = config_from_options(forwards=forwards)
    assert [f.host_port for f in config.forwards] == [8080, 8080, 8080, 8081, 5353]


# ---- the host is closed by default -----------------------------------------------------------

FIB_TRIE_SAMPLE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 192.0.2.5
        /32 host LOCAL
     |-- 192.0.2.255
        /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 192.0.2.5
        /32 host LOCAL
"""


def test_host_addresses_are_the_local_routes_outside_loopback():
    assert host_addresses(FIB_TRIE_SAMPLE) == ("192.0.2.5",)
    assert all(not a.startswith("127.") for a in host_addresses())


def test_by_default_the_guest_reaches_neither_the_hosts_loopback_nor_its_addresses():
    p = Policy(host_addrs=("192.0.2.5",))
    assert not p.allows("tcp", "127.0.0.1", 5432, guest_dst="10.0.2.2")
    assert not p.allows("udp", "127.0.0.53", 53, guest_dst="10.0.2.2")
    assert not p.allows("tcp", "192.0.2.5", 2375)  # a Docker API on the host's own address
    assert not p.allows("tcp", "169.254.169.254", 80)  # cloud metadata
    assert p.allows("tcp", "198.51.100.7", 443)  # the rest of the world
    # A broad allow does not open the host; a narrower one opens exactly what it names.
    p = Policy(allow=["0.0.0.0/0"], host_addrs=("192.0.2.5",))
    assert not p.allows("tcp", "127.0.0.1", 80, guest_dst="10.0.2.2")
    assert not p.allows("tcp", "192.0.2.5", 80)
    p = Policy(allow=["10.0.2.2:8080", "192.0.2.5:22"], host_addrs=("192.0.2.5",))
    assert p.allows("tcp", "127.0.0.1", 8080, guest_dst="10.0.2.2")
    assert not p.allows("tcp", "127.0.0.1", 8081, guest_dst="10.0.2.2")
    assert p.allows("tcp", "192.0.2.5", 22) and not p.allows("tcp", "192.0.2.5", 23)


def test_host_loopback_opens_the_host_and_a_deny_still_narrows_it():
    p = Policy(host_loopback=True, host_addrs=("192.0.2.5",))
    assert p.allows("tcp", "127.0.0.1", 80, guest_dst="10.0.2.2")
    assert p.allows("tcp", "192.0.2.5", 80)
    assert not p.allows("tcp", "169.254.169.254", 80)  # metadata stays closed
    p = Policy(host_loopback=True, deny=["10.0.2.2:22"])
    assert not p.allows("tcp", "127.0.0.1", 22, guest_dst="10.0.2.2")


def test_the_cli_options_carry_host_loopback():
    _config, policy = config_from_options()
    assert not policy.host_loopback
    _config, policy = config_from_options(host_loopback=True)
    assert policy.host_loopback
