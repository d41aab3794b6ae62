"""virtio-blk (virtio 1.2 §5.2): a raw image file as the guest's disk.

Requests run on the device's own I/O thread (a LoopThread: see vm.py). The image is
locked with flock so two VMs never write one disk; --readonly opens it O_RDONLY and offers
VIRTIO_BLK_F_RO. Write errors reach the guest as VIRTIO_BLK_S_IOERR. A FLUSH is an
fdatasync, and close() syncs too, so nothing the guest wrote and flushed is lost when the
VMM exits.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import UsageError
from .device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING, VirtioDevice

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
SECTOR_SHIFT = 9

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and statuses (§5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

REQUEST_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
DISCARD_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # header and status take a descriptor each
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per request
MAX_DISCARD_SEG = 1
# One request may move at most this much data: a guest cannot make the VMM allocate more.
MAX_REQUEST_BYTES = 32 << 20

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with a mode (os.posix_fallocate has none); False if unsupported."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    return libc.fallocate(fd, mode, offset, length) == 0


class BlockBackend:
    """A raw image file, locked, with positional I/O."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as error:
            raise UsageError(f"cannot open disk image {path!r}: {error.strerror}") from None
        try:
            # Shared lock for readers, exclusive for a writer: a second writer is refused.
            fcntl.flock(self.fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(f"disk image {path!r} is in use by another process") from None
        self.size = os.fstat(self.fd).st_size
        if self.size % SECTOR_SIZE:
            os.close(self.fd)
            raise UsageError(f"disk image {path!r} is not a whole number of 512-byte sectors")
        stat = os.fstat(self.fd)
        self.serial = f"voidbox-{stat.st_dev:x}-{stat.st_ino:x}".encode()[:VIRTIO_BLK_ID_BYTES]

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, "short read")
        return data

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            if written <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[written:]
            offset += written

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def punch(self, offset: int, length: int, zero: bool) -> None:
        """Deallocate a range (DISCARD) or make it read as zeroes (WRITE_ZEROES)."""
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if zero:
            chunk = bytes(min(length, 1 << 20))
            end = offset + length
            while offset < end:
                self.pwrite(chunk[: end - offset], offset)
                offset += len(chunk)

    def close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            if not self.readonly:
                os.fsync(fd)
        finally:
            os.close(fd)  # also when the sync failed: the error is raised, the fd not leaked


class VirtioBlk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, backend: BlockBackend):
        super().__init__()
        self.backend = backend
        self.counters = {"requests": 0, "ioerr": 0, "unsupported": 0, "malformed": 0, "flushes": 0}

    @property
    def features(self) -> int:
        bits = (
            (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
        )
        if self.backend.readonly:
            bits |= 1 << VIRTIO_BLK_F_RO
        else:
            bits |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        return bits

    def config_bytes(self) -> bytes:
        """struct virtio_blk_config (§5.2.4), up to the write-zeroes fields."""
        capacity = self.backend.size >> SECTOR_SHIFT
        config = struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            capacity,
            0,  # size_max (feature not offered)
            SEG_MAX,
            0, 0, 0,  # geometry
            SECTOR_SIZE,  # blk_size
            0, 0, 0, 0,  # topology
            0,  # writeback (no VIRTIO_BLK_F_CONFIG_WCE)
            0,  # unused0
            0,  # num_queues (needs VIRTIO_BLK_F_MQ)
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,  # discard_sector_alignment
            MAX_DISCARD_SECTORS,  # max_write_zeroes_sectors
            MAX_DISCARD_SEG,
            1,  # write_zeroes_may_unmap
        )
        return config

    def queue_notify(self, index: int) -> None:
        queue = self.queues[index] if index < len(self.queues) else None
        if queue is None:
            return
        while True:
            chains = queue.pop()
            if chains:
                queue.push_many([(chain.head, self._serve(chain)) for chain in chains])
            # Also after a pop that only retired malformed chains: their used entries
            # were published too, and the driver waits for them.
            if queue.needs_notification():
                self.interrupt(VIRTIO_MMIO_INT_VRING)
            if not chains:
                break

    def _serve(self, chain) -> int:
        """Serve one request; returns the number of bytes written into the chain."""
        self.counters["requests"] += 1
        # §5.2.6: header (readable), data, then one writable status byte at the very end.
        if chain.readable < REQUEST_HEADER.size or chain.writable < 1:
            self.counters["malformed"] += 1
            return 0
        kind, _reserved, sector = REQUEST_HEADER.unpack(chain.read(0, REQUEST_HEADER.size))
        data_out = chain.readable - REQUEST_HEADER.size
        data_in = chain.writable - 1
        status_at = data_in
        try:
            status, written = self._execute(chain, kind, sector, data_out, data_in)
        except OSError:
            self.counters["ioerr"] += 1
            status, written = VIRTIO_BLK_S_IOERR, 0
        chain.write(bytes([status]), status_at)
        return written + 1

    def _execute(self, chain, kind, sector, data_out, data_in):
        backend = self.backend
        if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            length = data_in if kind == VIRTIO_BLK_T_IN else data_out
            offset = sector << SECTOR_SHIFT
            if length % SECTOR_SIZE or length > MAX_REQUEST_BYTES or offset + length > backend.size:
                return VIRTIO_BLK_S_IOERR, 0
            if kind == VIRTIO_BLK_T_IN:
                chain.write(backend.pread(length, offset), 0)
                return VIRTIO_BLK_S_OK, length
            if backend.readonly:
                return VIRTIO_BLK_S_IOERR, 0
            backend.pwrite(chain.read(REQUEST_HEADER.size, length), offset)
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_FLUSH:
            self.counters["flushes"] += 1
            if not backend.readonly:
                backend.flush()
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_GET_ID:
            ident = backend.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[: min(data_in, VIRTIO_BLK_ID_BYTES)]
            chain.write(ident, 0)
            return VIRTIO_BLK_S_OK, len(ident)
        if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and not backend.readonly:
            if data_out != DISCARD_SEGMENT.size:
                return VIRTIO_BLK_S_UNSUPP, 0
            start, count, flags = DISCARD_SEGMENT.unpack(chain.read(REQUEST_HEADER.size, data_out))
            # §5.2.6.2: the unmap flag is only for WRITE_ZEROES; any other flag is reserved.
            allowed = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if kind == VIRTIO_BLK_T_WRITE_ZEROES else 0
            if flags & ~allowed:
                return VIRTIO_BLK_S_UNSUPP, 0
            offset, length = start << SECTOR_SHIFT, count << SECTOR_SHIFT
            if count > MAX_DISCARD_SECTORS or offset + length > backend.size:
                return VIRTIO_BLK_S_IOERR, 0
            backend.punch(offset, length, zero=kind == VIRTIO_BLK_T_WRITE_ZEROES)
            return VIRTIO_BLK_S_OK, 0
        self.counters["unsupported"] += 1
        return VIRTIO_BLK_S_UNSUPP, 0

    def close(self) -> None:
        self.backend.close()
