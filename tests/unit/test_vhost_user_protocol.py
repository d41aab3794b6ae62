"""The vhost-user codec (voidbox/vhost_user/protocol.py) against the spec's wire layouts.

The expected bytes are written here by hand with struct, from the layouts in QEMU's
docs/interop/vhost-user.rst ("Message Specification"), not from the codec's own tables.
"""

import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from voidbox.vhost_user import protocol as p
from voidbox.vhost_user.protocol import (
    Decoder,
    GetConfig,
    GetFeatures,
    GetProtocolFeatures,
    GetQueueNum,
    GetVringBase,
    MemoryRegion,
    ProtocolError,
    ResetOwner,
    SetConfig,
    SetFeatures,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringErr,
    SetVringKick,
    SetVringNum,
    Unsupported,
    encode_config_failure,
    encode_config_reply,
    encode_reply,
    encode_reply_ack,
    encode_request,
    encode_u64_reply,
    encode_vring_state_reply,
)

V1 = 0x1
REPLY = 0x4
NEED_REPLY = 0x8
QUEUES = 2


def hdr(request, flags, size):
    return struct.pack("<III", request, flags, size)


def msg(request, payload=b"", flags=V1):
    return hdr(request, flags, len(payload)) + payload


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def identity(fd):
    st_ = os.fstat(fd)
    return st_.st_dev, st_.st_ino


@pytest.fixture
def pipes():
    """Pipe read ends to pass as SCM_RIGHTS fds; those still open (and still ours) are closed after."""
    made = []

    def make(n):
        fds = []
        for _ in range(n):
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
            made.append((r, identity(r)))
        return fds

    yield make
    for fd, ident in made:
        if is_open(fd) and identity(fd) == ident:
            os.close(fd)


def decode_all(data, fds=(), max_queues=QUEUES):
    decoder = Decoder(max_queues=max_queues)
    decoder.feed(data, fds)
    return list(decoder.messages())


def region_bytes(gpa, size, uaddr, offset):
    return struct.pack("<QQQQ", gpa, size, uaddr, offset)


def mem_table(*regions):
    return struct.pack("<II", len(regions), 0) + b"".join(region_bytes(*r) for r in regions)


R0 = (0, 0x8000_0000, 0x7F00_0000_0000, 0)
R1 = (0x1_0000_0000, 0x4000_0000, 0x7F80_0000_0000, 0x8000_0000)

# (message, its bytes as the spec lays them out, fd count)
GOLDEN = [
    (GetFeatures(), hdr(1, V1, 0), 0),
    (SetFeatures(features=0x1_4000_0000), hdr(2, V1, 8) + struct.pack("<Q", 0x1_4000_0000), 0),
    (SetOwner(), hdr(3, V1, 0), 0),
    (ResetOwner(), hdr(4, V1, 0), 0),
    (SetMemTable(regions=(MemoryRegion(*R0), MemoryRegion(*R1))), hdr(5, V1, 8 + 64) + mem_table(R0, R1), 2),
    (Unsupported(request_id=6, payload=struct.pack("<QQ", 4096, 0)), hdr(6, V1, 16) + struct.pack("<QQ", 4096, 0), 0),
    (Unsupported(request_id=7, payload=b""), hdr(7, V1, 0), 0),
    (SetVringNum(index=1, num=256), hdr(8, V1, 8) + struct.pack("<II", 1, 256), 0),
    (
        SetVringAddr(index=1, flags=1, desc_user_addr=0x7F00_0000_1000, used_user_addr=0x7F00_0000_3000,
                     avail_user_addr=0x7F00_0000_2000, log_guest_addr=0x5000),
        hdr(9, V1, 40) + struct.pack("<IIQQQQ", 1, 1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x5000),
        0,
    ),
    (SetVringBase(index=0, num=7), hdr(10, V1, 8) + struct.pack("<II", 0, 7), 0),
    (GetVringBase(index=1, num=0), hdr(11, V1, 8) + struct.pack("<II", 1, 0), 0),
    (SetVringKick(index=1), hdr(12, V1, 8) + struct.pack("<Q", 1), 1),
    (SetVringCall(index=0), hdr(13, V1, 8) + struct.pack("<Q", 0x100), 0),
    (SetVringErr(index=1), hdr(14, V1, 8) + struct.pack("<Q", 1), 1),
    (GetProtocolFeatures(), hdr(15, V1, 0), 0),
    (SetProtocolFeatures(features=(1 << 0) | (1 << 3) | (1 << 9)), hdr(16, V1, 8) + struct.pack("<Q", 0x209), 0),
    (GetQueueNum(), hdr(17, V1, 0), 0),
    (SetVringEnable(index=1, enable=True), hdr(18, V1, 8) + struct.pack("<II", 1, 1), 0),
    (GetConfig(offset=0, flags=0, payload=bytes(6)), hdr(24, V1, 18) + struct.pack("<III", 0, 6, 0) + bytes(6), 0),
    (SetConfig(offset=4, flags=1, payload=b"\x01\x02"), hdr(25, V1, 14) + struct.pack("<III", 4, 2, 1) + b"\x01\x02", 0),
]
IDS = [type(m).__name__ + (f"-{m.request_id}" if isinstance(m, Unsupported) else "") for m, _, _ in GOLDEN]


