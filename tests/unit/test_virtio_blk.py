"""virtio-blk (virtio 1.2 §5.2) against the driver-side ring mock, over a real image file.

The device is activated directly with a ring the mock configured (the transport is
tested in test_virtio_mmio.py); every request test runs against both ring twins.
A request is a header (type, reserved, sector: §5.2.6), data, and a status byte that
is the last writable byte of the chain.
"""

import errno
import os

import pytest

import voidbox._ring_py as pure
import voidbox.virtio.blk as blk
from tests.requires import requires
from tests.virtio_driver import Driver
from voidbox.errors import UsageError
from voidbox.layout import MiB
from voidbox.virtio.blk import (
    DISCARD_SEGMENT,
    MAX_REQUEST_BYTES,
    REQUEST_HEADER,
    SECTOR_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlockBackend,
    VirtioBlk,
)
from voidbox.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING

IMAGE_SECTORS = 64
QUEUE_SIZE = 16
STATUS_UNTOUCHED = 0xAA  # what the driver puts in the status byte before submitting
UNKNOWN_TYPE = 99
HUGE_BUFFER = 16 * MiB  # three of these claim more than MAX_REQUEST_BYTES
SPARSE_IMAGE_SIZE = 1 << 30


# impl and memory fixtures: tests/unit/conftest.py


def sector_pattern(sector):
    """512 bytes that differ in every sector and every position."""
    return bytes((sector * 7 + i) & 0xFF for i in range(SECTOR_SIZE))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(sector_pattern(s) for s in range(IMAGE_SECTORS)))
    return path


def file_sector(path, sector, count=1):
    with open(path, "rb") as f:
        f.seek(sector * SECTOR_SIZE)
        return f.read(count * SECTOR_SIZE)


class Disk:
    """A VirtioBlk on a ring the driver mock owns; `request()` plays one request."""

    def __init__(self, impl, memory, backend):
        self.memory = memory
        self.backend = backend
        self.device = VirtioBlk(backend)
        self.drv = Driver(memory, size=QUEUE_SIZE)
        self.queue = self.drv.configure(impl.Virtqueue(memory, max_size=blk.QUEUE_SIZE))
        self.interrupts = []
        self.device.activate(memory, (self.queue,), self.interrupts.append)

    def submit(self, buffers):
        """Offer raw [(gpa, length, writable)] as one chain and kick; returns used entries."""
        self.drv.add_chain(buffers)
        self.device.queue_notify(0)
        return self.drv.collect(recycle=True)

    def request(self, kind, sector=0, data=b"", data_in=0, split=1, status=True):
        """-> (status byte, data read, used length). `split` cuts data_in in pieces."""
        header = REQUEST_HEADER.pack(kind, 0, sector)
        bufs = [(self.drv.alloc(len(header), header), len(header), False)]
        if data:
            bufs.append((self.drv.alloc(len(data), data), len(data), False))
        pieces = []
        for i in range(split if data_in else 0):
            n = data_in // split + (data_in % split if i == split - 1 else 0)
            gpa = self.drv.alloc(n, bytes(n))
            pieces.append((gpa, n))
            bufs.append((gpa, n, True))
        status_gpa = self.drv.alloc(1, bytes([STATUS_UNTOUCHED]))
        if status:
            bufs.append((status_gpa, 1, True))
        ((_head, used_len),) = self.submit(bufs)
        read = b"".join(self.memory.read(gpa, n) for gpa, n in pieces)
        return self.memory.read(status_gpa, 1)[0], read, used_len


@pytest.fixture
def disk(impl, memory, image):
    backends = []

    def _make(backend=None, readonly=False):
        backend = backend or BlockBackend(str(image), readonly=readonly)
        backends.append(backend)
        return Disk(impl, memory, backend)

    yield _make
    for backend in backends:
        backend.close()


# -- reads and writes -----------------------------------------------------------------------


def test_read_sector_0(disk):
    d = disk()
    status, data, used = d.request(VIRTIO_BLK_T_IN, 0, data_in=SECTOR_SIZE)
    assert status == VIRTIO_BLK_S_OK
    assert data == sector_pattern(0)
    assert used == SECTOR_SIZE + 1  # data plus the status byte
    assert d.interrupts == [VIRTIO_MMIO_INT_VRING]


