"""The one event loop every I/O thread runs (the network thread, the disk's, `net run`,
a vhost-user backend): the compiled `_loop` unless VOIDBOX_PURE=1 or it is missing, in
which case `_loop_py`, its readable twin.

Both twins export the same EventLoop and Timer (`IMPLEMENTATION` says which one loaded);
read `_loop_py` for the semantics and `_loop` for the timer wheel. LoopThread runs either
on a thread of its own.
"""

from __future__ import annotations

import threading

from ._twins import pick

_impl = pick("voidbox._loop", "voidbox._loop_py")
MAX_EVENTS, EventLoop, Timer = _impl.MAX_EVENTS, _impl.EventLoop, _impl.Timer
WATCH_FAILED = _impl.WATCH_FAILED  # with EPOLLERR: a deferred watch the kernel refused
IMPLEMENTATION = "cython" if _impl.__name__ == "voidbox._loop" else "pure"

__all__ = ["IMPLEMENTATION", "MAX_EVENTS", "WATCH_FAILED", "EventLoop", "LoopThread", "Timer"]


class LoopThread:
    """An EventLoop run on a thread of its own (a VM's network I/O thread)."""

    def __init__(self, name: str, loop: EventLoop | None = None):
        self.name = name
        self.loop = loop or EventLoop()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.loop.run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def native_id(self) -> int | None:
        """The thread's kernel id while it runs (its CPU time: /proc/self/task/ID)."""
        return self._thread.native_id if self._thread is not None else None

    def stop(self) -> None:
        """Let the loop finish its iteration and return; safe to call twice."""
        if self._thread is not None:
            self.loop.stop()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.loop.close()