def with_fds(message, fds):
    return type(message)(**{**message.__dict__, "fds": tuple(fds)})


def test_constants_match_the_spec():
    assert (p.VHOST_USER_PROTOCOL_F_MQ, p.VHOST_USER_PROTOCOL_F_REPLY_ACK, p.VHOST_USER_PROTOCOL_F_CONFIG) == (0, 3, 9)
    assert p.VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert (p.VHOST_USER_VERSION, p.VHOST_USER_REPLY_MASK, p.VHOST_USER_NEED_REPLY_MASK) == (1, 4, 8)
    assert p.VHOST_USER_VRING_NOFD_MASK == 0x100 and p.VHOST_MEMORY_BASELINE_NREGIONS == 8


@pytest.mark.parametrize(("message", "wire", "nfds"), GOLDEN, ids=IDS)
def test_golden_decode(message, wire, nfds, pipes):
    fds = pipes(nfds)
    (decoded,) = decode_all(wire, fds)
    assert decoded == with_fds(message, fds)
    assert decoded.request == message.request and decoded.name
    decoded.close()


@pytest.mark.parametrize(("message", "wire", "nfds"), GOLDEN, ids=IDS)
def test_golden_encode(message, wire, nfds, pipes):
    fds = pipes(nfds)
    data, sent = encode_request(with_fds(message, fds))
    assert data == wire and sent == fds


@pytest.mark.parametrize(("message", "wire", "nfds"), GOLDEN, ids=IDS)
def test_round_trip_with_need_reply(message, wire, nfds, pipes):
    fds = pipes(nfds)
    original = type(message)(**{**message.__dict__, "fds": tuple(fds), "need_reply": True})
    data, sent = encode_request(original)
    assert struct.unpack_from("<I", data, 4)[0] == V1 | NEED_REPLY
    (decoded,) = decode_all(data, sent)
    assert decoded == original and decoded.need_reply
    decoded.close()


def test_vring_fd_accessor(pipes):
    (fd,) = pipes(1)
    kick, call = decode_all(msg(12, struct.pack("<Q", 1)) + msg(13, struct.pack("<Q", 0x101)), [fd])
    assert kick.fd == fd and kick.index == 1
    assert call.fd is None and call.index == 1
    kick.close()
    assert not is_open(fd)


def test_config_size():
    (get,) = decode_all(msg(24, struct.pack("<III", 8, 4, 0) + bytes(4)))
    assert (get.offset, get.size, get.flags) == (8, 4, 0)


# Replies -------------------------------------------------------------------------------------

