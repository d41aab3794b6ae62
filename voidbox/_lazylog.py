"""Loggers that import logging when first used, not when their module is imported.

Importing logging (with traceback, linecache, tokenize, textwrap and string) costs about
6 ms, every `voidbox boot`; the NAT and the event loop only log when something goes wrong.
"""

from __future__ import annotations

import sys

DEBUG, INFO, WARNING = 10, 20, 30  # logging's levels, without importing it


class LazyLogger:
    """logging.getLogger(name), looked up at each call (a log call is never hot)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    # Until something imports logging nothing can have configured it, so the root logger
    # is at its default level, WARNING, and a record below it would be dropped: drop it
    # without importing logging (cap_flows logs at INFO on every start).
    def log(self, level: int, msg, *args, **kwargs) -> None:
        if level < WARNING and "logging" not in sys.modules:
            return
        self.__getattr__("log")(level, msg, *args, **kwargs)

    def info(self, msg, *args, **kwargs) -> None:
        self.log(INFO, msg, *args, **kwargs)

    def debug(self, msg, *args, **kwargs) -> None:
        self.log(DEBUG, msg, *args, **kwargs)

    def __getattr__(self, attr):
        import logging

        return getattr(logging.getLogger(self.name), attr)

    def __repr__(self) -> str:
        return f"<LazyLogger {self.name}>"


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)
