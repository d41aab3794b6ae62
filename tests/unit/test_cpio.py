"""The cpio newc writer, read back by an independent parser and by busybox cpio."""

import io
import shutil
import stat
import subprocess

import pytest

from tests.requires import requires
from voidbox.image.cpio import CpioWriter


def parse_newc(data: bytes) -> list[dict]:
    """A reader written from buffer-format.rst, independent of the writer's code."""
    members = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, check = fields
        name_start = pos + 110
        name = data[name_start:name_start + namesize]
        assert name.endswith(b"\0")
        data_start = name_start + namesize
        data_start += -data_start % 4
        body = data[data_start:data_start + size]
        pos = data_start + size
        pos += -pos % 4
        name = name[:-1].decode()
        if name == "TRAILER!!!":
            assert pos == len(data), "bytes after the trailer"
            return members
        members.append(dict(name=name, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime,
                            data=body, rdev=(rmaj, rmin), ino=ino, check=check))


def sample_archive() -> bytes:
    out = io.BytesIO()
    with CpioWriter(out) as cpio:
        cpio.add_dir("bin")
        cpio.add_dir("dev")
        cpio.add_char_device("dev/console", 5, 1)
        cpio.add_file("bin/busybox", b"\x7fELF" + b"x" * 13, 0o755)
        cpio.add_symlink("bin/sh", "busybox")
        cpio.add_file("init", b"#!/bin/sh\n", 0o755)
        cpio.add_file("empty", b"")
    return out.getvalue()


def test_members_round_trip():
    members = {m["name"]: m for m in parse_newc(sample_archive())}
    assert list(members) == ["bin", "dev", "dev/console", "bin/busybox", "bin/sh", "init", "empty"]
    assert stat.S_ISDIR(members["bin"]["mode"])
    assert stat.S_ISCHR(members["dev/console"]["mode"])
    assert members["dev/console"]["rdev"] == (5, 1)
    assert stat.S_IMODE(members["dev/console"]["mode"]) == 0o600
    assert stat.S_ISREG(members["bin/busybox"]["mode"])
    assert stat.S_IMODE(members["bin/busybox"]["mode"]) == 0o755
    assert members["bin/busybox"]["data"] == b"\x7fELF" + b"x" * 13  # 17 bytes: padding needed
    assert stat.S_ISLNK(members["bin/sh"]["mode"])
    assert members["bin/sh"]["data"] == b"busybox"
    assert members["empty"]["data"] == b""
    assert {m["uid"] for m in members.values()} == {0}
    assert {m["mtime"] for m in members.values()} == {0}
    assert len({m["ino"] for m in members.values()}) == len(members)


def newc_header(*fields: str) -> bytes:
    """The magic and thirteen 8-digit hex fields, as typed below (buffer-format.rst)."""
    assert len(fields) == 13 and all(len(f) == 8 for f in fields)
    return b"070701" + "".join(fields).encode()


# A directory, a 5-byte file and a character device, then the trailer, laid out by hand from
# the kernel's buffer-format.rst: fields ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
# devminor, rdevmajor, rdevminor, namesize (NUL included), check. Header + name pad to 4, and
# the data pads to 4. Inodes count from 1 (0 is the trailer's); mtime 0 makes it reproducible.
EXPECTED_LAYOUT = (
    # "d": mode 040755, nlink 2; 110 + 2 = 112 bytes, already aligned
    newc_header("00000001", "000041ED", "00000000", "00000000", "00000002", "00000000",
                "00000000", "00000000", "00000000", "00000000", "00000000", "00000002",
                "00000000")
    + b"d\0"
    # "d/f": mode 0100644, 5 bytes; 110 + 4 = 114 -> 2 pad bytes; 5 data bytes -> 3 pad bytes
    + newc_header("00000002", "000081A4", "00000000", "00000000", "00000001", "00000000",
                  "00000005", "00000000", "00000000", "00000000", "00000000", "00000004",
                  "00000000")
    + b"d/f\0" + b"\0" * 2 + b"hello" + b"\0" * 3
    # "d/tty": mode 020600, rdev 4:64; 110 + 6 = 116, aligned; no data
    + newc_header("00000003", "00002180", "00000000", "00000000", "00000001", "00000000",
                  "00000000", "00000000", "00000000", "00000004", "00000040", "00000006",
                  "00000000")
    + b"d/tty\0"
    # the trailer: all zero but nlink 1 and namesize 11; 110 + 11 = 121 -> 3 pad bytes
    + newc_header("00000000", "00000000", "00000000", "00000000", "00000001", "00000000",
                  "00000000", "00000000", "00000000", "00000000", "00000000", "0000000B",
                  "00000000")
    + b"TRAILER!!!\0" + b"\0" * 3
)


def test_byte_layout_matches_the_format_written_out_by_hand():
    out = io.BytesIO()
    with CpioWriter(out) as cpio:
        cpio.add_dir("d")
        cpio.add_file("d/f", b"hello")
        cpio.add_char_device("d/tty", 4, 64)
    assert out.getvalue() == EXPECTED_LAYOUT
    assert len(EXPECTED_LAYOUT) == 112 + 116 + 8 + 116 + 124


def test_alignment_of_every_header():
    data = sample_archive()
    assert len(data) % 4 == 0
    # Every header starts on a 4-byte boundary: parse_newc asserts the magic at each one.
    assert len(parse_newc(data)) == 7


@pytest.mark.parametrize("name", ["", "/", "a/../b", "./x", "a//b", "TRAILER!!!", "nul\0x"])
def test_rejects_bad_names(name):
    with pytest.raises(ValueError):
        CpioWriter(io.BytesIO()).add_file(name, b"")


def test_rejects_member_before_its_directory():
    with pytest.raises(ValueError, match="before its directory"):
        CpioWriter(io.BytesIO()).add_file("lib/x.ko", b"")


def test_rejects_duplicates_and_writes_after_close():
    cpio = CpioWriter(io.BytesIO())
    cpio.add_file("a", b"1")
    with pytest.raises(ValueError, match="duplicate"):
        cpio.add_file("/a", b"2")
    cpio.close()
    with pytest.raises(ValueError, match="closed"):
        cpio.add_file("b", b"")


@requires(shutil.which("busybox") is not None, "needs busybox for its cpio applet")
def test_busybox_cpio_lists_and_extracts(tmp_path):
    data = sample_archive()
    listing = subprocess.run(["busybox", "cpio", "-t"], input=data, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["bin", "dev", "dev/console", "bin/busybox", "bin/sh", "init", "empty"]
    # Extract everything but the device node (mknod would need root, and is not the point).
    subprocess.run(["busybox", "cpio", "-i", "-d", "bin/*", "init"], input=data, cwd=tmp_path,
                   capture_output=True, check=True)
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\n"
    assert (tmp_path / "bin/sh").readlink().as_posix() == "busybox"
    assert (tmp_path / "bin/busybox").stat().st_size == 17
