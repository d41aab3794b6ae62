"""`voidbox net run --pcap FILE --pcap-max-bytes N`: what reaches run_in_netns, what is
refused. The real entry point runs in-process with run_in_netns replaced by a recorder."""

import pytest

from voidbox import launch
from voidbox.net import run as net_run_module
from voidbox.net.pcap import DEFAULT_MAX_BYTES, PcapSpec


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(*args) -> (status, stdout, stderr, keyword arguments of each run_in_netns call)."""

    def run(*args):
        calls = []
        monkeypatch.setattr(net_run_module, "run_in_netns",
                            lambda argv, config, **kwargs: calls.append(kwargs) or 0)
        with pytest.raises(SystemExit) as exit_info:
            launch.main(["net", "run", *args])
        out, err = capsys.readouterr()
        code = exit_info.value.code
        return (0 if code is None else code), out, err, calls

    return run


def test_no_capture_by_default(cli):
    status, _, _, [kwargs] = cli("true")
    assert status == 0 and kwargs["pcap"] is None


def test_pcap_with_the_default_bound(cli):
    status, _, _, [kwargs] = cli("--pcap", "/tmp/x.pcap", "--", "true")
    assert status == 0
    assert kwargs["pcap"] == PcapSpec("/tmp/x.pcap", DEFAULT_MAX_BYTES)


def test_pcap_max_bytes_is_plain_decimal(cli):
    _, _, _, [kwargs] = cli("--pcap", "x.pcap", "--pcap-max-bytes", "2000", "true")
    assert kwargs["pcap"] == PcapSpec("x.pcap", 2000)


@pytest.mark.parametrize("args, message", [
    (["--pcap", "x.pcap", "--pcap-max-bytes", "1_000"],
     "bad --pcap-max-bytes '1_000': expected a decimal number"),
    (["--pcap", "x.pcap", "--pcap-max-bytes", "+2000"],
     "bad --pcap-max-bytes '+2000': expected a decimal number"),
    (["--pcap", "x.pcap", "--pcap-max-bytes", "64MiB"],
     "bad --pcap-max-bytes '64MiB': expected a decimal number"),
    (["--pcap", "x.pcap", "--pcap-max-bytes", "23"], "--pcap-max-bytes 23 must be at least 24"),
    (["--pcap-max-bytes", "2000"], "--pcap-max-bytes needs --pcap FILE"),
    (["--pcap", ""], "--pcap needs a file name"),
])
def test_bad_pcap_options_are_one_line_usage_errors(cli, args, message):
    status, _, err, calls = cli(*args, "true")
    assert status == 2
    assert err == f"voidbox: error: {message}\n"
    assert calls == []


def test_help_names_the_default_bound_and_the_cost(cli):
    status, out, _, _ = cli("--help")
    assert status == 0
    text = " ".join(out.split())
    assert f"(default {DEFAULT_MAX_BYTES}, 64 MiB)" in text
    assert "Captures slow bulk TCP" in text


def test_unwritable_pcap_is_one_line_before_the_command_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["net", "run", "--pcap", str(tmp_path / "missing" / "x.pcap"),
                     "--", "touch", str(marker)])
    assert exit_info.value.code == 1
    _, err = capsys.readouterr()
    assert err == (f"voidbox: error: cannot write pcap {tmp_path}/missing/x.pcap: "
                   "No such file or directory\n")
    assert not marker.exists()
