"""A hostile frontend on the server's real socket: hypothesis writes sessions of plausible
messages with random fields (memory tables over memfds of any size, rings anywhere, fds of
the wrong kind) mixed with garbage, then hangs up at any point, including with a table
mapped and rings running and no GET_VRING_BASE.

After every session the one server, never restarted, must have let go of everything the
session gave it (fds, mappings, the device's rings) and serve an honest frontend: an ARP
round trip through the NAT. A failure in the server's loop would surface as an exception
from the pump; a hang as the test's timeout.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.test_vhost_user_backend import (
    QSIZE,
    UADDR,
    Frontend,
    Rig,
    arp_round_trip,
    open_fds,
)
from voidbox.ring import Virtqueue
from voidbox.vhost_user import protocol as p

INDEX = st.integers(0, 2)  # 2 is out of range for a card
ADDR = st.one_of(st.integers(0, (1 << 64) - 1), st.integers(UADDR - 4096, UADDR + (40 << 20)))


def _memfd(size: int) -> int:
    fd = os.memfd_create("fuzz-region", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _eventfd(_=None) -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _devnull(_=None) -> int:
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


region = st.builds(p.MemoryRegion, guest_phys_addr=st.sampled_from([0, 4096, 1 << 32]) | ADDR,
                   memory_size=st.sampled_from([4096, 1 << 20, 32 << 20]) | st.integers(0, 1 << 40),
                   userspace_addr=st.just(UADDR) | ADDR,
                   mmap_offset=st.sampled_from([0, 4096]) | st.integers(0, 1 << 40))
# (message fields, fd makers): fds are made only when the step is sent.
step = st.one_of(
    st.binary(max_size=64).map(lambda raw: ("raw", raw, [])),
    st.just(p.GetFeatures()).map(lambda m: ("msg", m, [])),
    st.integers(0, (1 << 64) - 1).map(lambda f: ("msg", p.SetFeatures(features=f), [])),
    st.just(("msg", p.SetFeatures(features=(1 << 32) | (1 << 30) | (1 << 15)), [])),
    st.integers(0, 7).map(lambda f: ("msg", p.SetProtocolFeatures(features=f), [])),
    st.sampled_from([p.SetOwner(), p.ResetOwner(), p.GetQueueNum(), p.GetProtocolFeatures()])
    .map(lambda m: ("msg", m, [])),
    st.lists(st.tuples(region, st.sampled_from([4096, 1 << 20, 32 << 20])), min_size=1, max_size=3)
    .map(lambda rs: ("table", tuple(r for r, _ in rs), [lambda s=s: _memfd(s) for _, s in rs])),
    st.builds(p.SetVringNum, index=INDEX, num=st.sampled_from([QSIZE, 0, 3, 1 << 15]) | st.integers(0, (1 << 32) - 1))
    .map(lambda m: ("msg", m, [])),
    st.builds(p.SetVringAddr, index=INDEX, flags=st.integers(0, 1), desc_user_addr=ADDR,
              used_user_addr=ADDR, avail_user_addr=ADDR, log_guest_addr=st.just(0))
    .map(lambda m: ("msg", m, [])),
    st.builds(p.SetVringBase, index=INDEX, num=st.integers(0, 1 << 17)).map(lambda m: ("msg", m, [])),
    st.builds(p.GetVringBase, index=INDEX, num=st.just(0)).map(lambda m: ("msg", m, [])),
    st.builds(p.SetVringEnable, index=INDEX, enable=st.booleans()).map(lambda m: ("msg", m, [])),
    st.tuples(st.sampled_from([p.SetVringKick, p.SetVringCall, p.SetVringErr]), INDEX,
              st.sampled_from([_eventfd, _devnull, None]))
    .map(lambda t: ("vringfd", t[:2], [] if t[2] is None else [t[2]])),
    st.builds(p.GetConfig, offset=st.integers(0, 300), flags=st.just(0),
              payload=st.integers(0, 300).map(bytes)).map(lambda m: ("msg", m, [])),
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "net.sock"
    rig = Rig(path, Virtqueue)
    yield rig, path
    rig.close()


def send_step(front: Frontend, kind: str, what, makers) -> None:
    fds = [make() for make in makers]
    try:
        if kind == "raw":
            front.send_raw(what, fds)
        elif kind == "table":
            front.send(p.SetMemTable(regions=what, fds=tuple(fds)))
        elif kind == "vringfd":
            cls, index = what
            front.send(cls(index=index, fds=tuple(fds)))
        else:
            front.send(what)
    finally:
        for fd in fds:  # the server has its own copies now
            os.close(fd)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, max_size=14), honest_start=st.booleans())
def test_any_session_leaves_the_server_whole(served, steps, honest_start):
    rig, path = served
    before = open_fds()
    front = Frontend(rig, path)
    try:
        if honest_start:
            front.start()  # a running device, then the hostile part, then a hang-up
        for kind, what, makers in steps:
            try:
                send_step(front, kind, what, makers)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server already closed this connection
            rig.pump(rounds=1)
    finally:
        front.close()
    rig.pump(lambda: rig.server.session is None, rounds=50)
    assert rig.server.session is None
    event(f"last error: {(rig.server.last_error or 'none').split(':')[0]}")
    assert rig.device.queues == ()
    assert rig.server.lingering_mappings == 0
    with open("/proc/self/maps") as maps:
        text = maps.read()
    assert "fuzz-region" not in text and "vhost-user-test" not in text
    # Nothing the session opened is left. (Equality would also catch fds that close
    # meanwhile on their own schedule, e.g. a thread an earlier test left behind: a full
    # run saw one such fd vanish once, and the example passed when run again.)
    assert not open_fds() - before
    honest = Frontend(rig, path)
    try:
        honest.start()
        arp_round_trip(honest)
    finally:
        honest.close()
    rig.pump(lambda: rig.server.session is None, rounds=50)
    assert not open_fds() - before