def test_read_several_sectors_into_split_buffers(disk):
    d = disk()
    status, data, used = d.request(VIRTIO_BLK_T_IN, 5, data_in=3 * SECTOR_SIZE, split=3)
    assert status == VIRTIO_BLK_S_OK
    assert data == sector_pattern(5) + sector_pattern(6) + sector_pattern(7)
    assert used == 3 * SECTOR_SIZE + 1


def test_write_then_read_back(disk, image):
    d = disk()
    payload = bytes([0x5A]) * SECTOR_SIZE + bytes(range(256)) * 2
    status, _, used = d.request(VIRTIO_BLK_T_OUT, 9, data=payload)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert file_sector(image, 9, 2) == payload
    assert file_sector(image, 8) == sector_pattern(8)  # neighbours untouched
    assert file_sector(image, 11) == sector_pattern(11)
    status, data, _ = d.request(VIRTIO_BLK_T_IN, 9, data_in=2 * SECTOR_SIZE)
    assert status == VIRTIO_BLK_S_OK and data == payload


def test_flush_calls_fdatasync_and_the_data_is_in_the_file(disk, image, monkeypatch):
    d = disk()
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(blk.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    d.request(VIRTIO_BLK_T_OUT, 3, data=b"\x11" * SECTOR_SIZE)
    status, _, used = d.request(VIRTIO_BLK_T_FLUSH)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert synced == [d.backend.fd]
    assert d.device.counters["flushes"] == 1
    assert file_sector(image, 3) == b"\x11" * SECTOR_SIZE


def test_flush_failure_is_an_ioerr(disk, monkeypatch):
    d = disk()

    def failing(fd):
        raise OSError(errno.EIO, "lost the disk")

    monkeypatch.setattr(blk.os, "fdatasync", failing)
    status, _, _ = d.request(VIRTIO_BLK_T_FLUSH)
    assert status == VIRTIO_BLK_S_IOERR
    assert d.device.counters["ioerr"] == 1


def test_get_id_returns_20_bytes_of_serial(disk):
    d = disk()
    status, data, used = d.request(VIRTIO_BLK_T_GET_ID, data_in=VIRTIO_BLK_ID_BYTES)
    assert status == VIRTIO_BLK_S_OK
    assert len(data) == VIRTIO_BLK_ID_BYTES and used == VIRTIO_BLK_ID_BYTES + 1
    assert data.rstrip(b"\0") == d.backend.serial and data.startswith(b"voidbox-")


def segment(sector, count, flags=0):
    return DISCARD_SEGMENT.pack(sector, count, flags)


def test_write_zeroes_reads_back_as_zeroes(disk, image):
    d = disk()
    size = image.stat().st_size
    status, _, _ = d.request(VIRTIO_BLK_T_WRITE_ZEROES, data=segment(4, 3))
    assert status == VIRTIO_BLK_S_OK
    assert file_sector(image, 4, 3) == bytes(3 * SECTOR_SIZE)
    assert file_sector(image, 3) == sector_pattern(3) and file_sector(image, 7) == sector_pattern(7)
    assert image.stat().st_size == size


def test_discard_keeps_the_size_and_the_neighbours(disk, image):
    d = disk()
    size = image.stat().st_size
    status, _, _ = d.request(VIRTIO_BLK_T_DISCARD, data=segment(10, 2))
    assert status == VIRTIO_BLK_S_OK
    assert image.stat().st_size == size
    assert file_sector(image, 9) == sector_pattern(9) and file_sector(image, 12) == sector_pattern(12)
    # Discarded sectors read as either their old contents or zeroes, never anything else.
    assert file_sector(image, 10, 2) in (sector_pattern(10) + sector_pattern(11), bytes(1024))


def test_discard_and_write_zeroes_with_bad_ranges(disk, image):
    d = disk()
    before = image.read_bytes()
    for kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        assert d.request(kind, data=segment(IMAGE_SECTORS - 1, 2))[0] == VIRTIO_BLK_S_IOERR
        assert d.request(kind, data=segment((1 << 64) - 1, 1))[0] == VIRTIO_BLK_S_IOERR
        # Only one segment is supported (max_discard_seg = 1).
        two = segment(0, 1) + segment(2, 1)
        assert d.request(kind, data=two)[0] == VIRTIO_BLK_S_UNSUPP
        assert d.request(kind, data=b"short")[0] == VIRTIO_BLK_S_UNSUPP
    assert image.read_bytes() == before


def test_reserved_discard_flags_are_unsupported(disk, image):
    """§5.2.6.2: DISCARD with the unmap flag (or any flag), WRITE_ZEROES with a reserved one."""
    d = disk()
    before = image.read_bytes()
    assert d.request(VIRTIO_BLK_T_DISCARD, data=segment(4, 1, flags=1))[0] == VIRTIO_BLK_S_UNSUPP
    assert d.request(VIRTIO_BLK_T_WRITE_ZEROES, data=segment(4, 1, flags=2))[0] == VIRTIO_BLK_S_UNSUPP
    assert image.read_bytes() == before
    assert d.request(VIRTIO_BLK_T_WRITE_ZEROES, data=segment(4, 1, flags=1))[0] == VIRTIO_BLK_S_OK
    assert file_sector(image, 4) == bytes(SECTOR_SIZE)


def test_features(disk):
    features = disk().device.features
    assert features & (1 << VIRTIO_F_VERSION_1)
    assert features & (1 << VIRTIO_BLK_F_FLUSH)
    assert features & (1 << VIRTIO_BLK_F_DISCARD) and features & (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    assert not features & (1 << VIRTIO_BLK_F_RO)


# -- read-only ------------------------------------------------------------------------------


def test_readonly_offers_ro_and_refuses_writes_with_ioerr(disk, image, monkeypatch):
    d = disk(readonly=True)
    before = image.read_bytes()
    features = d.device.features
    assert features & (1 << VIRTIO_BLK_F_RO)
    assert not features & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES)
    status, _, used = d.request(VIRTIO_BLK_T_OUT, 0, data=b"\xff" * SECTOR_SIZE)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert d.request(VIRTIO_BLK_T_DISCARD, data=segment(0, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert d.request(VIRTIO_BLK_T_WRITE_ZEROES, data=segment(0, 1))[0] == VIRTIO_BLK_S_UNSUPP
    synced = []
    monkeypatch.setattr(blk.os, "fdatasync", synced.append)
    assert d.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK and synced == []
    status, data, _ = d.request(VIRTIO_BLK_T_IN, 1, data_in=SECTOR_SIZE)
    assert status == VIRTIO_BLK_S_OK and data == sector_pattern(1)
    assert image.read_bytes() == before


# -- bad requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sector,sectors",
    [(IMAGE_SECTORS, 1), (IMAGE_SECTORS - 1, 2), ((1 << 64) - 1, 1), (1 << 55, 1)],
    ids=["at-end", "straddles-end", "u64-max", "offset-overflows-u64"],
)
def test_out_of_range_sectors_are_ioerr(disk, image, sector, sectors):
    d = disk()
    before = image.read_bytes()
    status, data, _ = d.request(VIRTIO_BLK_T_IN, sector, data_in=sectors * SECTOR_SIZE)
    assert status == VIRTIO_BLK_S_IOERR and data == bytes(sectors * SECTOR_SIZE)
    status, _, _ = d.request(VIRTIO_BLK_T_OUT, sector, data=b"\x77" * (sectors * SECTOR_SIZE))
    assert status == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


@pytest.mark.parametrize("length", [1, 100, SECTOR_SIZE - 1, SECTOR_SIZE + 1])
def test_length_not_a_multiple_of_512_is_ioerr(disk, image, length):
    d = disk()
    before = image.read_bytes()
    status, data, _ = d.request(VIRTIO_BLK_T_IN, 0, data_in=length)
    assert status == VIRTIO_BLK_S_IOERR and data == bytes(length)
    assert d.request(VIRTIO_BLK_T_OUT, 0, data=b"\x33" * length)[0] == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


def test_unknown_type_is_unsupp(disk):
    d = disk()
    status, _, used = d.request(UNKNOWN_TYPE, data_in=SECTOR_SIZE)
    assert (status, used) == (VIRTIO_BLK_S_UNSUPP, 1)
    assert d.device.counters["unsupported"] == 1


def test_chain_without_status_byte_is_consumed_without_side_effects(disk, image):
    d = disk()
    before = image.read_bytes()
    status, _, used = d.request(VIRTIO_BLK_T_OUT, 0, data=b"\xee" * SECTOR_SIZE, status=False)
    assert used == 0 and status == STATUS_UNTOUCHED
    assert d.device.counters["malformed"] == 1
    assert image.read_bytes() == before
    # The queue carries on.
    assert d.request(VIRTIO_BLK_T_IN, 2, data_in=SECTOR_SIZE)[1] == sector_pattern(2)


@pytest.mark.parametrize("kind,header_len", [(VIRTIO_BLK_T_OUT, 8), (VIRTIO_BLK_T_IN, 12),
                                              (VIRTIO_BLK_T_FLUSH, 0)])
def test_header_too_short_is_consumed_without_side_effects(disk, image, kind, header_len):
    d = disk()
    before = image.read_bytes()
    header = REQUEST_HEADER.pack(kind, 0, 0)[:header_len]
    data_gpa = d.drv.alloc(SECTOR_SIZE, b"\xdd" * SECTOR_SIZE)
    status_gpa = d.drv.alloc(1, bytes([STATUS_UNTOUCHED]))
    bufs = [(d.drv.alloc(16, header), header_len, False)] if header_len else []
    bufs += [(data_gpa, SECTOR_SIZE, True), (status_gpa, 1, True)]
    used = d.submit(bufs)
    assert [n for _, n in used] == [0]
    assert memory_byte(d, status_gpa) == STATUS_UNTOUCHED
    assert d.memory.read(data_gpa, SECTOR_SIZE) == b"\xdd" * SECTOR_SIZE
    assert image.read_bytes() == before
    assert d.device.counters["malformed"] == 1


def memory_byte(d, gpa):
    return d.memory.read(gpa, 1)[0]


def test_malformed_chains_alone_still_raise_the_interrupt(disk, impl):
    """A kick that only retires malformed chains must still notify: the driver waits."""
    d = disk()
    nxt = pure.VIRTQ_DESC_F_NEXT
    head = d.drv.free.pop(0)
    d.drv.write_desc(head, d.drv.alloc(16), 16, nxt, QUEUE_SIZE + 3)  # next out of range
    d.drv.offer(head)
    d.device.queue_notify(0)
    assert d.drv.collect() == [(head, 0)]
    assert d.interrupts == [VIRTIO_MMIO_INT_VRING]


# -- backend failures -----------------------------------------------------------------------


class FailingBackend(BlockBackend):
    def __init__(self, path, fail_read=False, fail_write=True):
        super().__init__(path)
        self.fail_read, self.fail_write = fail_read, fail_write

    def pwrite(self, data, offset):
        if self.fail_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().pwrite(data, offset)

    def pread(self, length, offset):
        if self.fail_read:
            raise OSError(errno.EIO, "Input/output error")
        return super().pread(length, offset)


def test_write_error_reaches_the_guest_as_ioerr(disk, image):
    d = disk(FailingBackend(str(image)))
    status, _, used = d.request(VIRTIO_BLK_T_OUT, 0, data=b"\x01" * SECTOR_SIZE)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert d.device.counters["ioerr"] == 1
    # The queue keeps serving.
    assert d.request(VIRTIO_BLK_T_IN, 0, data_in=SECTOR_SIZE)[:2] == (VIRTIO_BLK_S_OK, sector_pattern(0))


def test_read_error_reaches_the_guest_as_ioerr(disk, image):
    d = disk(FailingBackend(str(image), fail_read=True, fail_write=False))
    status, data, used = d.request(VIRTIO_BLK_T_IN, 0, data_in=SECTOR_SIZE)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert data == bytes(SECTOR_SIZE)


@requires(os.path.exists("/dev/full"), "needs /dev/full")
def test_a_full_device_reaches_the_guest_as_ioerr(disk, image):
    """A real ENOSPC: the backend's fd swapped for /dev/full (every write fails)."""
    d = disk()
    full = os.open("/dev/full", os.O_RDWR | os.O_CLOEXEC)
    os.dup2(full, d.backend.fd)
    os.close(full)
    status, _, _ = d.request(VIRTIO_BLK_T_OUT, 0, data=b"\x02" * SECTOR_SIZE)
    assert status == VIRTIO_BLK_S_IOERR
    # The final sync fails on /dev/full too: close() raises, and still closes the fd.
    fd = d.backend.fd
    with pytest.raises(OSError):
        d.backend.close()
    assert d.backend.fd == -1
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


class RecordingBackend(BlockBackend):
    def __init__(self, path):
        super().__init__(path)
        self.calls = []

    def pread(self, length, offset):
        self.calls.append(("pread", length))
        return super().pread(length, offset)

    def pwrite(self, data, offset):
        self.calls.append(("pwrite", len(data)))
        super().pwrite(data, offset)


def test_a_huge_claimed_length_is_refused_before_any_allocation(disk, tmp_path):
    sparse = tmp_path / "big.img"
    with open(sparse, "wb") as f:
        f.truncate(SPARSE_IMAGE_SIZE)  # large enough that the range check alone would pass
    d = disk(RecordingBackend(str(sparse)))
    drv = d.drv
    header = REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)
    big = drv.alloc(HUGE_BUFFER)
    # Three descriptors over the same 16 MiB claim 48 MiB, more than MAX_REQUEST_BYTES.
    assert 3 * HUGE_BUFFER > MAX_REQUEST_BYTES and 3 * HUGE_BUFFER < SPARSE_IMAGE_SIZE
    status_gpa = drv.alloc(1, bytes([STATUS_UNTOUCHED]))
    used = d.submit([(drv.alloc(len(header), header), len(header), False)]
                    + [(big, HUGE_BUFFER, True)] * 3 + [(status_gpa, 1, True)])
    assert [n for _, n in used] == [1]
    assert memory_byte(d, status_gpa) == VIRTIO_BLK_S_IOERR
    header = REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 0)
    used = d.submit([(drv.alloc(len(header), header), len(header), False)]
                    + [(big, HUGE_BUFFER, False)] * 3 + [(status_gpa, 1, True)])
    assert memory_byte(d, status_gpa) == VIRTIO_BLK_S_IOERR
    assert d.backend.calls == []  # neither the read nor the gather of the write happened


