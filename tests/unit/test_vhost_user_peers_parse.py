"""The pure helpers of bench/vhost_user_peers.py: reading the guest's console lines, the
iperf3 report, the loader's library list, and the table cells. The bench itself boots
QEMU and is not part of the test suite."""

import json

import pytest

from tests import bench_scripts


@pytest.fixture(scope="module")
def peers():
    return bench_scripts.load("vhost_user_peers.py")


# What netbench prints (bench/guest_tools/netbench.c), as the serial console delivers it.
CONNECT_LINE = ('@@NB {"op":"connect","asked":500,"n":498,"errors":2,'
                '"first_error":"read: Resource temporarily unavailable","p50_us":1474.2,'
                '"p99_us":4655.0,"min_us":900.1,"max_us":5000.0,"mean_us":1600.0,'
                '"per_s":600.0}\r')

IPERF_REPORT = {
    "start": {"test_start": {"reverse": 1}},
    "end": {"sum_sent": {"bytes": 300_000_000, "bits_per_second": 1.2e9, "retransmits": 3},
            "sum_received": {"bytes": 299_000_000, "bits_per_second": 1.1e9,
                             "seconds": 2.0}},
}


def test_netbench_line_with_cr_and_a_kernel_prefix(peers):
    msg = peers.parse_console_line("[    3.1] virtio_net: x " + CONNECT_LINE)
    assert msg["op"] == "connect" and msg["n"] == 498 and msg["p99_us"] == 4655.0


def test_other_console_output_is_ignored(peers):
    assert peers.parse_console_line("/ # sh /bench/run.sh 10.0.2.2 1 2 3") is None
    assert peers.parse_console_line("") is None


def test_iperf_line_without_whitespace(peers):
    # The guest strips all whitespace from iperf3 -J; it is still JSON.
    text = json.dumps(IPERF_REPORT).replace(" ", "")
    msg = peers.parse_console_line(f"@@NBJ down 0 {text}\r")
    assert msg == {"op": "down", "rc": 0, "ok": True, "bytes": 299_000_000,
                   "bits_per_second": 1.1e9, "seconds": 2.0, "retransmits": 3}


def test_iperf_error_and_empty_reports(peers):
    msg = peers.parse_console_line('@@NBJ up 1 {"error":"unable to connect to server"}')
    assert msg["op"] == "up" and msg["rc"] == 1 and not msg["ok"]
    assert "unable to connect" in msg["error"]
    msg = peers.parse_console_line("@@NBJ up 124 ")
    assert msg["rc"] == 124 and msg["error"] == "iperf3 gave no JSON"
    zero = {"end": {"sum_received": {"bytes": 0}}}
    assert not peers.iperf_summary(zero)["ok"]


def test_a_cut_line_is_reported_not_raised(peers):
    msg = peers.parse_console_line('@@NBJ up 0 {"end":{"sum_rec')
    assert msg["op"] == "garbled"
    assert peers.parse_console_line('@@NB {"op":"conn')["op"] == "garbled"


def test_ldso_list(peers):
    listed = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibiperf.so.0 => /r/usr/lib/x86_64-linux-gnu/libiperf.so.0 (0x00007f1)
\tlibc.so.6 => /r/lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)
\t/lib64/ld-linux-x86-64.so.2 => /r/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 (0x00007f3)
"""
    assert peers.ldso_list(listed) == {
        "libiperf.so.0": "/r/usr/lib/x86_64-linux-gnu/libiperf.so.0",
        "libc.so.6": "/r/lib/x86_64-linux-gnu/libc.so.6",
    }
    with pytest.raises(peers.BenchError, match="libsctp.so.1"):
        peers.ldso_list("\tlibsctp.so.1 => not found\n")


def test_cells_and_table(peers):
    connect = peers.parse_console_line(CONNECT_LINE)
    assert peers.cell_latency(connect) == (
        "1474 / 4655 (2 failed: read: Resource temporarily unavailable)")
    short = dict(connect, n=100, errors=0)
    assert peers.cell_latency(short) == "1474 / 4655 (stopped after 100/500)"
    up = peers.iperf_summary(IPERF_REPORT)
    assert peers.cell_rate(up) == "1.100 (3 retr)"
    sessions = [
        {"backend": "voidbox", "backend_pid": 1, "dhcp": {"ok": True, "mtu": 1500},
         "ops": {"up": dict(up, backend_cpu_s=0.598), "connect": connect}},
        {"backend": "slirp", "ops": {"up": dict(up, bits_per_second=2.2e9)}},
        {"backend": "passt-vhost-user", "error": "apt-get update failed: no network"},
    ]
    text = peers.table(sessions)
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[2].startswith("| voidbox | 1500 | 1.100 (3 retr) | n/a | 1474 / 4655")
    assert "| 2.00 / n/a |" in lines[2]  # 0.598 s over 0.299 GB
    assert "| in QEMU |" in lines[3]
    assert "unavailable: apt-get update failed: no network" in lines[4]
    assert peers.ratios(sessions) == ["- voidbox / slirp: guest->host 0.50x"]


def test_rounds_are_tabled_as_each_figures_median(peers):
    def session(up, cpu, p50, p99, ok=True):
        return {"backend": "voidbox", "backend_pid": 1, "ops": {
            "up": {"ok": ok, "bits_per_second": up, "retransmits": 0, "bytes": 2 * peers.GB,
                   "backend_cpu_s": cpu},
            "rr": {"n": 10, "asked": 10, "p50_us": p50, "p99_us": p99}}}

    rounds = [session(3e9, 2.0, 400, 900), session(1e9, 6.0, 300, 5000),
              session(2e9, 4.0, 500, 700), {"backend": "voidbox", "error": "no socket"}]
    merged = peers.median_session(rounds)
    assert merged["ops"]["up"]["bits_per_second"] == 2e9
    assert peers.cell_cpu(merged).startswith("2.00 ")  # median of 1.0, 3.0 and 2.0 s/GB
    # p50 and p99 are each their own median, not one round's pair.
    assert peers.cell_latency(merged["ops"]["rr"]) == "400 / 900"
    # A round whose throughput failed does not count towards that figure.
    failed = session(0, None, 450, 800, ok=False)
    assert peers.median_session([failed, session(1e9, 2.0, 350, 600)])["ops"]["up"][
        "bits_per_second"] == 1e9
    assert peers.median_session([{"backend": "x", "error": "e"}]) == {"backend": "x", "error": "e"}