def test_reply_encoders():
    assert encode_u64_reply(1, 0x1_7000_0000) == hdr(1, V1 | REPLY, 8) + struct.pack("<Q", 0x1_7000_0000)
    assert encode_u64_reply(17, 2) == hdr(17, V1 | REPLY, 8) + struct.pack("<Q", 2)
    assert encode_vring_state_reply(1, 513) == hdr(11, V1 | REPLY, 8) + struct.pack("<II", 1, 513)
    assert encode_reply_ack(8) == hdr(8, V1 | REPLY, 8) + struct.pack("<Q", 0)
    assert encode_reply_ack(9, 1) == hdr(9, V1 | REPLY, 8) + struct.pack("<Q", 1)
    assert encode_config_reply(0, 0, b"\xaa" * 6) == hdr(24, V1 | REPLY, 18) + struct.pack("<III", 0, 6, 0) + b"\xaa" * 6
    assert encode_config_failure() == hdr(24, V1 | REPLY, 0)
    assert encode_reply(15, struct.pack("<Q", 0x209)) == hdr(15, V1 | REPLY, 8) + struct.pack("<Q", 0x209)


def test_a_reply_is_not_a_request():
    with pytest.raises(ProtocolError, match="reply flag"):
        decode_all(encode_u64_reply(1, 0))


# Partial feeds -------------------------------------------------------------------------------

def stream(pipes):
    """Every golden message back to back, with their fds, as (wire chunks, fds per chunk)."""
    chunks = []
    for message, _, nfds in GOLDEN:
        chunks.append(encode_request(with_fds(message, pipes(nfds))))
    return chunks


def expected(chunks):
    out = []
    for (message, _, _), (_, fds) in zip(GOLDEN, chunks, strict=True):
        out.append(with_fds(message, fds))
    return out


def test_byte_at_a_time(pipes):
    chunks = stream(pipes)
    decoder = Decoder(max_queues=QUEUES)
    got = []
    for data, fds in chunks:
        for i in range(len(data)):
            decoder.feed(data[i:i + 1], fds if i == 0 else [])
            got += decoder.messages()
    assert got == expected(chunks)


def test_fds_arriving_after_the_first_byte_belong_to_the_same_message(pipes):
    fds = pipes(2)
    data = msg(5, mem_table(R0, R1))
    decoder = Decoder(max_queues=QUEUES)
    decoder.feed(data[:5])
    assert list(decoder.messages()) == []
    decoder.feed(data[5:40], fds)
    assert list(decoder.messages()) == []
    decoder.feed(data[40:])
    (table,) = decoder.messages()
    assert table.fds == tuple(fds)
    table.close()


def test_all_in_one_feed_and_split_across_feeds(pipes):
    # One feed for everything without fds; messages split at arbitrary points.
    plain = [(m, w) for m, w, n in GOLDEN if n == 0]
    data = b"".join(w for _, w in plain)
    assert decode_all(data) == [m for m, _ in plain]
    decoder = Decoder(max_queues=QUEUES)
    got = []
    for start in range(0, len(data), 7):
        decoder.feed(data[start:start + 7])
        got += decoder.messages()
    assert got == [m for m, _ in plain]


def test_messages_can_stop_and_resume():
    decoder = Decoder(max_queues=QUEUES)
    decoder.feed(msg(1) + msg(15) + msg(17))
    it = decoder.messages()
    assert next(it) == GetFeatures()
    assert list(decoder.messages()) == [GetProtocolFeatures(), GetQueueNum()]


# Validation ----------------------------------------------------------------------------------

