"""The epoll event loop (voidbox/eventloop.py): every test runs against both twins, the
compiled `_loop` and the pure `_loop_py` (the EventLoop fixture's parameter)."""

import gc
import os
import random
import select
import sys
import threading
import time
import weakref

import pytest

from tests.twins import load_compiled

MAX_ITER = 200
HANG_BOUND = 30  # seconds (pytest-timeout): a broken stop() fails here instead of hanging


@pytest.fixture(params=["cython", "pure"])
def EventLoop(request):
    """The EventLoop class of one twin."""
    if request.param == "pure":
        import voidbox._loop_py as module
    else:
        module = load_compiled("voidbox._loop")
    return module.EventLoop


@pytest.fixture
def loop(EventLoop):
    lp = EventLoop(debug=True)
    yield lp
    lp.close()


def run_until(loop, cond):
    for _ in range(MAX_ITER):
        if cond():
            return
        loop.run_once(0.05)
    raise AssertionError("condition not reached")


def test_watch_reports_readable_and_unwatch_stops_it(loop):
    r, w = os.pipe()
    seen = []
    try:
        loop.watch(r, select.EPOLLIN, seen.append)
        loop.run_once(0)
        assert seen == []
        os.write(w, b"x")
        run_until(loop, lambda: seen)
        assert seen[0] & select.EPOLLIN
        loop.unwatch(r)
        seen.clear()
        loop.run_once(0)
        assert seen == [] and loop.watched_count() == 0
    finally:
        os.close(r)
        os.close(w)


def test_watch_again_modifies_the_interest(loop):
    r, w = os.pipe()
    seen = []
    try:
        loop.watch(w, select.EPOLLIN, seen.append)
        loop.run_once(0)
        assert seen == []
        loop.watch(w, select.EPOLLOUT, seen.append)
        run_until(loop, lambda: seen)
        assert seen[0] & select.EPOLLOUT
    finally:
        loop.unwatch(w)
        os.close(r)
        os.close(w)


def test_timers_fire_in_order_and_cancel(loop):
    fired = []
    now = loop.time()
    loop.call_at(now + 0.02, lambda: fired.append("b"))
    loop.call_at(now + 0.01, lambda: fired.append("a"))
    t = loop.call_at(now + 0.015, lambda: fired.append("cancelled"))
    t.cancel()
    t.cancel()  # twice is harmless
    run_until(loop, lambda: len(fired) == 2)
    assert fired == ["a", "b"]
    assert loop.timer_count() == 0


def test_cancelled_timers_do_not_accumulate(loop):
    far = loop.time() + 3600
    for _ in range(1000):
        loop.call_at(far, lambda: None).cancel()
    loop.run_once(0)
    assert loop._timer_entries() < 10


def test_call_soon_runs_next_iteration_in_order(loop):
    order = []
    loop.call_soon(lambda: (order.append(1), loop.call_soon(lambda: order.append(3))))
    loop.call_soon(lambda: order.append(2))
    loop.run_once(0)
    assert order == [1, 2]  # what a callback queues waits for the next iteration
    loop.run_once(0)
    assert order == [1, 2, 3]


@pytest.mark.timeout(HANG_BOUND)
def test_call_soon_threadsafe_wakes_a_blocked_loop(loop):
    done = []
    started = threading.Event()

    def other():
        started.wait()
        loop.call_soon_threadsafe(lambda: (done.append(True), loop.stop()))

    t = threading.Thread(target=other)
    t.start()
    # run() has no timers and no fds: only the eventfd wakeup can end it.
    loop.call_soon(started.set)
    loop.run()
    t.join()
    assert done == [True]


@pytest.mark.timeout(HANG_BOUND)
def test_stop_from_a_callback_ends_run_after_that_iteration(loop):
    ran = []

    def stop_and_queue_more():
        ran.append("stop")
        loop.stop()
        loop.call_soon(lambda: ran.append("next iteration"))

    loop.call_soon(stop_and_queue_more)
    loop.call_soon(lambda: ran.append("same iteration"))
    loop.run()
    assert ran == ["stop", "same iteration"]
    # stop() is not sticky: the loop runs again, and what was queued runs then.
    loop.call_soon(loop.stop)
    loop.run()
    assert ran == ["stop", "same iteration", "next iteration"]


