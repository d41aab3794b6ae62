"""A virtio-net card's zero-copy paths, compiled (voidbox._netrx) unless VOIDBOX_PURE=1 or
it is missing; `COMPILED` says which.

- `RingStream`: host TCP data peeked from a socket into RX buffers (the NAT's relay).
- `readv_into_chains` / `writev_from_chain`: a TAP's frames read into RX buffers, and TX
  chains written to a TAP, with iovecs into guest memory.
"""

from .._twins import pick

# Not built: the same behaviour, with a copy on the way.
_impl = pick("voidbox._netrx", "voidbox.virtio._netrx_py")
RingStream = _impl.RingStream
readv_into_chains, writev_from_chain = _impl.readv_into_chains, _impl.writev_from_chain
COMPILED = _impl.__name__ == "voidbox._netrx"

__all__ = ["COMPILED", "RingStream", "readv_into_chains", "writev_from_chain"]
