"""`voidbox boot`'s network options: the same NAT option table as `net run`, parsed the
same strict way, and every mistake a one-line usage error (exit 2) before any VM exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.unit.test_launch import click_params
from voidbox.options import BOOT_OPTIONS, NAT_OPTIONS, parse_boot_fast


def voidbox(*args):
    return subprocess.run([sys.executable, "-m", "voidbox", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("args,message", [
    (["--net", "tap"], "bad --net 'tap'"),
    (["--net", "slirp:x"], "bad --net 'slirp:x'"),
    (["--net", "tap:averyveryverylongname"], "bad --net"),
    (["--net-fallback", "maybe"], "bad --net-fallback 'maybe': expected slirp or fail"),
    (["--net", "tap:tap0", "--forward", "tcp:8080:80"], "need a --net slirp card"),
    (["--net", "none", "--net", "slirp"], "--net none cannot be combined"),
    (["--net", "none", "--forward", "tcp:8080:80"], "need a --net slirp card"),
    (["--mac", "01:00:00:00:00:01"], "multicast"),
    (["--mac", "02:00:00:00:00"], "bad --mac"),
    (["--mtu", "1_500"], "--mtu"),
    (["--max-conn-rate", "nan"], "--max-conn-rate"),
    (["--forward", "udp:+80:53"], "port"),
    (["--forward", "tcp:8080:80", "--forward", "tcp:8080:81"], "both take tcp port 8080"),
    (["--deny", "10.0.2.0/33"], "10.0.2.0/33"),
    (["--pcap-max-bytes", "100"], "--pcap-max-bytes needs --pcap"),
    (["--net", "slirp", "--net", "slirp", "--net", "slirp", "--net", "slirp", "--net", "slirp"],
     "at most 4 network cards"),
])
def test_bad_network_options_are_one_line_usage_errors(args, message):
    result = voidbox("boot", "--kernel", sys.executable, *args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def test_boot_and_net_run_share_the_nat_option_table():
    boot_flags = {o.flag for o in BOOT_OPTIONS}
    assert {o.flag for o in NAT_OPTIONS} <= boot_flags
    from voidbox.cli import cli

    run = cli.commands["net"].commands["run"]
    run_flags = {opt for p in run.params for opt in (*p.opts, *p.secondary_opts)}
    # An on/off switch ('--x/--no-x') is two spellings of one click option.
    nat_flags = {spelling for o in NAT_OPTIONS for spelling in (o.switch or (o.flag,))}
    assert nat_flags <= run_flags


@pytest.mark.parametrize("argv", [
    ["--kernel", "k", "--net", "slirp", "--net", "slirp", "--mac", "02:00:00:00:00:01"],
    ["--kernel", "k", "--forward", "tcp:8080:80", "--forward=udp:5353:53", "--deny", "10.0.0.0/8"],
    ["--kernel", "k", "--net", "none"],
    ["--kernel", "k", "--net", "tap:tap0", "--net", "slirp", "--net-fallback", "fail"],
    ["--kernel", "k", "--no-ipv6", "--no-sandbox", "--net-isolation", "none"],
])
def test_repeated_options_take_the_fast_path_and_agree_with_click(argv):
    fast = parse_boot_fast(argv)
    assert fast is not None and fast == click_params(argv)


def test_default_is_one_slirp_card():
    assert parse_boot_fast(["--kernel", "k"])["net"] == ("slirp",)


def test_tap_cards_are_configured_in_order_with_the_fallback():
    from voidbox.config import VmConfig

    config = VmConfig(kernel=sys.executable, net=["tap:tap0", "slirp"], net_fallback="fail",
                      mac="02:00:00:00:00:10")
    assert config.nics == [("tap", "tap0", bytes.fromhex("020000000010")),
                           ("slirp", None, bytes.fromhex("020000000011"))]
    assert VmConfig(kernel=sys.executable).net_fallback == "slirp"