@pytest.mark.timeout(HANG_BOUND)
def test_a_stop_before_run_is_kept_and_then_spent(loop):
    """A signal handler may stop the loop while its owner is still starting (voidbox net
    serve's SIGTERM during the sandbox's set-up): run() then returns at once, not never."""
    ran = []
    loop.call_soon(lambda: ran.append("queued"))
    loop.stop()
    loop.run()
    assert ran == []
    loop.call_soon(loop.stop)
    loop.run()  # the stop was spent: this run runs
    assert ran == ["queued"]


def test_debug_loop_propagates_errors(EventLoop):
    lp = EventLoop(debug=True)
    lp.call_soon(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        lp.run_once(0)
    lp.close()


def test_production_loop_counts_errors_and_goes_on(EventLoop):
    lp = EventLoop()
    ran = []
    lp.call_soon(lambda: 1 / 0)
    lp.call_soon(lambda: ran.append(True))
    lp.run_once(0)
    assert lp.errors == 1 and ran == [True]
    lp.close()


def test_close_releases_fds(EventLoop):
    before = len(os.listdir("/proc/self/fd"))
    lp = EventLoop()
    lp.close()
    lp.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_watched_count_leaves_out_the_loops_own_wakeup_fd(EventLoop):
    lp = EventLoop()
    assert lp.watched_count() == 0
    r, w = os.pipe()
    try:
        lp.watch(r, select.EPOLLIN, lambda ev: None)
        assert lp.watched_count() == 1
        lp.unwatch(r)
        assert lp.watched_count() == 0
    finally:
        lp.close()
        os.close(r)
        os.close(w)
    assert lp.watched_count() == 0


def test_production_loop_survives_a_failing_fd_callback(EventLoop):
    lp = EventLoop()
    fds = [os.pipe() for _ in range(2)]
    ran = []

    def boom(ev):
        raise RuntimeError("bad flow")

    try:
        lp.watch(fds[0][0], select.EPOLLIN, boom)
        lp.watch(fds[1][0], select.EPOLLIN, ran.append)
        for _, w in fds:
            os.write(w, b"x")
        lp.run_once(0)
        assert lp.errors == 1 and len(ran) == 1
    finally:
        lp.close()
        for r, w in fds:
            os.close(r)
            os.close(w)


def test_timers_due_fire_even_while_fds_stay_ready(loop):
    # Timers are looked at after every batch of fd events, not only on an idle loop.
    r, w = os.pipe()
    fired = []
    try:
        os.write(w, b"x")  # stays readable: level-triggered, never read
        loop.watch(r, select.EPOLLIN, lambda ev: None)
        loop.call_at(loop.time(), lambda: fired.append(True))
        loop.run_once(0)
        assert fired == [True]
    finally:
        loop.unwatch(r)
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------- edge cases, both twins

def pipes(n):
    return [os.pipe() for _ in range(n)]


def close_all(fds):
    for r, w in fds:
        os.close(r)
        os.close(w)


def test_an_fd_unwatched_by_an_earlier_callback_of_the_batch_is_not_called(loop):
    fds = pipes(2)
    seen = []
    try:
        for _r, w in fds:
            os.write(w, b"x")

        def first(ev, me):
            seen.append(me)
            loop.unwatch(fds[1 - me][0])  # whichever comes second must not run

        loop.watch(fds[0][0], select.EPOLLIN, lambda ev: first(ev, 0))
        loop.watch(fds[1][0], select.EPOLLIN, lambda ev: first(ev, 1))
        loop.run_once(0)
        assert len(seen) == 1
        assert loop.watched_count() == 1
    finally:
        close_all(fds)


def test_an_fd_watched_again_by_an_earlier_callback_waits_for_the_next_batch(loop):
    # The second registration of the same number (a new socket, perhaps) must not get
    # the events read for the first one; level-triggered, it gets its own next turn.
    fds = pipes(2)
    new, order = [], []
    try:
        for _r, w in fds:
            os.write(w, b"x")

        def rewatch(ev, me):
            order.append(me)
            if len(order) == 1:
                other = fds[1 - me][0]
                loop.unwatch(other)
                loop.watch(other, select.EPOLLIN, new.append)

        loop.watch(fds[0][0], select.EPOLLIN, lambda ev: rewatch(ev, 0))
        loop.watch(fds[1][0], select.EPOLLIN, lambda ev: rewatch(ev, 1))
        loop.run_once(0)
        assert len(order) == 1 and new == []
        loop.run_once(0)
        assert len(order) == 2 and len(new) == 1 and new[0] & select.EPOLLIN
    finally:
        close_all(fds)


def test_a_callback_may_unwatch_and_rewatch_its_own_fd(loop):
    r, w = os.pipe()
    seen = []
    try:
        os.write(w, b"x")

        def cb(ev):
            seen.append(ev)
            loop.unwatch(r)
            loop.watch(r, select.EPOLLIN, cb)

        loop.watch(r, select.EPOLLIN, cb)
        loop.run_once(0)
        loop.run_once(0)
        assert len(seen) == 2 and loop.watched_count() == 1
    finally:
        loop.unwatch(r)
        os.close(r)
        os.close(w)


@pytest.mark.timeout(HANG_BOUND)
def test_stop_from_an_fd_callback_ends_run(loop):
    r, w = os.pipe()
    calls = []
    try:
        os.write(w, b"x")
        loop.watch(r, select.EPOLLIN, lambda ev: (calls.append(ev), loop.stop()))
        loop.run()
        assert len(calls) == 1
    finally:
        loop.unwatch(r)
        os.close(r)
        os.close(w)


def test_a_timer_may_cancel_a_later_timer_due_in_the_same_turn(EventLoop):
    clock = [100.0]
    lp = EventLoop(debug=True, clock=lambda: clock[0])
    fired = []
    later = []
    lp.call_at(100.5, lambda: (fired.append("a"), later[0].cancel()))
    later.append(lp.call_at(100.7, lambda: fired.append("b")))
    lp.call_at(100.9, lambda: fired.append("c"))
    assert lp.timer_count() == 3
    clock[0] = 101.0
    lp.run_once(0)
    assert fired == ["a", "c"] and later[0].cancelled and lp.timer_count() == 0
    lp.close()


def test_timers_scheduled_by_a_timer_fire_this_turn_only_when_already_due(EventLoop):
    clock = [100.0]
    lp = EventLoop(debug=True, clock=lambda: clock[0])
    fired = []

    def first():
        fired.append("first")
        lp.call_at(100.2, lambda: fired.append("due, earlier than second"))
        lp.call_at(101.0, lambda: fired.append("due now"))
        lp.call_at(101.0005, lambda: fired.append("not yet"))

    lp.call_at(100.1, first)
    lp.call_at(100.3, lambda: fired.append("second"))
    clock[0] = 101.0
    lp.run_once(0)
    assert fired == ["first", "due, earlier than second", "second", "due now"]
    assert lp.timer_count() == 1
    clock[0] = 101.001
    lp.run_once(0)
    assert fired[-1] == "not yet" and lp.timer_count() == 0
    lp.close()


def test_a_debug_loop_fires_the_rest_of_a_turns_timers_after_one_raises(EventLoop):
    clock = [100.0]
    lp = EventLoop(debug=True, clock=lambda: clock[0])
    fired = []
    lp.call_at(100.1, lambda: fired.append(1))
    lp.call_at(100.2, lambda: 1 / 0)
    lp.call_at(100.3, lambda: fired.append(3))
    clock[0] = 101.0
    with pytest.raises(ZeroDivisionError):
        lp.run_once(0)
    assert fired == [1] and lp.timer_count() == 1
    lp.run_once(0)
    assert fired == [1, 3] and lp.timer_count() == 0
    lp.close()


def test_a_production_loop_counts_a_failing_timer_and_fires_the_rest(EventLoop):
    clock = [100.0]
    lp = EventLoop(clock=lambda: clock[0])
    fired = []
    lp.call_at(100.1, lambda: 1 / 0)
    lp.call_at(100.2, lambda: fired.append(2))
    clock[0] = 101.0
    lp.run_once(0)
    assert fired == [2] and lp.errors == 1
    lp.close()


def test_a_fired_timer_reads_as_cancelled_and_cancel_is_then_a_no_op(loop):
    t = loop.call_at(loop.time(), lambda: None)
    assert not t.cancelled and loop.timer_count() == 1
    loop.run_once(0)
    assert t.cancelled and loop.timer_count() == 0
    t.cancel()
    assert loop.timer_count() == 0


def test_time_is_the_monotonic_clock(loop):
    a = time.monotonic()
    b = loop.time()
    c = time.monotonic()
    assert a <= b <= c


def test_call_later_and_when(loop):
    before = loop.time()
    t = loop.call_later(5.0, lambda: None)
    assert before + 5.0 <= t.when <= loop.time() + 5.0
    t.cancel()


@pytest.mark.timeout(HANG_BOUND)
@pytest.mark.parametrize("delay", [0.0, 0.0004, 0.003, 0.030, 0.070, 0.3])
def test_a_timer_never_fires_early_and_wakes_a_blocked_loop_soon_after(loop, delay):
    # run_once() with no timeout: only the timer can end each wait. The wheel may wake
    # at a slot's start on the way (a timer on a higher level moves down): a few turns.
    now = loop.time()
    fired = []
    loop.call_at(now + delay, lambda: fired.append(loop.time()))
    turns = 0
    while not fired:
        loop.run_once()
        turns += 1
        assert turns <= 8
    assert fired[0] >= now + delay
    assert fired[0] - (now + delay) < 0.25  # late only by scheduling noise on a busy host


@pytest.mark.timeout(HANG_BOUND)
def test_thousands_of_far_timers_cost_no_turns(loop):
    rng = random.Random(7)
    now = loop.time()
    timers = [loop.call_at(now + 600 + rng.random() * 7200, lambda: None) for _ in range(10000)]
    for t in timers[::2]:
        t.cancel()
    assert loop.timer_count() == 5000
    turns = 0
    end = loop.time() + 0.3
    while loop.time() < end:
        loop.run_once(0.1)
        turns += 1
    assert turns <= 6  # each wait lasts its whole timeout: nothing wakes the loop
    for t in timers:
        t.cancel()
    loop.run_once(0)
    assert loop.timer_count() == 0 and loop._timer_entries() < 10


@pytest.mark.timeout(HANG_BOUND)
def test_call_soon_threadsafe_from_many_threads(loop):
    n_threads, per_thread = 4, 500
    got = []
    start = threading.Barrier(n_threads + 1)

    def producer(k):
        start.wait()
        for i in range(per_thread):
            loop.call_soon_threadsafe(lambda k=k, i=i: got.append((k, i)))

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    start.wait()
    for _ in range(100000):
        if len(got) == n_threads * per_thread:
            break
        loop.run_once(0.05)
    for t in threads:
        t.join()
    assert len(got) == n_threads * per_thread
    for k in range(n_threads):  # each thread's callbacks run in the order it queued them
        assert [i for kk, i in got if kk == k] == list(range(per_thread))


def test_after_close(EventLoop):
    lp = EventLoop()
    r, w = os.pipe()
    try:
        lp.watch(r, select.EPOLLIN, lambda ev: None)
        lp.close()
        assert lp.watched_count() == 0 and lp.timer_count() == 0
        lp.unwatch(r)  # a no-op
        lp.stop()  # writes to no fd
        lp.call_soon_threadsafe(lambda: None)
        with pytest.raises(ValueError):
            lp.watch(r, select.EPOLLIN, lambda ev: None)
        with pytest.raises(ValueError):
            lp.run_once(0)
    finally:
        os.close(r)
        os.close(w)


def test_a_callback_may_close_the_loop(EventLoop):
    lp = EventLoop()
    r, w = os.pipe()
    ran = []
    try:
        os.write(w, b"x")
        lp.watch(r, select.EPOLLIN, lambda ev: lp.close())
        lp.call_soon(lambda: ran.append(1))
        lp.call_at(0, lambda: ran.append(2))
        lp.run_once(0)
        assert ran == [] and lp.watched_count() == 0
    finally:
        os.close(r)
        os.close(w)


def test_a_loop_dropped_without_close_is_collected_with_its_fds(EventLoop):
    before = len(os.listdir("/proc/self/fd"))
    r, w = os.pipe()

    def dropped():
        lp = EventLoop()
        # Cycles through the loop's own structures: callbacks that refer to the loop.
        lp.watch(r, select.EPOLLIN, lambda ev: lp.stop())
        lp.call_later(3600, lambda: lp.stop())
        lp.call_soon(lambda: lp.stop())
        return weakref.ref(lp)

    ref = dropped()
    gc.collect()
    assert ref() is None
    os.close(r)
    os.close(w)
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_watchers_view(loop):
    r, w = os.pipe()
    try:
        cb = lambda ev: None  # noqa: E731
        loop.watch(r, select.EPOLLIN, cb)
        assert loop._watchers.get(r) is cb and w not in loop._watchers
    finally:
        loop.unwatch(r)
        os.close(r)
        os.close(w)


def test_a_replaced_time_method_serves_callers(loop, monkeypatch):
    # test_udp_nat fakes the clock of a loop this way.
    monkeypatch.setattr(loop, "time", lambda: 5.0)
    assert loop.time() == 5.0
    assert loop.call_later(1.0, lambda: None).when == 6.0


# ---- deferred watches: the kernel's interest list is read from the epoll fd's fdinfo


def kernel_interest(loop) -> dict[int, int]:
    """{fd: events} as the kernel's interest list holds them (proc(5) fdinfo tfd lines),
    without the EPOLLERR and EPOLLHUP epoll_ctl(2) always adds."""
    out = {}
    with open(f"/proc/self/fdinfo/{loop._epoll_fd()}") as f:
        for line in f:
            if line.startswith("tfd:"):
                words = line.split()
                out[int(words[1])] = int(words[3], 16) & ~(select.EPOLLERR | select.EPOLLHUP)
    return out


def test_a_deferred_watch_reaches_the_kernel_when_the_loop_next_waits(loop):
    r, w = os.pipe()
    seen = []
    try:
        os.write(w, b"x")
        loop.watch(r, select.EPOLLIN, seen.append, defer=True)
        assert r not in kernel_interest(loop) and loop.watched_count() == 1
        loop.run_once(0)
        assert kernel_interest(loop)[r] == select.EPOLLIN
        assert seen and seen[0] & select.EPOLLIN
        # A deferred change of interest waits as well; an eager one does not.
        loop.watch(r, select.EPOLLOUT, seen.append, defer=True)
        assert kernel_interest(loop)[r] == select.EPOLLIN
        loop.run_once(0)
        assert kernel_interest(loop)[r] == select.EPOLLOUT
        loop.watch(r, select.EPOLLIN, seen.append)
        assert kernel_interest(loop)[r] == select.EPOLLIN
        loop.unwatch(r)
        assert r not in kernel_interest(loop)
    finally:
        os.close(r)
        os.close(w)


def test_an_fd_watched_and_unwatched_within_a_turn_never_reaches_the_kernel(loop):
    r, w = os.pipe()
    seen = []
    try:
        os.write(w, b"x")
        loop.watch(r, select.EPOLLIN, seen.append, defer=True)
        loop.unwatch(r)
        loop.run_once(0)
        assert r not in kernel_interest(loop) and seen == [] and loop.watched_count() == 0
        # Watched again in the same turn, after an unwatch: it is registered once.
        loop.watch(r, select.EPOLLIN, seen.append, defer=True)
        loop.unwatch(r)
        loop.watch(r, select.EPOLLIN, seen.append, defer=True)
        loop.run_once(0)
        assert kernel_interest(loop).get(r) == select.EPOLLIN and seen
    finally:
        os.close(r)
        os.close(w)


def test_a_deferred_watch_the_kernel_refuses_is_told_epollerr_and_counted(EventLoop, tmp_path):
    lp = EventLoop()  # a production loop: the failure is logged and counted, not raised
    path = tmp_path / "regular"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    seen = []
    try:
        lp.watch(fd, select.EPOLLIN, seen.append, defer=True)  # epoll(7): EPERM for files
        lp.run_once(0)
        # EPOLLERR with a bit epoll never reports (POLLNVAL's), so a socket's callback can
        # tell a refused watch from an error whose SO_ERROR was read already.
        watch_failed = sys.modules[EventLoop.__module__].WATCH_FAILED
        assert watch_failed == select.POLLNVAL
        assert seen == [select.EPOLLERR | watch_failed] and lp.errors == 1
        assert fd not in kernel_interest(lp)
        lp.run_once(0)
        assert seen == [select.EPOLLERR | watch_failed]  # told once
        lp.unwatch(fd)
        assert lp.watched_count() == 0
    finally:
        os.close(fd)
        lp.close()


def test_a_failed_deferred_watch_is_not_reported_to_the_fd_watched_again_since(EventLoop,
                                                                              tmp_path):
    """The failure is told after the turn's fd callbacks: if one of them unwatched the fd
    and watched a new file under its number, the new watch gets no EPOLLERR."""
    lp = EventLoop()
    path = tmp_path / "regular"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    r2, w2 = os.pipe()
    told_old, told_new = [], []

    def swap(_ev):
        lp.unwatch(r)
        lp.unwatch(fd)
        os.dup2(r2, fd)  # the number is now a pipe's read end
        lp.watch(fd, select.EPOLLIN, told_new.append)

    try:
        os.write(w, b"x")
        lp.watch(r, select.EPOLLIN, swap)
        lp.watch(fd, select.EPOLLIN, told_old.append, defer=True)  # EPERM when it is applied
        lp.run_once(0)
        assert told_old == [] and told_new == [] and lp.errors == 1
        os.write(w2, b"y")
        lp.run_once(0)
        assert told_new == [select.EPOLLIN]
        lp.unwatch(fd)
    finally:
        for n in (fd, r, w, r2, w2):
            os.close(n)
        lp.close()
