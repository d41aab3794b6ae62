"""A virtio-net card's zero-copy paths, compiled (voidbox._netrx) unless VOIDBOX_PURE=1 or
it is missing; `COMPILED` says which.

- `RingStream`: host TCP data peeked from a socket into RX buffers (the NAT's relay).
- `readv_into_chains` / `writev_from_chain`: a TAP's frames read into RX buffers, and TX
  chains written to a TAP, with iovecs into guest memory.
"""

import os

if os.environ.get("VOIDBOX_PURE") == "1":
    from ._netrx_py import RingStream, readv_into_chains, writev_from_chain
else:
    try:
        from voidbox._netrx import RingStream, readv_into_chains, writev_from_chain
    except ImportError:  # not built: the same behaviour, with a copy on the way
        from ._netrx_py import RingStream, readv_into_chains, writev_from_chain

COMPILED = RingStream.__module__ == "voidbox._netrx"

__all__ = ["COMPILED", "RingStream", "readv_into_chains", "writev_from_chain"]
