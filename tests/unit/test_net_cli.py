"""`voidbox net run`'s command line: what is voidbox's, what is CMD's, and what is refused.

Most cases run the real entry point (voidbox.launch.main) in-process with run_in_netns
replaced by a recorder, so nothing here makes a namespace unless it is marked netns.
"""

import os
import subprocess
import sys

import pytest

from voidbox import launch
from voidbox.net import run as net_run_module

VOIDBOX = [sys.executable, "-m", "voidbox"]


class Recorder:
    """Stands in for run_in_netns: remembers what it was asked to run."""

    def __init__(self):
        self.calls = []

    def __call__(self, argv, config, **kwargs):
        self.calls.append((argv, config, kwargs))
        return 0


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(*args) -> (status, stdout, stderr, calls to run_in_netns)."""

    def run(*args):
        recorder = Recorder()
        monkeypatch.setattr(net_run_module, "run_in_netns", recorder)
        with pytest.raises(SystemExit) as exit_info:
            launch.main(["net", "run", *args])
        out, err = capsys.readouterr()
        code = exit_info.value.code
        return (0 if code is None else code), out, err, recorder.calls

    return run


# Defect 5: everything from the first non-option word on belongs to CMD.

@pytest.mark.parametrize("args", [
    ["ls", "-h", "."],
    ["sh", "-c", 'echo "$@"', "x", "--mtu", "1400"],
    ["curl", "--max-flows", "5", "http://10.0.2.2:8000/"],
    ["env", "--help"],
    ["true", "--", "--deny", "0.0.0.0/0"],
])
def test_options_after_the_command_are_the_commands(cli, args):
    status, out, _, calls = cli(*args)
    assert status == 0
    assert "Usage:" not in out
    [(argv, config, _)] = calls
    assert argv == args
    assert config.mtu == 1500
    assert config.max_flows == 65536


def test_voidbox_options_before_the_command_are_voidboxs(cli):
    status, _, _, calls = cli("--mtu", "1400", "--max-flows", "7", "sh", "-c", "true", "--mtu")
    assert status == 0
    [(argv, config, _)] = calls
    assert argv == ["sh", "-c", "true", "--mtu"]
    assert (config.mtu, config.max_flows) == (1400, 7)


@pytest.mark.parametrize("args, command", [
    (["--", "sh", "-c", "true"], ["sh", "-c", "true"]),
    (["--mtu", "1400", "--", "ls", "-h"], ["ls", "-h"]),
    (["--", "--weird-name", "-x"], ["--weird-name", "-x"]),
    (["--", "--", "x"], ["--", "x"]),
])
def test_double_dash_still_ends_voidboxs_options(cli, args, command):
    status, _, _, calls = cli(*args)
    assert status == 0
    [(argv, _, _)] = calls
    assert argv == command


def test_help_is_still_voidboxs_before_the_command(cli):
    status, out, _, calls = cli("--help")
    assert status == 0
    assert "Usage: voidbox net run" in out
    assert not calls


@pytest.mark.netns
def test_real_namespace_gets_the_commands_options():
    shell = subprocess.run([*VOIDBOX, "net", "run", "sh", "-c", 'echo "$@"', "x", "--mtu", "1400"],
                           capture_output=True, text=True, timeout=60)
    assert (shell.returncode, shell.stdout) == (0, "--mtu 1400\n"), shell.stderr
    listing = subprocess.run([*VOIDBOX, "net", "run", "ls", "-h", "/"],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "Usage:" not in listing.stdout
    assert set(listing.stdout.split()) >= {name for name in os.listdir("/") if not name.startswith(".")}


# Defect 4: an unknown option before the command is a usage error, not the command.

@pytest.mark.parametrize("args, option", [
    (["--dney", "10.0.0.0/8", "--", "true"], "--dney"),
    (["-x", "--", "true"], "-x"),
    (["--bogus-flag", "true"], "--bogus-flag"),
    (["--mtu", "1400", "--bogus-flag=1", "true"], "--bogus-flag"),
])
def test_unknown_options_are_usage_errors(cli, args, option):
    status, out, err, calls = cli(*args)
    assert status == 2
    assert not calls
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("voidbox: error: ") and option in err


def test_unknown_option_exits_2_from_the_real_entry_point():
    result = subprocess.run([*VOIDBOX, "net", "run", "--dney", "10.0.0.0/8", "--", "true"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "--dney" in result.stderr


# Defect 12: numbers on the command line are plain decimal, rates finite and positive.

@pytest.mark.parametrize("args, word", [
    (["--max-conn-rate", "nan"], "nan"),
    (["--max-conn-rate", "inf"], "inf"),
    (["--max-conn-rate", "0"], "--max-conn-rate"),
    (["--mtu", "1_500"], "1_500"),
    (["--mtu", "+1500"], "+1500"),
    (["--max-flows", "1_000"], "1_000"),
    (["--max-flows", "0"], "--max-flows"),
    (["--forward", "tcp:+8080:80"], "+8080"),
    (["--forward", "tcp:8_0:80"], "8_0"),
    (["--allow", "10.0.0.0/8: 80"], " 80"),
    (["--deny", "10.0.0.0/8:80-+90"], "+90"),
    (["--dns-upstream", "127.0.0.1:5_3"], "5_3"),
])
def test_loose_numbers_are_usage_errors(cli, args, word):
    status, out, err, calls = cli(*args, "--", "true")
    assert status == 2
    assert not calls
    assert len(err.splitlines()) == 1
    assert err.startswith("voidbox: error: ") and word in err


@pytest.mark.parametrize("option", ["--max-flows", "--pcap-max-bytes"])
def test_a_number_too_large_to_read_says_so(cli, option):
    """Not "must be at least 1": the number has more digits than any limit needs."""
    extra = ["--pcap", "x.pcap"] if option == "--pcap-max-bytes" else []
    status, _, err, calls = cli(*extra, option, "9" * 30, "--", "true")
    assert status == 2 and not calls
    assert err == f"voidbox: error: {option} {'9' * 20}... is too large\n"


def test_an_empty_command_name_is_one_line():
    result = subprocess.run([*VOIDBOX, "net", "run", "--", ""], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "voidbox: error: no command given\n"


# Defect 2 (parsing): duplicate --forward host ports are a usage error.

def test_duplicate_forwards_are_usage_errors(cli):
    status, _, err, calls = cli("--forward", "udp:5300:53", "--forward", "udp:0.0.0.0:5300:54",
                                "--", "true")
    assert status == 2
    assert not calls
    assert len(err.splitlines()) == 1 and "5300" in err


# Defect 1 (help text): --help says which destination an --allow/--deny rule matches.

def test_help_says_rules_match_the_guest_visible_or_the_translated_destination(cli):
    status, out, _, _ = cli("--help")
    assert status == 0
    text = " ".join(out.split())
    for fact in ["the address the guest sees", "10.0.2.2 = the gateway", "10.0.2.3 = DNS",
                 "the translated host destination", "10.0.2.2 -> 127.0.0.1",
                 "the most specific rule matching either wins",
                 "--deny 10.0.2.2 keeps the command off the host's loopback"]:
        assert fact in text, fact
