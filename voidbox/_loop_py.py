"""The event loop, pure Python: the readable twin of voidbox._loop (voidbox/eventloop.py
picks one). epoll over fds, a timer heap and a ready queue.

Level-triggered epoll (epoll(7)); callers drop interest in a socket that cannot make
progress so the loop never spins. Another thread wakes the loop through an eventfd
(eventfd(2)), so work queued from a vCPU thread runs at once instead of at the next poll
timeout.

One turn (run_once): wait for fds, or until the first timer is due, or not at all when
callbacks are queued; call each ready fd's callback with its events; fire the timers due
(in order of `when`, then of scheduling), with those they schedule for no later than now;
then run the callbacks queued before this point (what they queue runs next turn).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import select
import threading
import time
from collections.abc import Callable

from ._lazylog import get_logger

# Both twins log as the module callers import.
log = get_logger("voidbox.eventloop")

# Cap on one epoll_wait's batch; more ready fds are picked up by the next iteration.
MAX_EVENTS = 256
# Reported with EPOLLERR to the callback of a deferred watch the kernel refused (ENOMEM,
# max_user_watches spent): POLLNVAL's bit, which epoll never reports, so the callback can
# tell it from a socket error whose SO_ERROR something already read.
WATCH_FAILED = 0x20
# Rebuild the heap once cancelled timers outnumber live ones by this factor, so a flow
# that re-arms its idle timer on every packet does not grow the heap without bound.
CANCELLED_REBUILD_FACTOR = 2
_monotonic = time.monotonic


class Timer:
    """A pending call_at callback; cancel() makes it a no-op. `cancelled` is also true
    once it has fired."""

    __slots__ = ("when", "callback", "cancelled", "_loop")

    def __init__(self, when: float, callback: Callable[[], None], loop: EventLoop):
        self.when = when
        self.callback = callback
        self.cancelled = False
        self._loop = loop

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._loop._cancelled += 1


class EventLoop:
    """A single-threaded epoll loop.

    With debug=True an exception from a callback propagates out of run(); otherwise it is
    logged, counted in .errors, and the loop goes on (one bad flow must not take the
    network down). clock (tests): a function returning seconds, in place of
    time.monotonic.
    """

    def __init__(self, debug: bool = False, clock: Callable[[], float] | None = None):
        self.debug = debug
        self.errors = 0
        self._clock = clock or _monotonic
        self._epoll = select.epoll()
        self._watchers: dict[int, Callable[[int], None]] = {}
        self._events: dict[int, int] = {}
        # What the kernel's interest list holds (a deferred watch may not be there yet),
        # the fds whose registration waits for the end of the turn, and those whose
        # deferred registration failed (told EPOLLERR in the next turn).
        self._kernel: dict[int, int] = {}
        self._pending: set[int] = set()
        self._failed_watches: list[int] = []
        # Fds unwatched since the current batch of events was read: their events in it
        # belong to a registration that is gone (the fd may even be a new socket by now).
        self._stale: set[int] = set()
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0
        self._seq = itertools.count()
        self._ready: collections.deque[Callable[[], None]] = collections.deque()
        self._stopping = False
        self._closed = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_pending = False
        self._lock = threading.Lock()
        # The wakeup eventfd is an ordinary watcher: no per-event test for it in run_once.
        self.watch(self._wake_fd, select.EPOLLIN, self._drain_wakeup)

    # ------------------------------------------------------------ fds

    def watch(self, fd: int, events: int, callback: Callable[[int], None],
              defer: bool = False) -> None:
        """Call callback(events) while fd is ready for events; calling again modifies.

        defer: the kernel learns of it just before the loop next waits, so an fd watched
        and unwatched within one turn costs no system call; a registration that then
        fails is logged, counted in .errors and reported as callback(EPOLLERR | WATCH_FAILED).
        """
        if defer:
            if self._kernel.get(fd) != events:
                self._pending.add(fd)
        else:
            self._register(fd, events)
        self._watchers[fd] = callback
        self._events[fd] = events

    def _register(self, fd: int, events: int) -> None:
        """Make the kernel's interest list hold fd with events (register or modify)."""
        known = self._kernel.get(fd)
        if known == events:
            return
        if known is None:
            self._epoll.register(fd, events)
        else:
            self._epoll.modify(fd, events)
        self._kernel[fd] = events

    def _sync(self) -> None:
        """Apply the deferred registrations, before the loop waits."""
        pending, self._pending = self._pending, set()
        for fd in pending:
            events = self._events.get(fd)
            if events is None:
                continue  # unwatched since: nothing to tell the kernel
            try:
                self._register(fd, events)
            except OSError as e:
                self.errors += 1
                log.warning("cannot watch fd %d: %s", fd, e.strerror)
                self._failed_watches.append(fd)

    def unwatch(self, fd: int) -> None:
        if self._watchers.pop(fd, None) is not None:
            del self._events[fd]
            self._stale.add(fd)
            if self._kernel.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    # Already closed: the kernel dropped it from the interest list.
                    pass

    def _epoll_fd(self) -> int:
        """The epoll fd (tests read the kernel's interest list in its fdinfo)."""
        return self._epoll.fileno()

    def watched_count(self) -> int:
        """Fds watched for callers (the loop's own wakeup eventfd is not counted)."""
        return len(self._watchers) - (not self._closed)

    # ------------------------------------------------------------ time and callbacks

    def time(self) -> float:
        return self._clock()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback, self)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.time() + delay, callback)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._ready.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        # deque.append is atomic; the lock only keeps the wakeup writes from piling up.
        self._ready.append(callback)
        with self._lock:
            if self._wake_pending or self._closed:
                return
            self._wake_pending = True
        try:
            os.eventfd_write(self._wake_fd, 1)
        except BlockingIOError:
            pass

    def timer_count(self) -> int:
        return len(self._timers) - self._cancelled

    def _timer_entries(self) -> int:
        """Entries the timer structure holds, cancelled ones included (tests)."""
        return len(self._timers)

    # ------------------------------------------------------------ running

    def stop(self) -> None:
        """Make run() return after the current iteration (safe from any thread)."""
        self._stopping = True
        if self._closed:
            return  # the eventfd's number may belong to another file by now
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (BlockingIOError, OSError):
            pass

    def run(self) -> None:
        """Run until stop(). A stop() made before run() is kept: a signal handler that
        stops the loop while its owner is still starting must not be lost."""
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self._stopping = False

    def run_once(self, timeout: float | None = None) -> None:
        """One iteration: wait for fds or the next timer, then run what is due."""
        timers = self._timers
        clock = self._clock
        if self._pending:
            self._sync()
        if self._ready or self._failed_watches:
            wait = 0.0
        elif timers:
            wait = timers[0][0] - clock()
            if wait < 0.0:
                wait = 0.0
        else:
            wait = -1.0
        if timeout is not None:
            wait = timeout if wait < 0 else min(wait, timeout)
        try:
            events = self._epoll.poll(wait, MAX_EVENTS)
        except InterruptedError:
            events = ()
        watchers = self._watchers
        stale = self._stale
        if stale:
            stale.clear()
        if self.debug:
            for fd, ev in events:
                if stale and fd in stale:
                    continue
                cb = watchers.get(fd)
                if cb is not None:
                    cb(ev)
        else:
            # One try per callback, inlined: _invoke's extra call is per-event overhead.
            for fd, ev in events:
                if stale and fd in stale:
                    continue
                cb = watchers.get(fd)
                if cb is not None:
                    try:
                        cb(ev)
                    except Exception:
                        self._failed(cb)
        if self._failed_watches:
            self._report_failed_watches()
        # The timer heap is looked at only when its head is due (or it needs a clean-up).
        if timers:
            if timers[0][0] <= clock():
                self._run_timers()
            elif self._cancelled > CANCELLED_REBUILD_FACTOR * max(1, len(timers) - self._cancelled):
                self._rebuild_timers()
        # Only what was ready before this point runs now: callbacks queued by callbacks
        # wait for the next iteration, so fd events are never starved.
        ready = self._ready
        if ready:
            for _ in range(len(ready)):
                if not ready:
                    break  # a callback closed the loop
                self._invoke(ready.popleft())

    def _report_failed_watches(self) -> None:
        """EPOLLERR | WATCH_FAILED to each callback whose deferred registration failed,
        unless this turn's callbacks unwatched its fd since (it may be another file's watch
        by now)."""
        failed, self._failed_watches = self._failed_watches, []
        for fd in failed:
            cb = self._watchers.get(fd)
            if cb is not None and fd not in self._stale:
                self._invoke(cb, select.EPOLLERR | WATCH_FAILED)

    def _drain_wakeup(self, _events: int = 0) -> None:
        with self._lock:
            self._wake_pending = False
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    def _run_timers(self) -> None:
        now = self._clock()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                self._cancelled -= 1
                continue
            timer.cancelled = True  # fired and off the heap: a later cancel() is a no-op
            self._invoke(timer.callback)
        if self._cancelled > CANCELLED_REBUILD_FACTOR * max(1, len(timers) - self._cancelled):
            self._rebuild_timers()

    def _rebuild_timers(self) -> None:
        """Drop cancelled timers from the heap (in place: run_once holds a reference)."""
        self._timers[:] = [t for t in self._timers if not t[2].cancelled]
        heapq.heapify(self._timers)
        self._cancelled = 0

    def _invoke(self, cb: Callable, *args) -> None:
        if self.debug:
            cb(*args)
            return
        try:
            cb(*args)
        except Exception:
            self._failed(cb)

    def _failed(self, cb: Callable) -> None:
        """Count and log the exception being handled (production loops go on)."""
        self.errors += 1
        log.exception("event loop callback %r failed", cb)

    def __del__(self) -> None:
        # A loop dropped without close(): the epoll object closes itself, the eventfd not.
        fd = getattr(self, "_wake_fd", None)
        if fd is not None and not self._closed:
            os.close(fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._epoll.close()
        os.close(self._wake_fd)
        self._watchers.clear()
        self._events.clear()
        self._kernel.clear()
        self._pending.clear()
        self._failed_watches.clear()
        self._stale.clear()
        self._timers.clear()
        self._cancelled = 0
        self._ready.clear()
