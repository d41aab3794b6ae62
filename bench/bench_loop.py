"""The event loop alone, both twins in one run: the compiled `voidbox._loop` (epoll
dispatch in C, a timing wheel) beside the pure `voidbox._loop_py` (a heap of timers).

    .venv/bin/python bench/bench_loop.py [--quick] [--json out.json]

1. timers: call_at + cancel of N timers at random times in the next 10 minutes (a flow's
   idle or retransmission timer, armed and dropped); re-arm (cancel, call_at again: what
   a TCP flow does on every segment) over 10,000 pending timers; call_at of N timers
   already due, then one turn firing them all. Per second, median of a few rounds.
2. dispatch: K pipes kept readable (level-triggered, never read), a builtin (abs) as the
   callback of each, so that the loop's own part is what is measured;
   the cost of one turn divided by K, for K = 1, 16 and 256, and of a turn with nothing
   ready (the floor: one epoll_wait and the bookkeeping around it); in wall time and in
   user-mode CPU time (getrusage), which leaves out the kernel's part of epoll_wait, the
   same for both twins.
3. idle: the loop blocked in run() with 10,000 pending timers, for --idle seconds:
   (a) all of them an hour or more away (idle flows' keepalives), (b) spread over the
   next 10 s, each re-armed 10 s later when it fires (flows' idle sweeps coming due).
   The loop thread's CPU time (time.thread_time) per second of wall time, and its turns.

Everything is in this process, on one thread; no root. The host is shared: compare
numbers within one run only, and quote the load average printed with them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import resource
import select
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TWINS = (("cython", "voidbox._loop"), ("pure", "voidbox._loop_py"))
HORIZON = 600.0  # seconds: where the timers of the timer rounds fall
PENDING = 10_000


def noop() -> None:
    pass


def median_rate(fn, rounds: int) -> float:
    """fn() -> (operations, seconds); the median of the per-round rates."""
    return statistics.median(ops / secs for ops, secs in (fn() for _ in range(rounds)))


def bench_schedule_cancel(Loop, n: int, rounds: int) -> float:
    loop = Loop()
    rng = random.Random(1)
    offsets = [rng.random() * HORIZON for _ in range(n)]

    def one():
        now = loop.time()
        call_at = loop.call_at
        t0 = time.perf_counter()
        timers = [call_at(now + d, noop) for d in offsets]
        for t in timers:
            t.cancel()
        loop.run_once(0)  # the heap drops its cancelled entries in a turn
        return n, time.perf_counter() - t0

    try:
        return median_rate(one, rounds)
    finally:
        loop.close()


def bench_rearm(Loop, n: int, rounds: int) -> float:
    loop = Loop()
    rng = random.Random(2)
    now = loop.time()
    timers = [loop.call_at(now + rng.random() * HORIZON, noop) for _ in range(PENDING)]
    picks = [rng.randrange(PENDING) for _ in range(n)]
    offsets = [rng.random() * HORIZON for _ in range(n)]

    def one():
        base = loop.time()
        call_at = loop.call_at
        t0 = time.perf_counter()
        for i, d in zip(picks, offsets, strict=True):
            timers[i].cancel()
            timers[i] = call_at(base + d, noop)
        loop.run_once(0)
        return n, time.perf_counter() - t0

    try:
        return median_rate(one, rounds)
    finally:
        for t in timers:
            t.cancel()
        loop.close()


def bench_fire(Loop, n: int, rounds: int) -> float:
    loop = Loop()

    def one():
        now = loop.time()
        t0 = time.perf_counter()
        for i in range(n):
            loop.call_at(now - 1.0 + i * 1e-9, noop)
        loop.run_once(0)
        assert loop.timer_count() == 0
        return n, time.perf_counter() - t0

    try:
        return median_rate(one, rounds)
    finally:
        loop.close()


def bench_dispatch(Loop, k: int, turns: int, rounds: int) -> tuple[float, float]:
    """(ns, user-mode CPU ns) per ready fd in a turn (k=0: per empty turn). The kernel's
    share (epoll_wait polling each level-triggered fd again) is the same for both twins:
    the user-mode time is the loop's own."""
    loop = Loop()
    fds = [os.pipe() for _ in range(k)]
    for r, w in fds:
        os.write(w, b"x")
        # A builtin as the callback: what is measured is the loop's part of a dispatch.
        loop.watch(r, select.EPOLLIN, abs)
    samples = []
    try:
        for _ in range(rounds):
            run_once = loop.run_once
            u0 = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
            t0 = time.perf_counter()
            for _ in range(turns):
                run_once(0)
            wall = time.perf_counter() - t0
            user = resource.getrusage(resource.RUSAGE_THREAD).ru_utime - u0
            events = turns * max(k, 1)
            samples.append((1e9 * wall / events, 1e9 * user / events))
        return (statistics.median(w for w, _ in samples),
                statistics.median(u for _, u in samples))
    finally:
        for r, w in fds:
            loop.unwatch(r)
            os.close(r)
            os.close(w)
        loop.close()


