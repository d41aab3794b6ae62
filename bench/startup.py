"""Start-up: `voidbox boot` of a trivial tiny guest beside QEMU microvm running a trivial
firmware to exit, in the same run on the same machine. The guest has the default network
card; voidbox is timed with its NAT in a child process (the default) and in the VMM
(--net-isolation none).

    .venv/bin/python bench/startup.py [--runs 20]

For each: wall ms from spawn to exit, CPU ms (user+sys) and peak RSS of the process
(wait4), and for voidbox the wall ms from spawn to its first KVM_RUN. Both VMs get 64 MiB.
On a host whose KVM is software-only (kvm_pvm) closing the VM fd alone takes ~19 ms of
voidbox's wall time (the kernel tearing the VM down; QEMU pays it at exit too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(argv, env=None):
    """Spawn argv; return (wall_s, cpu_s, maxrss_kib, status, stderr, spawn_time)."""
    err = tempfile.TemporaryFile()
    spawned = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, proc.returncode, err.read().decode(), spawned


def firmware(path):
    """A 64 KiB BIOS whose reset vector writes 0 to isa-debug-exit (port 0xf4) and halts."""
    mov_al_0, out_f4, hlt = b"\xb0\x00", b"\xe6\xf4", b"\xf4"
    bios = bytearray(hlt * 0x10000)
    bios[0xFFF0 : 0xFFF5] = mov_al_0 + out_f4 + hlt
    with open(path, "wb") as handle:
        handle.write(bios)


def summarize(name, samples):
    def med(index, scale=1000.0):
        return statistics.median(s[index] for s in samples) * scale

    print(f"{name:<34} wall {med(0):7.1f} ms  cpu {med(1):6.1f} ms  rss {med(2, 1) / 1024:6.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--voidbox", help="the voidbox command to time (default: this tree's venv); "
                        "e.g. one installed from a wheel, without the editable-install hook")
    args = parser.parse_args()
    from tests.guests.build import build_guest

    work = tempfile.mkdtemp(prefix="voidbox-bench-")
    guest = str(build_guest("hello", work))
    voidbox = [args.voidbox or os.path.join(os.path.dirname(sys.executable), "voidbox")]
    if not os.path.exists(voidbox[0]):
        voidbox = [sys.executable, "-m", "voidbox"]
    # An installed wheel has its bytecode compiled; so must this tree, or every run
    # measures the compiler.
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "voidbox")], check=True,
                   stdout=subprocess.DEVNULL)
    env = dict(os.environ, VOIDBOX_TRACE_STARTUP="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    boot = ["boot", "--accel", "kvm", "--kernel", guest, "--mem", "64M", "--timeout", "30"]
    commands = {"voidbox": ([*voidbox, *boot], env)}
    # The card's NAT inside the VMM (--net-isolation none) beside the default, where it is a
    # child process that starts beside the VM: what the isolation costs at start-up.
    commands["in-process"] = ([*voidbox, *boot, "--net-isolation", "none"], env)
    # Without site: the editable install's import hook (setuptools' finder, which imports
    # pathlib, re and importlib.util) is a development-tree cost an installed wheel does not
    # pay; this row shows voidbox without it (and without site's own ~2 ms).
    if not args.voidbox:
        commands["bare"] = ([sys.executable, "-S", "-m", "voidbox", *boot], dict(env, PYTHONPATH=ROOT))
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        bios = os.path.join(work, "exit.bios")
        firmware(bios)
        commands["qemu"] = ([qemu, "-M", "microvm", "-enable-kvm", "-m", "64M", "-nodefaults",
                             "-no-user-config", "-display", "none", "-bios", bios, "-device",
                             "isa-debug-exit,iobase=0xf4,iosize=4"], None)
    # Interleaved, one of each per round: load from elsewhere on the host falls on all alike.
    samples = {name: [] for name in commands}
    first_runs = []
    for _ in range(args.runs):
        for name, (argv, run_env) in commands.items():
            sample = run(argv, run_env)
            if name != "qemu" and sample[3] != 0:
                print(f"{name} failed:", sample[4], file=sys.stderr)
                return 1
            samples[name].append(sample)
            if name == "voidbox":
                for line in sample[4].splitlines():
                    if "first-kvm-run" in line:
                        first_runs.append(float(line.split()[-1]) - sample[5])
    print(f"runs: {args.runs}, python {sys.version.split()[0]}, {os.uname().release}, "
          f"voidbox {voidbox[0]}, load {os.getloadavg()[0]:.2f}")
    summarize("voidbox boot (tiny guest)", samples["voidbox"])
    if first_runs:
        print(f"{'voidbox: spawn -> first KVM_RUN':<34} wall {statistics.median(first_runs) * 1000:7.1f} ms")
    summarize("voidbox boot --net-isolation none", samples["in-process"])
    if "bare" in samples:
        summarize("voidbox boot, python -S (no hook)", samples["bare"])
    if "qemu" in samples:
        summarize("qemu microvm (trivial firmware)", samples["qemu"])

        def median(name, index):
            return statistics.median(s[index] for s in samples[name])

        for name, label in (("voidbox", "voidbox"), ("in-process", "voidbox --net-isolation none"),
                            ("bare", "voidbox (python -S)")):
            if name in samples:
                print(f"{label} / qemu: wall {median(name, 0) / median('qemu', 0):.2f}x, "
                      f"cpu {median(name, 1) / median('qemu', 1):.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
