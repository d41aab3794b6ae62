"""bench/net_compare.py --rounds: one table of medians from several rounds. The bench
itself needs root and the peers; its median is pure and tested here."""

import pytest

from tests import bench_scripts


@pytest.fixture(scope="module")
def nc():
    return bench_scripts.load("net_compare.py")


def session(p50, cpu_s, gbps, up_cpu_s, busy=50.0):
    latency = {"ok": True, "n": 1000, "asked": 1000, "errors": 0, "p50_us": p50,
               "p99_us": 2 * p50, "per_s": 1e6 / p50, "nat_cpu_s": cpu_s}
    up = {"ok": True, "bytes": 5e9, "bits_per_second": gbps * 1e9, "seconds": 5.0,
          "retransmits": 0, "stalled_s": 0, "nat_cpu_s": up_cpu_s}
    return {"peer": "voidbox", "mtu": 1500, "connect": dict(latency), "rr": dict(latency),
            "up": up, "host_busy_pct": busy}


def test_each_figure_is_the_median_of_the_rounds(nc):
    rounds = [session(300, 0.30, 9.0, 4.0, 80), session(200, 0.25, 11.0, 3.0, 60),
              session(250, 0.50, 10.0, 5.0, 70)]
    merged = nc.median_session(rounds)
    assert merged["connect"]["p50_us"] == 250 and merged["connect"]["p99_us"] == 500
    # CPU per operation is taken per round, then the median: 300 µs, not 0.30 s of the last.
    assert nc.cpu_us_per_op(merged["connect"]) == pytest.approx(300)
    assert merged["up"]["bits_per_second"] == 10e9
    assert nc.iperf_cpu_per_gb(merged["up"]) == pytest.approx(0.8)  # 4 s for 5 GB
    assert nc.iperf_core_pct(merged["up"]) == pytest.approx(80)
    assert merged["host_busy_pct"] == 70
    row = {name: cell(merged) for name, cell in nc.ROWS}
    assert row["connect+echo+close p50 / p99 µs"] == "250 / 500"
    assert row["NAT CPU µs per connection"] == "300"
    assert row["ns->host NAT CPU s/GB"] == "0.80 (80% core)"


def test_a_failed_round_is_left_out_and_all_failed_is_the_last(nc):
    failed = {"peer": "voidbox", "mtu": 1500, "error": "NAT did not start"}
    merged = nc.median_session([failed, session(200, 0.2, 9.0, 4.0)])
    assert merged["connect"]["p50_us"] == 200 and "error" not in merged
    assert nc.median_session([failed, failed]) == failed