BAD = [
    ("unknown request", msg(99), 0),
    ("unknown request", msg(0), 0),
    ("version 2", msg(1, flags=2), 0),
    ("version 0", msg(1, flags=0), 0),
    ("unknown flags", msg(1, flags=V1 | 0x10), 0),
    ("over the", hdr(25, V1, 0x10000), 0),
    ("expected 0", msg(1, b"\0" * 8), 0),
    ("expected 8", msg(2, b"\0" * 4), 0),
    ("expected 8", msg(8, b"\0" * 12), 0),
    ("expected 40", msg(9, b"\0" * 32), 0),
    ("expected 8", msg(12, b""), 0),
    ("expected 12", msg(24, b"\0" * 4), 0),
    ("more than 8", msg(5, struct.pack("<II", 9, 0) + region_bytes(*R0) * 8), 0),
    ("not 72", msg(5, mem_table(R0, R1)[:-8]), 2),
    ("size 0", msg(5, mem_table((0, 0, 0x1000, 0))), 1),
    ("guest_phys_addr \\+ size overflows", msg(5, mem_table((2**64 - 4096, 8192, 0, 0))), 1),
    ("userspace_addr \\+ size overflows", msg(5, mem_table((0, 8192, 2**64 - 4096, 0))), 1),
    ("mmap_offset \\+ size overflows", msg(5, mem_table((0, 8192, 0, 2**64 - 4096))), 1),
    ("overlap in guest_phys_addr", msg(5, mem_table((0, 0x2000, 0, 0), (0x1000, 0x2000, 0x10000, 0))), 2),
    ("overlap in userspace_addr", msg(5, mem_table((0, 0x2000, 0x10000, 0), (0x10000, 0x2000, 0x11000, 0))), 2),
    ("2 memory regions but 1 fds", msg(5, mem_table(R0, R1)), 1),
    ("1 memory regions but 2 fds", msg(5, mem_table(R0)), 2),
    ("vring index 2 beyond", msg(8, struct.pack("<II", 2, 256)), 0),
    ("vring index 5 beyond", msg(9, struct.pack("<IIQQQQ", 5, 0, 0, 0, 0, 0)), 0),
    ("vring index 2 beyond", msg(10, struct.pack("<II", 2, 0)), 0),
    ("vring index 255 beyond", msg(11, struct.pack("<II", 255, 0)), 0),
    ("vring index 2 beyond", msg(12, struct.pack("<Q", 2)), 1),
    ("vring index 3 beyond", msg(13, struct.pack("<Q", 0x103)), 0),
    ("vring index 2 beyond", msg(18, struct.pack("<II", 2, 1)), 0),
    ("enable must be 0 or 1", msg(18, struct.pack("<II", 0, 2)), 0),
    ("needs exactly one fd, got 0", msg(12, struct.pack("<Q", 0)), 0),
    ("needs exactly one fd, got 2", msg(13, struct.pack("<Q", 0)), 2),
    ("no-fd bit is set but 1 fds", msg(14, struct.pack("<Q", 0x100)), 1),
    ("reserved bits", msg(12, struct.pack("<Q", 0x200)), 1),
    ("takes none", msg(1), 1),
    ("takes none", msg(3), 1),
    ("takes none", msg(2, struct.pack("<Q", 0)), 1),
    ("takes none", msg(9, bytes(40)), 1),
    ("takes none", msg(24, struct.pack("<III", 0, 0, 0)), 1),
    ("config size 300 over", msg(25, struct.pack("<III", 0, 300, 0)), 0),
    ("for a config access of 4", msg(25, struct.pack("<III", 0, 4, 0) + bytes(2)), 0),
    ("beyond 256", msg(24, struct.pack("<III", 250, 8, 0) + bytes(8)), 0),
    ("unknown config flags", msg(25, struct.pack("<III", 0, 1, 2) + b"\0"), 0),
    ("expected 0..16", msg(6, bytes(24)), 0),
]


