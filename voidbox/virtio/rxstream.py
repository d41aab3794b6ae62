"""Host TCP data into a virtio-net card's RX buffers (`RingStream`): the compiled
voidbox._netrx unless VOIDBOX_PURE=1 or it is missing; `COMPILED` says which."""

import os

if os.environ.get("VOIDBOX_PURE") == "1":
    from ._netrx_py import RingStream
else:
    try:
        from voidbox._netrx import RingStream
    except ImportError:  # not built: the same behaviour, with a copy on the way
        from ._netrx_py import RingStream

COMPILED = RingStream.__module__ == "voidbox._netrx"

__all__ = ["COMPILED", "RingStream"]
