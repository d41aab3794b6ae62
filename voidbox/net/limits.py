"""File-descriptor limits of the NAT: every flow holds one host socket.

A guest (or the command of `voidbox net run`) can open flows faster than the process may
open fds: with `ulimit -n` at 1024 and a flow limit of 65536, socket(2) fails with EMFILE
long before the flow limit. So the soft limit is raised to the hard one at start, the
flow limit is capped by what remains, and a socket that still cannot be had refuses
its flow at once (RST, ICMP unreachable, SERVFAIL) instead of raising into the loop.
"""

from __future__ import annotations

import errno
import resource
import time

from .._lazylog import INFO, WARNING, get_logger

log = get_logger(__name__)

# socket(2), accept(2): the process or system is out of fds, buffers or memory.
EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Fds kept for everything that is not a flow: the TAP, epoll, eventfds, listeners,
# spare UDP sockets, logging, the Python runtime's own.
RESERVED_FDS = 64
FEW_FLOWS = 4096  # below this, a capped default flow limit is worth a warning
LOG_INTERVAL = 10.0  # seconds between two "out of fds" lines


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def flow_limit_for_fds(requested: int, fd_limit: int) -> int:
    """The flow limit that the fd limit allows: one fd per flow, RESERVED_FDS kept back."""
    return max(1, min(requested, fd_limit - RESERVED_FDS))


def cap_flows(config, default_max_flows: int) -> None:
    """Raise the fd limit and cap config.max_flows by it. Say so once (a warning) when it
    bites: when the user asked for more flows, or when fewer than FEW_FLOWS remain;
    capping the default to thousands of flows is only logged at info level."""
    fd_limit = raise_fd_limit()
    allowed = flow_limit_for_fds(config.max_flows, fd_limit)
    if allowed < config.max_flows:
        notable = config.max_flows != default_max_flows or allowed < FEW_FLOWS
        log.log(WARNING if notable else INFO,
                "open-file limit %d allows %d flows, not %d: further flows are refused",
                fd_limit, allowed, config.max_flows)
        config.max_flows = allowed


class Exhaustion:
    """Counts flows refused for lack of fds or of epoll watches, and logs it at most once
    per LOG_INTERVAL."""

    def __init__(self, counters: dict[str, int]):
        self.counters = counters
        self._last_log = -LOG_INTERVAL

    def refused(self, what: str, error: OSError, watch: bool = False) -> None:
        """`watch`: the event loop could not watch the flow's socket (epoll_ctl failed)."""
        key = "flows_refused_no_watch" if watch else "flows_refused_no_fds"
        self.counters[key] = self.counters.get(key, 0) + 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            if not watch:
                hint = "raise `ulimit -n` or lower --max-flows"
            elif error.errno == errno.ENOSPC:
                hint = "raise fs.epoll.max_user_watches or lower --max-flows"
            else:
                hint = "free memory or lower --max-flows"
            log.warning("%s refused: %s (%s)", what, error.strerror or error, hint)
