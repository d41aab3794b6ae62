"""The epoll event loop (voidbox/eventloop.py)."""

import os
import select
import threading

import pytest

from voidbox.eventloop import EventLoop

MAX_ITER = 200
HANG_BOUND = 30  # seconds (pytest-timeout): a broken stop() fails here instead of hanging


@pytest.fixture
def loop():
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
    assert len(loop._timers) < 10


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


def test_debug_loop_propagates_errors():
    lp = EventLoop(debug=True)
    lp.call_soon(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        lp.run_once(0)
    lp.close()


def test_production_loop_counts_errors_and_goes_on():
    lp = EventLoop()
    ran = []
    lp.call_soon(lambda: 1 / 0)
    lp.call_soon(lambda: ran.append(True))
    lp.run_once(0)
    assert lp.errors == 1 and ran == [True]
    lp.close()


def test_close_releases_fds():
    before = len(os.listdir("/proc/self/fd"))
    lp = EventLoop()
    lp.close()
    lp.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_watched_count_leaves_out_the_loops_own_wakeup_fd():
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


def test_production_loop_survives_a_failing_fd_callback():
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
