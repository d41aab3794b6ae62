"""Egress policy and forward specs (voidbox/net/policy.py)."""

import pytest

from voidbox.errors import UsageError
from voidbox.net.config import Forward
from voidbox.net.policy import Policy, parse_forward, parse_rule


def test_default_allows_everything_but_link_local():
    p = Policy()
    assert p.allows("tcp", "127.0.0.1", 80)
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


@pytest.mark.parametrize("spec", ["nonsense", "10.0.0.0/33", "::1", "1.2.3.4:0", "1.2.3.4:70000",
                                  "1.2.3.4:9-8", "1.2.3.4:x"])
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
