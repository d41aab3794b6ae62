"""Packet capture: Ethernet frames to a classic libpcap file, whatever carries them.

The format is pcap-savefile(5) (draft-ietf-opsawg-pcap §4 and §5): a 24-byte file header,
then one record header and the frame's bytes per frame. The nanosecond magic says that
the second timestamp field counts nanoseconds, which time.time_ns() gives as it is.

The writer knows nothing of TAPs or virtqueues: `voidbox net run` hands it the frames its
TAP reads and writes, and a virtio-net device can hand it those of its queues.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import time

from voidbox.errors import VoidboxError

from .._lazylog import get_logger
from .._records import dataclass

log = get_logger(__name__)

# draft-ietf-opsawg-pcap §4: the magic written in the writer's byte order (little-endian
# here) tells a reader both the byte order and the timestamp resolution.
PCAP_MAGIC_NSEC = 0xA1B23C4D
PCAP_VERSION_MAJOR = 2
PCAP_VERSION_MINOR = 4
LINKTYPE_ETHERNET = 1  # https://www.tcpdump.org/linktypes.html
# tcpdump's default snapshot length (MAXIMUM_SNAPLEN): longer frames are cut to it, and
# the record's original length keeps the size on the wire.
SNAPLEN = 262144
# magic, version major, minor, thiszone (reserved, 0), sigfigs (reserved, 0), snaplen,
# link type.
FILE_HEADER = struct.Struct("<IHHiIII")
# seconds, nanoseconds, captured length, original length.
RECORD_HEADER = struct.Struct("<IIII")
NSEC_PER_SEC = 1_000_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# The file holds at least its header, or a reader takes it for a broken file.
MIN_MAX_BYTES = FILE_HEADER.size
FILE_MODE = 0o600  # a capture holds the command's traffic: its owner alone reads it
BUFFER_SIZE = 256 * 1024


@dataclass(frozen=True)
class PcapSpec:
    """Where to capture and how much: what `--pcap FILE --pcap-max-bytes N` ask for."""

    path: str
    max_bytes: int = DEFAULT_MAX_BYTES


def file_header() -> bytes:
    return FILE_HEADER.pack(PCAP_MAGIC_NSEC, PCAP_VERSION_MAJOR, PCAP_VERSION_MINOR, 0, 0,
                            SNAPLEN, LINKTYPE_ETHERNET)


# Magics of a capture this writer (or tcpdump) may have left at the path: the file is
# then an old capture, and replacing it loses nothing that was not a capture already.
_PCAP_MAGICS = frozenset(struct.pack(order + "I", magic) for order in "<>"
                         for magic in (0xA1B2C3D4, PCAP_MAGIC_NSEC))


_DEV_NULL = os.makedev(1, 3)  # Documentation/admin-guide/devices.txt: mem devices, null


def _refusal(st: os.stat_result, path: str) -> str | None:
    """Why a capture must not go where `st` is: anything but a regular file or /dev/null
    (a FIFO would block, a device might do anything when written, or even opened), and
    another user's file (planted in a shared directory and writable to us, its owner
    would read the capture: this user's traffic)."""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_NULL:
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"cannot write pcap {path}: not a regular file"
    if st.st_uid != os.geteuid():
        return f"pcap {path} belongs to another user: not replacing it"
    return None


def _check_replaceable(fd: int, path: str) -> os.stat_result:
    """The open file's stat, once it is known to be a place a capture may go: see
    _refusal, and a non-empty regular file must be an earlier capture (not a disk image
    or a kernel named by mistake, maybe the VM's own)."""
    st = os.fstat(fd)
    reason = _refusal(st, path)
    if reason is not None:
        raise VoidboxError(reason)
    if stat.S_ISREG(st.st_mode) and st.st_size and os.pread(fd, 4, 0) not in _PCAP_MAGICS:
        raise VoidboxError(f"pcap {path} exists and is not a capture: not replacing it")
    return st


