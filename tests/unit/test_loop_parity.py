"""Twin parity for the event loop's timers: voidbox._loop (a timing wheel) and its pure
twin voidbox._loop_py (a heap), each on a fake clock, fed the same random sequences of
schedule, cancel and clock moves, fire the same timers in the same turns in the same
order and count the same pending timers after every step.

Times are drawn where a wheel can go wrong: ties, sub-millisecond differences, the edges
of a tick and of every level's slot (64 ms, 4.096 s, 262.144 s, ...), the past, and far
jumps that move timers down several levels at once. Timer callbacks schedule more timers
(some due at once, which fire in the same turn), cancel others (some already due in this
turn), and raise. Under VOIDBOX_PURE=1 there is no compiled side, and every test skips.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import voidbox._loop_py as pure
from tests.twins import load_compiled

BASE = 1000.0  # a monotonic-looking reading
TICK = 0.001
LEVEL_SPANS = [TICK * 64 ** level for level in range(1, 6)]  # 64 ms .. ~34 years
EXAMPLES = int(os.environ.get("VOIDBOX_LOOP_EXAMPLES", "300"))  # more for a long soak


@pytest.fixture(scope="module")
def compiled():
    return load_compiled("voidbox._loop")


class Clock:
    def __init__(self):
        self.now = BASE

    def __call__(self) -> float:
        return self.now


# A delay: ties and tick edges near zero, level edges, sub-tick offsets, the past.
edges = st.sampled_from([0.0, TICK, TICK / 2, TICK - 1e-9, 2 * TICK] + LEVEL_SPANS
                        + [span - TICK for span in LEVEL_SPANS] + [span + TICK for span in LEVEL_SPANS])
delays = st.one_of(
    edges,
    st.floats(min_value=-1.0, max_value=0.0),
    st.floats(min_value=0.0, max_value=0.2),
    st.floats(min_value=0.0, max_value=600.0),
    st.floats(min_value=0.0, max_value=1e7),
    st.integers(min_value=0, max_value=300).map(lambda n: n * TICK),
)
steps = st.one_of(edges, st.floats(min_value=0.0, max_value=0.01),
                  st.floats(min_value=0.0, max_value=5.0), st.floats(min_value=0.0, max_value=1e7))

# What a timer does when it fires.
actions = st.one_of(
    st.just(("nothing",)),
    st.tuples(st.just("schedule"), delays),  # relative to the clock when it fires
    st.tuples(st.just("cancel"), st.integers(min_value=0, max_value=63)),
    st.just(("raise",)),
)
ops = st.lists(st.one_of(
    st.tuples(st.just("at"), delays, actions),
    st.tuples(st.just("cancel"), st.integers(min_value=0, max_value=63)),
    st.tuples(st.just("advance"), steps),
    st.tuples(st.just("turn"),),
), max_size=60)


class Driver:
    """One twin on a fake clock; records (turn, label) for every firing."""

    def __init__(self, module, debug: bool):
        self.clock = Clock()
        self.loop = module.EventLoop(debug=debug, clock=self.clock)
        self.timers: list = []  # by label
        self.fired: list = []
        self.turn = 0

    def schedule(self, when: float, action) -> None:
        label = len(self.timers)
        self.timers.append(self.loop.call_at(when, lambda: self.fire(label, action)))

    def fire(self, label: int, action) -> None:
        self.fired.append((self.turn, label))
        kind = action[0]
        if kind == "schedule":
            self.schedule(self.clock.now + action[1], ("nothing",))
        elif kind == "cancel" and self.timers:
            self.timers[action[1] % len(self.timers)].cancel()
        elif kind == "raise":
            raise RuntimeError(f"timer {label}")

    def step(self, op) -> None:
        kind = op[0]
        if kind == "at":
            self.schedule(self.clock.now + op[1], op[2])
        elif kind == "cancel" and self.timers:
            self.timers[op[1] % len(self.timers)].cancel()
        elif kind in ("advance", "turn"):
            if kind == "advance":
                self.clock.now += op[1]
            self.turn += 1
            try:
                self.loop.run_once(0)
            except RuntimeError as exc:
                self.fired.append((self.turn, str(exc)))

    def state(self):
        return (self.fired, self.loop.timer_count(), [t.cancelled for t in self.timers],
                [t.when for t in self.timers], self.loop.errors)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, debug=st.booleans())
def test_both_twins_fire_the_same_timers_in_the_same_turns_and_order(compiled, ops, debug):
    a, b = Driver(pure, debug), Driver(compiled, debug)
    try:
        for i, op in enumerate(ops):
            a.step(op)
            b.step(op)
            assert a.state() == b.state(), f"after step {i} {op}"
        # Then run both to the end: every pending timer fires, in the same order.
        for _ in range(4 * len(ops) + 8):
            if not a.loop.timer_count() and not b.loop.timer_count():
                break
            pending = [t.when for t in a.timers if not t.cancelled]
            if pending:
                a.clock.now = b.clock.now = max(a.clock.now, min(pending))
            a.step(("turn",))
            b.step(("turn",))
            assert a.state() == b.state()
        assert a.loop.timer_count() == b.loop.timer_count() == 0
    finally:
        a.loop.close()
        b.loop.close()


@settings(max_examples=EXAMPLES, deadline=None)
@given(whens=st.lists(st.one_of(delays, steps), min_size=1, max_size=200),
       cancel=st.sets(st.integers(min_value=0, max_value=199)))
def test_the_wheel_fires_in_heap_order_whatever_the_jump(compiled, whens, cancel):
    # One jump far past every timer: all of them come due in one turn, from every level.
    order = []
    loops = []
    for module in (pure, compiled):
        clock = Clock()
        loop = module.EventLoop(debug=True, clock=clock)
        fired = []
        timers = [loop.call_at(BASE + w, lambda i=i, fired=fired: fired.append(i)) for i, w in enumerate(whens)]
        for i in cancel:
            if i < len(timers):
                timers[i].cancel()
        clock.now = BASE + max(whens) + 1.0
        loop.run_once(0)
        order.append(fired)
        loops.append(loop)
    expect = sorted((i for i in range(len(whens)) if i not in cancel), key=lambda i: (BASE + whens[i], i))
    assert order[0] == order[1] == expect
    for loop in loops:
        assert loop.timer_count() == 0 and loop._timer_entries() == 0
        loop.close()