# -- the image file ---------------------------------------------------------------------------


def test_second_writer_is_refused_with_a_one_line_usage_error(image):
    first = BlockBackend(str(image))
    try:
        with pytest.raises(UsageError) as info:
            BlockBackend(str(image))
        message = str(info.value)
        assert "in use" in message and str(image) in message and "\n" not in message
        with pytest.raises(UsageError):
            BlockBackend(str(image), readonly=True)  # a reader would see a disk in flux
    finally:
        first.close()
    BlockBackend(str(image)).close()  # the lock went with the first one


def test_readers_share_the_image_but_exclude_a_writer(image):
    a = BlockBackend(str(image), readonly=True)
    b = BlockBackend(str(image), readonly=True)
    try:
        with pytest.raises(UsageError):
            BlockBackend(str(image))
    finally:
        a.close()
        b.close()


def test_missing_image_and_odd_size_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="cannot open"):
        BlockBackend(str(tmp_path / "absent.img"))
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(SECTOR_SIZE + 1))
    with pytest.raises(UsageError, match="512-byte sectors"):
        BlockBackend(str(odd))
    # The refused open released its lock: a writer gets the file (and is refused again
    # only for its size).
    with pytest.raises(UsageError, match="512-byte sectors"):
        BlockBackend(str(odd))


def test_capacity_in_config_space(disk):
    d = disk()
    assert d.device.config_read(0, 8) == IMAGE_SECTORS
    assert d.device.config_read(20, 4) == SECTOR_SIZE  # blk_size