class PcapWriter:
    """Writes each frame given to write() as one pcap record, until max_bytes.

    The file, header included, never grows past max_bytes: the first record that would
    take it past stops the capture for good (one warning), and every frame from then on is
    counted in `dropped`. Records are buffered; close() flushes them.
    """

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}")
        self.path = path
        self.max_bytes = max_bytes
        self.frames = 0  # frames written
        self.dropped = 0  # frames not written: the size bound was reached
        self.stopped = False
        try:
            existing = os.lstat(path)
        except OSError:
            existing = None  # missing (made below), or open() says why
        if (existing is not None and not stat.S_ISLNK(existing.st_mode)  # open: ELOOP
                and (reason := _refusal(existing, path)) is not None):
            raise VoidboxError(reason)  # before open(2): a device may act on being opened
        try:
            # O_NOFOLLOW: a symlink planted at the path cannot redirect the capture onto
            # another file (open(2) fails with ELOOP). Not O_TRUNC: what is there is
            # looked at first (_check_replaceable, again on the open file, which may have
            # been swapped since lstat). O_NONBLOCK and O_NOCTTY: a FIFO or a terminal
            # swapped in must neither block the open nor become ours.
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_NOCTTY, FILE_MODE)
        except OSError as e:
            raise VoidboxError(f"cannot write pcap {path}: {e.strerror}") from None
        try:
            st = _check_replaceable(fd, path)
            os.set_blocking(fd, True)
            if stat.S_ISREG(st.st_mode):
                os.ftruncate(fd, 0)
                # O_CREAT's mode applies only to a new file: an old capture of ours that
                # others could read becomes private too.
                os.fchmod(fd, FILE_MODE)
            self._file = io.BufferedWriter(io.FileIO(fd, "wb", closefd=True), BUFFER_SIZE)
        except OSError as e:
            os.close(fd)
            raise VoidboxError(f"cannot write pcap {path}: {e.strerror or e}") from None
        except BaseException:
            os.close(fd)
            raise
        header = file_header()
        try:
            # Written through at once: a file that opens but takes no data (a full disk,
            # a file size limit, a /proc file) fails here, as one line, before any traffic.
            self._file.write(header)
            self._file.flush()
        except OSError as e:
            self._close_quietly()
            raise VoidboxError(f"cannot write pcap {path}: {e.strerror or e}") from None
        self.size = len(header)

    def write(self, frame: bytes | memoryview) -> None:
        """Append one Ethernet frame, stamped with the time now."""
        if self.stopped:
            self.dropped += 1
            return
        length = len(frame)
        captured = min(length, SNAPLEN)
        record = RECORD_HEADER.size + captured
        if self.size + record > self.max_bytes:
            self.stopped = True
            self.dropped += 1
            log.warning("pcap %s reached %d bytes: capture stopped", self.path, self.size)
            return
        now = time.time_ns()
        file = self._file
        try:
            file.write(RECORD_HEADER.pack(now // NSEC_PER_SEC, now % NSEC_PER_SEC, captured,
                                          length))
            file.write(frame if captured == length else memoryview(frame)[:captured])
        except OSError as e:
            # A full disk ends the capture, not the command whose traffic it records.
            self.stopped = True
            self.dropped += 1
            log.warning("pcap %s: %s: capture stopped", self.path, e.strerror)
            return
        self.size += record
        self.frames += 1

    @property
    def counters(self) -> dict[str, int]:
        return {"pcap_frames": self.frames, "pcap_dropped": self.dropped}

    def flush(self) -> None:
        """Write the buffered records now: before a fork, after which the child writes
        (a buffer left here would be written twice)."""
        try:
            self._file.flush()
        except OSError as e:
            # As in write(): the capture ends, the traffic it records goes on.
            self.stopped = True
            log.warning("pcap %s: %s: capture stopped", self.path, e.strerror)
            self._close_quietly()

    def _close_quietly(self) -> None:
        """Close without flushing what the file refused (close() would try it again)."""
        raw = self._file.raw
        try:
            raw.close()
        except OSError:
            pass

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.close()  # flushes
        except OSError as e:
            log.warning("pcap %s: %s", self.path, e.strerror)

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
