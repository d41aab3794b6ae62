"""A writer for the cpio "newc" archives the Linux kernel unpacks as its initramfs.

Format: Linux `Documentation/driver-api/early-userspace/buffer-format.rst` (the "newc" /
SVR4-without-CRC variant, magic ``070701``). Each member is a 110-byte ASCII header of
thirteen 8-digit hex fields, the NUL-terminated name padded to a multiple of 4 (counting the
header), then the data padded to a multiple of 4. The archive ends with a member named
``TRAILER!!!``.

Nothing here needs root: owners, modes and device numbers are just header fields, so an
unprivileged build can still ship ``/dev/console`` owned by root.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

CPIO_NEWC_MAGIC = b"070701"
CPIO_TRAILER = "TRAILER!!!"
CPIO_ALIGN = 4
CPIO_HEADER_FIELDS = 13  # after the magic: ino mode uid gid nlink mtime filesize devmaj devmin rdevmaj rdevmin namesize check
CPIO_FIELD_MAX = 0xFFFFFFFF  # each field is 8 hex digits
CPIO_HEADER_SIZE = len(CPIO_NEWC_MAGIC) + 8 * CPIO_HEADER_FIELDS  # 110 bytes

# File types the kernel's initramfs unpacker creates (init/initramfs.c do_name/do_copy).
_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO}


def _pad(length: int) -> bytes:
    return b"\0" * (-length % CPIO_ALIGN)


class CpioWriter:
    """Writes newc members to a binary stream, in the order they are added.

    Members are written as given: the kernel creates each path on the fly, so a directory must
    be added before anything inside it. The writer enforces that and rejects duplicate names.
    Timestamps are 0 so the same inputs give byte-identical archives.
    """

    def __init__(self, stream: BinaryIO, *, uid: int = 0, gid: int = 0, mtime: int = 0):
        self._stream = stream
        self._uid = uid
        self._gid = gid
        self._mtime = mtime
        self._next_ino = 1  # inode 0 is the trailer's, by convention
        self._names: set[str] = set()
        self._dirs: set[str] = {""}
        self._closed = False

    # -- members --------------------------------------------------------------------------

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        name = self._check_name(name)
        self._write_member(name, stat.S_IFDIR | (mode & 0o7777), b"", nlink=2)
        self._dirs.add(name)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._write_member(self._check_name(name), stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, name: str, target: str) -> None:
        if not target or "\0" in target:
            raise ValueError(f"bad symlink target for {name!r}: {target!r}")
        self._write_member(self._check_name(name), stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._write_member(
            self._check_name(name), stat.S_IFCHR | (mode & 0o7777), b"", rdev=(major, minor)
        )

    def close(self) -> None:
        """Write the trailer. The stream stays open (it belongs to the caller)."""
        if self._closed:
            return
        self._write_header(CPIO_TRAILER, ino=0, mode=0, nlink=1, filesize=0, rdev=(0, 0))
        self._closed = True

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    # -- internals ------------------------------------------------------------------------

    def _check_name(self, name: str) -> str:
        """Archive names are relative ("init", "bin/sh"), as the kernel's own cpio lists are."""
        name = name.strip("/")
        parts = name.split("/")
        if not name or "\0" in name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad cpio member name: {name!r}")
        if name == CPIO_TRAILER:
            raise ValueError(f"{CPIO_TRAILER} is reserved for the end of the archive")
        if name in self._names:
            raise ValueError(f"duplicate cpio member: {name!r}")
        parent = "/".join(parts[:-1])
        if parent not in self._dirs:
            raise ValueError(f"cpio member {name!r} added before its directory {parent!r}")
        return name

    def _write_member(self, name: str, mode: int, data: bytes, *, nlink: int = 1,
                      rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("cpio archive already closed")
        if stat.S_IFMT(mode) not in _TYPES:
            raise ValueError(f"unsupported cpio member type {oct(mode)}")
        if len(data) > CPIO_FIELD_MAX:
            raise ValueError(f"{name!r} is too large for a newc archive")
        self._names.add(name)
        ino = self._next_ino
        self._next_ino += 1
        self._write_header(name, ino=ino, mode=mode, nlink=nlink, filesize=len(data), rdev=rdev)
        self._stream.write(data)
        self._stream.write(_pad(len(data)))

    def _write_header(self, name: str, *, ino: int, mode: int, nlink: int, filesize: int,
                      rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            ino, mode, self._uid, self._gid, nlink, self._mtime, filesize,
            0, 0,  # c_devmajor, c_devminor: the (fake) device holding the file
            rdev[0], rdev[1],
            len(encoded),  # c_namesize counts the NUL
            0,  # c_check: only the "070702" CRC format uses it
        )
        for value in fields:
            if not 0 <= value <= CPIO_FIELD_MAX:
                raise ValueError(f"cpio header field out of range for {name!r}: {value}")
        header = CPIO_NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        self._stream.write(header)
        self._stream.write(encoded)
        self._stream.write(_pad(CPIO_HEADER_SIZE + len(encoded)))
