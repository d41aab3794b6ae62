"""`voidbox net run`'s supervisor and SIGINT (voidbox/net/run.py _watch_interrupts): a
signalfd only where it sees every SIGINT and takes none that is the caller's. Each case
runs in a child process, whose signal state the test may change freely."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import pytest

from voidbox.net import netns


def _probe(setup: str, queue) -> None:
    from voidbox.net.run import _watch_interrupts

    helper = None
    if setup == "thread":
        stop = threading.Event()
        helper = threading.Thread(target=stop.wait)
        helper.start()
    elif setup == "ignored":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    elif setup == "blocked":
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    fd = _watch_interrupts()
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    read = None
    if fd is not None:
        os.kill(os.getpid(), signal.SIGINT)  # a process's kill: queued for the signalfd
        read = [(signo, code) for signo, code, _pid in netns.read_signals(fd)]
    queue.put((fd is not None, blocked, read))
    if helper is not None:
        stop.set()
        helper.join()


def _run(setup: str):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_probe, args=(setup, queue))
    proc.start()
    try:
        return queue.get(timeout=30)
    finally:
        proc.join(30)


def test_a_lone_process_reads_sigint_from_a_signalfd_with_its_sender():
    watched, blocked, read = _run("plain")
    assert watched and blocked
    assert read == [(signal.SIGINT, 0)]  # SI_USER: kill(2), not the terminal (SI_KERNEL)


@pytest.mark.parametrize("setup", ["thread", "ignored", "blocked"])
def test_no_signalfd_where_it_would_miss_or_take_the_callers_sigint(setup):
    """Another thread would get the SIGINT this thread blocks; a caller that ignores or
    blocks SIGINT keeps it so."""
    watched, blocked, _read = _run(setup)
    assert not watched
    assert blocked == (setup == "blocked")  # the caller's mask, untouched
