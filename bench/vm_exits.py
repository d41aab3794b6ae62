"""vCPU exits handled per second through the whole VM: a tiny guest writes 20000 bytes to
an I/O port (one exit each), served by voidbox's vCPU loop, exit decoder and port bus.

    .venv/bin/python bench/vm_exits.py [--runs 5]

The same guest with the port claimed by a counting device and unclaimed (the bus's
miss path) is run; the rate is exits / (wall time from first KVM_RUN to poweroff).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EXITS = 20000  # PIO_LOOP_COUNT in tests/guests/pio_loop.c


class Counter:
    def __init__(self):
        self.writes = 0

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.writes += 1


def one_run(kernel, claimed: bool) -> float:
    from voidbox import Vm, VmConfig
    from voidbox.vm import StopReason

    vm = Vm(VmConfig(kernel=kernel, mem="64M", timeout=120))
    counter = Counter()
    if claimed:
        vm.pio_bus.register(0x510, 1, counter)
    try:
        vm.start()
        reason = vm.wait()
        ended = time.time()
    finally:
        vm.close()
    if reason is not StopReason.POWEROFF or (claimed and counter.writes != EXITS):
        raise SystemExit(f"bench guest failed: {vm.stop_message()} ({counter.writes} writes)")
    return EXITS / (ended - vm.first_run_at)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from tests.guests.build import build_guest
    from voidbox import ring  # noqa: F401 - import cost kept out of the timed region

    kernel = str(build_guest("pio_loop", tempfile.mkdtemp(prefix="voidbox-bench-")))
    print(f"runs: {args.runs}, {EXITS} port writes each, load {os.getloadavg()[0]:.2f}")
    for claimed in (True, False):
        rates = [one_run(kernel, claimed) for _ in range(args.runs)]
        label = "port claimed by a device" if claimed else "port unclaimed (bus miss)"
        print(f"{label:<28} {statistics.median(rates) / 1000:7.1f} k exits/s "
              f"(min {min(rates) / 1000:.1f}, max {max(rates) / 1000:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