@pytest.mark.parametrize(("match", "wire", "nfds"), BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_protocol_errors_close_every_fd_and_stick(match, wire, nfds, pipes):
    fds = pipes(nfds)
    held = pipes(1)  # fds of a later message the decoder holds too
    decoder = Decoder(max_queues=QUEUES)
    with pytest.raises(ProtocolError, match=match):
        decoder.feed(wire, fds)
        decoder.feed(msg(12, struct.pack("<Q", 0)), held)
        list(decoder.messages())
    assert decoder.failed
    assert not any(is_open(fd) for fd in fds + held)
    late = pipes(1)
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(msg(1), late)
    assert not is_open(late[0])
    with pytest.raises(ProtocolError, match="already failed"):
        list(decoder.messages())


def test_too_many_fds_in_one_read(pipes):
    fds = pipes(9)
    decoder = Decoder(max_queues=QUEUES)
    with pytest.raises(ProtocolError, match="9 fds in one read, more than 8"):
        decoder.feed(msg(5, mem_table(R0)), fds)
    assert decoder.failed and not any(is_open(fd) for fd in fds)


def test_too_many_fds_over_several_reads(pipes):
    fds = pipes(9)
    data = msg(5, mem_table(R0))
    decoder = Decoder(max_queues=QUEUES)
    decoder.feed(data[:4], fds[:8])
    decoder.feed(data[4:12], fds[8:])  # the header is complete: refused before the payload
    with pytest.raises(ProtocolError, match="9 fds attached, more than 8"):
        list(decoder.messages())
    assert not any(is_open(fd) for fd in fds)


def test_header_errors_come_before_the_payload():
    decoder = Decoder(max_queues=QUEUES)
    decoder.feed(hdr(5, V1, 10_000))
    with pytest.raises(ProtocolError, match="cap"):
        list(decoder.messages())
    decoder = Decoder(max_queues=QUEUES)
    decoder.feed(hdr(8, V1, 9))
    with pytest.raises(ProtocolError, match="expected 8"):
        list(decoder.messages())


def test_fds_without_bytes(pipes):
    fds = pipes(1)
    with pytest.raises(ProtocolError, match="without any bytes"):
        Decoder(max_queues=QUEUES).feed(b"", fds)
    assert not is_open(fds[0])


def test_max_queues_bounds():
    assert decode_all(msg(8, struct.pack("<II", 255, 1)), max_queues=256) == [SetVringNum(index=255, num=1)]
    for bad in (0, 257):
        with pytest.raises(ValueError):
            Decoder(max_queues=bad)


def test_unsupported_messages_close_their_fds(pipes):
    fds = pipes(1)
    (log,) = decode_all(msg(7), fds)
    assert isinstance(log, Unsupported) and log.name == "SET_LOG_FD" and log.fds == ()
    assert not is_open(fds[0])


def test_memory_table_edges(pipes):
    fds = pipes(8)
    regions = [(i << 32, 1 << 32, (i + 8) << 32, 0) for i in range(8)]
    (table,) = decode_all(msg(5, mem_table(*regions)), fds)
    assert len(table.regions) == 8 and table.fds == tuple(fds)
    table.close()
    top = (2**64 - 4096, 4096, 2**64 - 4096, 2**64 - 4096)  # ends exactly at 2^64
    fds = pipes(1)
    (table,) = decode_all(msg(5, mem_table(top)), fds)
    assert table.regions == (MemoryRegion(*top),)
    table.close()
    assert decode_all(msg(5, mem_table())) == [SetMemTable(regions=())]


# fd ownership --------------------------------------------------------------------------------

def test_close_releases_buffered_fds(pipes):
    before = open_fds()
    fds = pipes(3)
    decoder = Decoder(max_queues=QUEUES)
    data = msg(5, mem_table(R0, R1))
    decoder.feed(data[:20], fds[:2])  # an incomplete table
    assert list(decoder.messages()) == []
    decoder.close()
    assert open_fds() == before + 1
    with pytest.raises(ProtocolError):
        decoder.feed(data[20:], fds[2:])
    assert open_fds() == before


def test_no_leak_across_a_session(pipes):
    before = open_fds()
    chunks = stream(pipes)
    decoder = Decoder(max_queues=QUEUES)
    for data, fds in chunks:
        decoder.feed(data, fds)
    for message in decoder.messages():
        message.close()
    decoder.close()
    assert open_fds() == before


# Fuzz ----------------------------------------------------------------------------------------

VALID = [wire for _, wire, _ in GOLDEN]
pieces = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(VALID),
    st.builds(lambda w, i, b: w[:i] + bytes([b]) + w[i + 1:], st.sampled_from(VALID), st.integers(0, 80), st.integers(0, 255)),
)


