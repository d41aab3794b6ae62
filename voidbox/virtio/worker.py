"""A device's I/O thread: waits on its queues' ioeventfds and runs the device.

virtio-blk gets one of its own so that a slow fsync never stalls networking or a vCPU.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable


class IoWorker:
    def __init__(self, name: str):
        self.name = name
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._running = False
        self._thread = None
        self.errors: list[BaseException] = []

    def add_eventfd(self, efd: int, callback: Callable[[], None]) -> None:
        """Call `callback` (on the worker thread) each time `efd` is signalled."""
        self._callbacks[efd] = callback
        self._epoll.register(efd, select.EPOLLIN)

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            for fd, _events in self._epoll.poll():
                if fd == self._wake:
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                try:
                    self._callbacks[fd]()
                except Exception as error:  # noqa: BLE001 - keep serving the other queues
                    self.errors.append(error)

    def stop(self) -> None:
        """Finish the request in progress, then stop (callers then flush their backends)."""
        self._running = False
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        os.close(self._wake)