def bench_idle(Loop, spread: bool, seconds: float) -> dict:
    loop = Loop()
    rng = random.Random(3)
    now = loop.time()
    fired = [0]

    def rearm():
        fired[0] += 1
        loop.call_at(loop.time() + 10.0, rearm)

    for _ in range(PENDING):
        if spread:
            loop.call_at(now + rng.random() * 10.0, rearm)
        else:
            loop.call_at(now + 3600.0 + rng.random() * 7200.0, noop)
    turns = [0]
    end = now + seconds
    cpu0, wall0 = time.thread_time(), time.monotonic()
    while loop.time() < end:
        loop.run_once(max(0.0, end - loop.time()))
        turns[0] += 1
    cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
    loop.close()
    return {"cpu_ms_per_s": 1e3 * cpu / wall, "turns_per_s": turns[0] / wall,
            "fired_per_s": fired[0] / wall}


def run(args) -> dict:
    n = 20_000 if args.quick else 100_000
    rounds = 3 if args.quick else 5
    turns = 2_000 if args.quick else 10_000
    results: dict = {}
    for name, module in TWINS:
        try:
            Loop = importlib.import_module(module).EventLoop
        except ImportError as exc:
            results[name] = {"error": f"{module} does not import: {exc}"}
            continue
        r = results[name] = {}
        r["schedule+cancel /s"] = bench_schedule_cancel(Loop, n, rounds)
        r[f"re-arm over {PENDING} pending /s"] = bench_rearm(Loop, n, rounds)
        r["fire (due timers) /s"] = bench_fire(Loop, n, rounds)
        for k in (0, 1, 16, 256):
            key = "empty turn" if k == 0 else f"dispatch per ready fd (K={k})"
            wall, user = bench_dispatch(Loop, k, max(4 * turns // max(k, 1), 400), rounds)
            r[f"{key}: ns"] = wall
            r[f"{key}: user-mode CPU ns"] = user
        for spread, label in ((False, "far"), (True, "spread")):
            idle = bench_idle(Loop, spread, args.idle)
            r[f"idle {label}: loop CPU ms/s"] = idle["cpu_ms_per_s"]
            r[f"idle {label}: turns/s"] = idle["turns_per_s"]
            if spread:
                r[f"idle {label}: timers fired/s"] = idle["fired_per_s"]
    return results


def fmt(v) -> str:
    if isinstance(v, str):
        return v
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timers, turns and rounds")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of each idle case")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    load0 = os.getloadavg()
    results = run(args)
    load1 = os.getloadavg()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"## The event loop alone ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print(f"- command: `{' '.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)}`")
    print(f"- voidbox {commit} (Python {platform.python_version()}); "
          f"{PENDING} pending timers where it says so; timers at random times in the "
          f"next {HORIZON:.0f} s")
    print(f"- CPUs: {os.cpu_count()}; load average before {load0[0]:.2f}, after {load1[0]:.2f}; "
          "other work shares this machine\n")
    names = [name for name, _ in TWINS]
    keys = []
    for name in names:
        for key in results[name]:
            if key not in keys:
                keys.append(key)
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for key in keys:
        print(f"| {key} | " + " | ".join(fmt(results[n].get(key, "n/a")) for n in names) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "load": [load0, load1], "commit": commit}, f, indent=1)


if __name__ == "__main__":
    main()
