"""Fixtures shared by the virtqueue, virtio-mmio and virtio-blk unit tests."""

import pytest

from tests.twins import load_ring
from voidbox.layout import MiB
from voidbox.memory import GuestMemory

RING_MEM_SIZE = 64 * MiB


@pytest.fixture(params=["cython", "pure"])
def impl(request):
    """The virtqueue module: compiled voidbox._ring, then its pure twin."""
    return load_ring(request.param)


@pytest.fixture
def memory():
    """64 MiB of guest memory for rings, buffers and the requests in them."""
    with GuestMemory(RING_MEM_SIZE) as mem:
        yield mem