@pytest.mark.timeout(60)  # never hangs
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(pieces, max_size=12).map(b"".join),
    cuts=st.lists(st.integers(0, 1000), max_size=12),
    fd_counts=st.lists(st.integers(0, 10), max_size=12),
)
def test_fuzz_only_protocol_errors_and_no_fd_leak(data, cuts, fd_counts):
    before = open_fds()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    decoder = Decoder(max_queues=QUEUES)
    handed_out = []
    try:
        for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
            fds = []
            for _ in range(fd_counts[i] if i < len(fd_counts) else 0):
                r, w = os.pipe()
                os.close(w)
                fds.append(r)
            decoder.feed(data[start:end], fds)
            for message in decoder.messages():
                assert isinstance(message, p.Message)
                handed_out.append(message)
        event("no error")
    except ProtocolError:
        assert decoder.failed
        event("ProtocolError")
    finally:
        event(f"messages decoded: {min(len(handed_out), 3)}{'+' if len(handed_out) >= 3 else ''}")
        for message in handed_out:
            message.close()
        decoder.close()
    assert open_fds() == before


@pytest.mark.timeout(60)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.integers(0, len(GOLDEN) - 1), min_size=1, max_size=10),
    cuts=st.lists(st.integers(0, 2000), max_size=20),
    flip=st.none() | st.tuples(st.integers(0, 2000), st.integers(1, 255)),
)
def test_fuzz_valid_streams_in_random_chunks(picks, cuts, flip):
    """Valid messages with their fds, cut anywhere: all decoded as sent. One flipped byte:
    decoded or ProtocolError, and no fd leaks either way."""
    before = open_fds()
    data, starts, expect = b"", {}, []
    for k in picks:
        message, wire, nfds = GOLDEN[k]
        fds = []
        for _ in range(nfds):
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        if fds:
            starts[len(data)] = fds
        expect.append(with_fds(message, fds))
        data += wire
    if flip is not None:
        at = flip[0] % len(data)
        data = data[:at] + bytes([data[at] ^ flip[1]]) + data[at + 1:]
    bounds = sorted({0, len(data), *starts, *(c % (len(data) + 1) for c in cuts)})
    decoder = Decoder(max_queues=QUEUES)
    got, fed = [], set()
    try:
        for start, end in zip(bounds, bounds[1:], strict=False):
            fed.add(start)
            decoder.feed(data[start:end], starts.get(start, []))
            got += decoder.messages()
        if flip is None:
            assert got == expect
            assert not decoder.failed
        event("decoded")
    except ProtocolError:
        assert flip is not None
        event("ProtocolError")
    finally:
        for message in got:
            message.close()
        decoder.close()
        for start, fds in starts.items():  # fds never fed (after a failure) are still ours
            if start not in fed:
                for fd in fds:
                    os.close(fd)
    assert open_fds() == before


def test_fds_belong_to_the_message_holding_the_reads_first_byte(pipes):
    """A read that brings fds starts with the message they were sent with; two fd-carrying
    messages in one read would mean a frontend (or a kernel) broke that rule."""
    fds = pipes(2)
    decoder = Decoder(max_queues=QUEUES)
    decoder.feed(msg(12, struct.pack("<Q", 0)) + msg(13, struct.pack("<Q", 0)), fds)
    with pytest.raises(ProtocolError, match="SET_VRING_KICK: needs exactly one fd, got 2"):
        list(decoder.messages())
    assert not any(is_open(fd) for fd in fds)
