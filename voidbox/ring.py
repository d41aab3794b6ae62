"""Split virtqueues (virtio 1.2 §2.7): the compiled `_ring` unless VOIDBOX_PURE=1 or it is missing.

Both implementations export the same names; `IMPLEMENTATION` says which one loaded.
"""

from ._ring_py import (  # noqa: F401  (constants and the exception are shared)
    REQUIRE_ANY,
    REQUIRE_READABLE,
    REQUIRE_WRITABLE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
    QueueError,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from ._twins import pick

_impl = pick("voidbox._ring", "voidbox._ring_py")
Chain, Virtqueue, vring_need_event = _impl.Chain, _impl.Virtqueue, _impl.vring_need_event
IMPLEMENTATION = "cython" if _impl.__name__ == "voidbox._ring" else "pure"

__all__ = [
    "REQUIRE_ANY", "REQUIRE_READABLE", "REQUIRE_WRITABLE", "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT", "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_MAX_SIZE",
    "VIRTQ_USED_F_NO_NOTIFY", "IMPLEMENTATION", "Chain", "QueueError", "Virtqueue",
    "avail_ring_size", "desc_table_size", "used_ring_size", "vring_need_event",
]
