"""The vhost-user message codec, sans-I/O: bytes and fds in, typed messages out.

The wire format is QEMU's docs/interop/vhost-user.rst:
- "Message Specification" (Header, Payload): a 12-byte header (request u32, flags u32,
  size u32) then `size` payload bytes. The spec says "machine native byte order"; voidbox
  runs on x86-64 only, so this codec is little-endian throughout.
- "Payload": the u64, vring state, vring address, memory regions and virtio device config
  space layouts decoded here.
- "Front-end message types": the request ids and which payload each one carries.
- "Communication": which requests carry file descriptors (SCM_RIGHTS ancillary data).
- "Protocol features" and "VHOST_USER_PROTOCOL_F_REPLY_ACK": the feature bits and the
  need_reply flag.

`Decoder.feed(data, fds)` takes what one recvmsg returned and gives its fds to the message
that contains the first byte of `data`. That is only right when each read holds at most
one message: a Linux unix stream socket may return a message without fds together with
the next one and hand over that next message's fds. So a reader takes one message per
recvmsg (the server reads the header, then exactly the payload it announces). Each message
a `Decoder.messages()` yields owns its fds (`Message.close()` closes them). Anything
malformed raises ProtocolError, closes every fd the decoder still holds, and leaves the
decoder unusable: the server closes that connection.

The encoders build the backend's replies and, for tests and a frontend, the requests.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Iterable, Iterator

from voidbox._records import dataclass
from voidbox.errors import VoidboxError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at start-up
if TYPE_CHECKING:
    from typing import ClassVar, NoReturn

# Header ("Message Specification"): request, flags, size.
HEADER = struct.Struct("<III")
VHOST_USER_HDR_SIZE = HEADER.size
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3
_KNOWN_FLAGS = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK

# Front-end message types.
VHOST_USER_GET_FEATURES = 1
VHOST_USER_SET_FEATURES = 2
VHOST_USER_SET_OWNER = 3
VHOST_USER_RESET_OWNER = 4
VHOST_USER_SET_MEM_TABLE = 5
VHOST_USER_SET_LOG_BASE = 6
VHOST_USER_SET_LOG_FD = 7
VHOST_USER_SET_VRING_NUM = 8
VHOST_USER_SET_VRING_ADDR = 9
VHOST_USER_SET_VRING_BASE = 10
VHOST_USER_GET_VRING_BASE = 11
VHOST_USER_SET_VRING_KICK = 12
VHOST_USER_SET_VRING_CALL = 13
VHOST_USER_SET_VRING_ERR = 14
VHOST_USER_GET_PROTOCOL_FEATURES = 15
VHOST_USER_SET_PROTOCOL_FEATURES = 16
VHOST_USER_GET_QUEUE_NUM = 17
VHOST_USER_SET_VRING_ENABLE = 18
VHOST_USER_GET_CONFIG = 24
VHOST_USER_SET_CONFIG = 25

REQUEST_NAMES = {
    VHOST_USER_GET_FEATURES: "GET_FEATURES",
    VHOST_USER_SET_FEATURES: "SET_FEATURES",
    VHOST_USER_SET_OWNER: "SET_OWNER",
    VHOST_USER_RESET_OWNER: "RESET_OWNER",
    VHOST_USER_SET_MEM_TABLE: "SET_MEM_TABLE",
    VHOST_USER_SET_LOG_BASE: "SET_LOG_BASE",
    VHOST_USER_SET_LOG_FD: "SET_LOG_FD",
    VHOST_USER_SET_VRING_NUM: "SET_VRING_NUM",
    VHOST_USER_SET_VRING_ADDR: "SET_VRING_ADDR",
    VHOST_USER_SET_VRING_BASE: "SET_VRING_BASE",
    VHOST_USER_GET_VRING_BASE: "GET_VRING_BASE",
    VHOST_USER_SET_VRING_KICK: "SET_VRING_KICK",
    VHOST_USER_SET_VRING_CALL: "SET_VRING_CALL",
    VHOST_USER_SET_VRING_ERR: "SET_VRING_ERR",
    VHOST_USER_GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES",
    VHOST_USER_SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES",
    VHOST_USER_GET_QUEUE_NUM: "GET_QUEUE_NUM",
    VHOST_USER_SET_VRING_ENABLE: "SET_VRING_ENABLE",
    VHOST_USER_GET_CONFIG: "GET_CONFIG",
    VHOST_USER_SET_CONFIG: "SET_CONFIG",
}

# The feature bit that says the backend speaks GET/SET_PROTOCOL_FEATURES ("Communication").
VHOST_USER_F_PROTOCOL_FEATURES = 30

# Protocol features: the ones voidbox's backend offers.
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_CONFIG = 9

# Vring fd payload (SET_VRING_KICK, CALL, ERR): bits 0-7 the index, bit 8 "no fd".
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8

# The memory regions description holds at most this many regions, one fd each.
VHOST_MEMORY_BASELINE_NREGIONS = 8
# The most fds a frontend sends with one message (QEMU's VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS_PER_MESSAGE = VHOST_MEMORY_BASELINE_NREGIONS
# Config space accesses are at most this long (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
VHOST_USER_MAX_CONFIG_SIZE = 256
# SET_CONFIG flags ("Virtio device config space").
VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1
# No request's payload is longer than this; a header that says more is refused at once.
MAX_PAYLOAD = 4096 + VHOST_USER_MAX_CONFIG_SIZE

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail user addrs, log guest addr
MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags

U64_LIMIT = 1 << 64


class ProtocolError(VoidboxError):
    """A message that breaks the vhost-user protocol: the connection is closed."""


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# Messages --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Message:
    """A request from the frontend. It owns `fds` until close() or the server takes them."""

    request: ClassVar[int]
    need_reply: bool = False
    fds: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return REQUEST_NAMES[self.request]

    def close(self) -> None:
        """Close the fds this message carries (call it unless they were handed on)."""
        _close_all(self.fds)


@dataclass(frozen=True, kw_only=True)
class GetFeatures(Message):
    request: ClassVar[int] = VHOST_USER_GET_FEATURES


@dataclass(frozen=True, kw_only=True)
class SetFeatures(Message):
    request: ClassVar[int] = VHOST_USER_SET_FEATURES
    features: int


@dataclass(frozen=True, kw_only=True)
class SetOwner(Message):
    request: ClassVar[int] = VHOST_USER_SET_OWNER


@dataclass(frozen=True, kw_only=True)
class ResetOwner(Message):
    request: ClassVar[int] = VHOST_USER_RESET_OWNER


@dataclass(frozen=True)
class MemoryRegion:
    """One region of the memory regions description; its fd is SetMemTable.fds[i]."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, kw_only=True)
class SetMemTable(Message):
    """The guest's memory: regions[i] is mapped from fds[i]."""

    request: ClassVar[int] = VHOST_USER_SET_MEM_TABLE
    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True, kw_only=True)
class Unsupported(Message):
    """A request voidbox knows but does not implement (SET_LOG_BASE, SET_LOG_FD).

    The decoder closes any fds it came with, so `fds` is always empty.
    """

    request: ClassVar[int] = 0
    request_id: int
    payload: bytes

    @property
    def name(self) -> str:
        return REQUEST_NAMES[self.request_id]


@dataclass(frozen=True, kw_only=True)
class _VringState(Message):
    index: int
    num: int


@dataclass(frozen=True, kw_only=True)
class SetVringNum(_VringState):
    request: ClassVar[int] = VHOST_USER_SET_VRING_NUM


@dataclass(frozen=True, kw_only=True)
class SetVringBase(_VringState):
    request: ClassVar[int] = VHOST_USER_SET_VRING_BASE


@dataclass(frozen=True, kw_only=True)
class GetVringBase(_VringState):
    request: ClassVar[int] = VHOST_USER_GET_VRING_BASE


@dataclass(frozen=True, kw_only=True)
class SetVringEnable(Message):
    request: ClassVar[int] = VHOST_USER_SET_VRING_ENABLE
    index: int
    enable: bool


@dataclass(frozen=True, kw_only=True)
class SetVringAddr(Message):
    request: ClassVar[int] = VHOST_USER_SET_VRING_ADDR
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True, kw_only=True)
class _VringFd(Message):
    """SET_VRING_KICK, CALL or ERR: `fd` is None when the frontend asks for polling."""

    index: int

    @property
    def fd(self) -> int | None:
        return self.fds[0] if self.fds else None


@dataclass(frozen=True, kw_only=True)
class SetVringKick(_VringFd):
    request: ClassVar[int] = VHOST_USER_SET_VRING_KICK


@dataclass(frozen=True, kw_only=True)
class SetVringCall(_VringFd):
    request: ClassVar[int] = VHOST_USER_SET_VRING_CALL


@dataclass(frozen=True, kw_only=True)
class SetVringErr(_VringFd):
    request: ClassVar[int] = VHOST_USER_SET_VRING_ERR


@dataclass(frozen=True, kw_only=True)
class GetProtocolFeatures(Message):
    request: ClassVar[int] = VHOST_USER_GET_PROTOCOL_FEATURES


@dataclass(frozen=True, kw_only=True)
class SetProtocolFeatures(Message):
    request: ClassVar[int] = VHOST_USER_SET_PROTOCOL_FEATURES
    features: int


@dataclass(frozen=True, kw_only=True)
class GetQueueNum(Message):
    request: ClassVar[int] = VHOST_USER_GET_QUEUE_NUM


@dataclass(frozen=True, kw_only=True)
class _Config(Message):
    """A virtio device config space access: `size` bytes at `offset`."""

    offset: int
    flags: int
    payload: bytes

    @property
    def size(self) -> int:
        return len(self.payload)


@dataclass(frozen=True, kw_only=True)
class GetConfig(_Config):
    request: ClassVar[int] = VHOST_USER_GET_CONFIG


@dataclass(frozen=True, kw_only=True)
class SetConfig(_Config):
    request: ClassVar[int] = VHOST_USER_SET_CONFIG


# Decoding ---------------------------------------------------------------------------------

def _no_fds(name: str, fds: tuple[int, ...]) -> None:
    if fds:
        raise ProtocolError(f"{name}: {len(fds)} fds attached to a message that takes none")


def _check_index(name: str, index: int, max_queues: int) -> None:
    if index >= max_queues:
        raise ProtocolError(f"{name}: vring index {index} beyond the {max_queues} queues")


def _overlaps(ranges: list[tuple[int, int]]) -> bool:
    ranges = sorted(ranges)
    return any(start < prev_end for (_, prev_end), (start, _) in zip(ranges, ranges[1:], strict=False))


def _decode_mem_table(name: str, payload: bytes, fds: tuple[int, ...]) -> tuple[MemoryRegion, ...]:
    if len(payload) < MEMORY_HEADER.size:
        raise ProtocolError(f"{name}: payload of {len(payload)} bytes, shorter than its header")
    nregions, _padding = MEMORY_HEADER.unpack_from(payload)
    if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
        raise ProtocolError(f"{name}: {nregions} memory regions, more than {VHOST_MEMORY_BASELINE_NREGIONS}")
    expected = MEMORY_HEADER.size + nregions * MEMORY_REGION.size
    if len(payload) != expected:
        raise ProtocolError(f"{name}: payload of {len(payload)} bytes for {nregions} regions, not {expected}")
    if len(fds) != nregions:
        raise ProtocolError(f"{name}: {nregions} memory regions but {len(fds)} fds")
    regions = tuple(
        MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * MEMORY_REGION.size))
        for i in range(nregions)
    )
    for i, region in enumerate(regions):
        if region.memory_size == 0:
            raise ProtocolError(f"{name}: memory region {i} has size 0")
        for field in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            if getattr(region, field) + region.memory_size > U64_LIMIT:
                raise ProtocolError(f"{name}: memory region {i}: {field} + size overflows 2^64")
    for field in ("guest_phys_addr", "userspace_addr"):
        spans = [(getattr(r, field), getattr(r, field) + r.memory_size) for r in regions]
        if _overlaps(spans):
            raise ProtocolError(f"{name}: memory regions overlap in {field}")
    return regions


def _decode(request: int, flags: int, payload: bytes, fds: tuple[int, ...], max_queues: int) -> Message:
    """One complete message, its size already checked against the request's layout."""
    name = REQUEST_NAMES[request]
    common = {"need_reply": bool(flags & VHOST_USER_NEED_REPLY_MASK)}
    if request == VHOST_USER_SET_MEM_TABLE:
        regions = _decode_mem_table(name, payload, fds)
        return SetMemTable(regions=regions, fds=fds, **common)
    if request in (VHOST_USER_SET_LOG_BASE, VHOST_USER_SET_LOG_FD):
        # Only the fds these may carry need handling: the decoder closes them.
        return Unsupported(request_id=request, payload=payload, **common)
    if request in _VRING_FD:
        (value,) = U64.unpack(payload)
        if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise ProtocolError(f"{name}: reserved bits set in {value:#x}")
        index = value & VHOST_USER_VRING_IDX_MASK
        _check_index(name, index, max_queues)
        nofd = bool(value & VHOST_USER_VRING_NOFD_MASK)
        if nofd and fds:
            raise ProtocolError(f"{name}: the no-fd bit is set but {len(fds)} fds are attached")
        if not nofd and len(fds) != 1:
            raise ProtocolError(f"{name}: needs exactly one fd, got {len(fds)}")
        return _VRING_FD[request](index=index, fds=fds, **common)
    _no_fds(name, fds)
    if request in (VHOST_USER_SET_FEATURES, VHOST_USER_SET_PROTOCOL_FEATURES):
        (features,) = U64.unpack(payload)
        cls = SetFeatures if request == VHOST_USER_SET_FEATURES else SetProtocolFeatures
        return cls(features=features, **common)
    if request in _VRING_STATE:
        index, num = VRING_STATE.unpack(payload)
        _check_index(name, index, max_queues)
        if request == VHOST_USER_SET_VRING_ENABLE:
            if num not in (0, 1):
                raise ProtocolError(f"{name}: enable must be 0 or 1, not {num}")
            return SetVringEnable(index=index, enable=bool(num), **common)
        return _VRING_STATE[request](index=index, num=num, **common)
    if request == VHOST_USER_SET_VRING_ADDR:
        index, vflags, desc, used, avail, log = VRING_ADDR.unpack(payload)
        _check_index(name, index, max_queues)
        return SetVringAddr(index=index, flags=vflags, desc_user_addr=desc, used_user_addr=used,
                            avail_user_addr=avail, log_guest_addr=log, **common)
    if request in (VHOST_USER_GET_CONFIG, VHOST_USER_SET_CONFIG):
        offset, size, cflags = CONFIG_HEADER.unpack_from(payload)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise ProtocolError(f"{name}: config size {size} over {VHOST_USER_MAX_CONFIG_SIZE}")
        if len(payload) != CONFIG_HEADER.size + size:
            raise ProtocolError(f"{name}: payload of {len(payload)} bytes for a config access of {size}")
        if offset + size > VHOST_USER_MAX_CONFIG_SIZE:
            raise ProtocolError(f"{name}: config access at {offset}+{size} beyond {VHOST_USER_MAX_CONFIG_SIZE}")
        if cflags not in (VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION):
            raise ProtocolError(f"{name}: unknown config flags {cflags:#x}")
        cls = GetConfig if request == VHOST_USER_GET_CONFIG else SetConfig
        return cls(offset=offset, flags=cflags, payload=payload[CONFIG_HEADER.size:], **common)
    return _NO_PAYLOAD[request](**common)


_VRING_FD = {
    VHOST_USER_SET_VRING_KICK: SetVringKick,
    VHOST_USER_SET_VRING_CALL: SetVringCall,
    VHOST_USER_SET_VRING_ERR: SetVringErr,
}
_VRING_STATE = {
    VHOST_USER_SET_VRING_NUM: SetVringNum,
    VHOST_USER_SET_VRING_BASE: SetVringBase,
    VHOST_USER_GET_VRING_BASE: GetVringBase,
    VHOST_USER_SET_VRING_ENABLE: SetVringEnable,
}
_NO_PAYLOAD = {
    VHOST_USER_GET_FEATURES: GetFeatures,
    VHOST_USER_SET_OWNER: SetOwner,
    VHOST_USER_RESET_OWNER: ResetOwner,
    VHOST_USER_GET_PROTOCOL_FEATURES: GetProtocolFeatures,
    VHOST_USER_GET_QUEUE_NUM: GetQueueNum,
}


def _payload_sizes(request: int) -> tuple[int, int]:
    """The least and most payload bytes `request` may carry."""
    if request in _NO_PAYLOAD:
        return 0, 0
    if request in _VRING_FD or request in (VHOST_USER_SET_FEATURES, VHOST_USER_SET_PROTOCOL_FEATURES):
        return U64.size, U64.size
    if request in _VRING_STATE:
        return VRING_STATE.size, VRING_STATE.size
    if request == VHOST_USER_SET_VRING_ADDR:
        return VRING_ADDR.size, VRING_ADDR.size
    if request == VHOST_USER_SET_MEM_TABLE:
        return MEMORY_HEADER.size, MEMORY_HEADER.size + VHOST_MEMORY_BASELINE_NREGIONS * MEMORY_REGION.size
    if request in (VHOST_USER_SET_LOG_BASE, VHOST_USER_SET_LOG_FD):
        return 0, 2 * U64.size  # the log description: size and offset
    # GET_CONFIG, SET_CONFIG
    return CONFIG_HEADER.size, CONFIG_HEADER.size + VHOST_USER_MAX_CONFIG_SIZE


class Decoder:
    """Frontend requests from a byte stream and its SCM_RIGHTS fds, with no I/O of its own.

    `max_queues` bounds every vring index. After a ProtocolError, or close(), every call
    raises ProtocolError and the fds fed in are closed.
    """

    def __init__(self, *, max_queues: int) -> None:
        if not 1 <= max_queues <= VHOST_USER_VRING_IDX_MASK + 1:
            raise ValueError(f"max_queues must be 1..{VHOST_USER_VRING_IDX_MASK + 1}")
        self.max_queues = max_queues
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._fd_groups: deque[tuple[int, list[int]]] = deque()  # (stream offset, fds)
        self._error: str | None = None

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Buffer what one recvmsg returned; the decoder owns `fds` from here on."""
        fds = list(fds)
        if self._error is not None:
            _close_all(fds)
            raise ProtocolError(f"connection already failed: {self._error}")
        if fds and not data:
            self._fail("fds received without any bytes", fds)
        if len(fds) > MAX_FDS_PER_MESSAGE:
            self._fail(f"{len(fds)} fds in one read, more than {MAX_FDS_PER_MESSAGE}", fds)
        if fds:
            self._fd_groups.append((self._base + len(self._buf), fds))
        self._buf += data

    def messages(self) -> Iterator[Message]:
        """Yield every complete message buffered so far; raise ProtocolError on the first bad one."""
        while True:
            if self._error is not None:
                raise ProtocolError(f"connection already failed: {self._error}")
            if len(self._buf) < VHOST_USER_HDR_SIZE:
                return
            request, flags, size = HEADER.unpack_from(self._buf)
            self._check_header(request, flags, size)
            end = self._base + VHOST_USER_HDR_SIZE + size
            attached = sum(len(group) for offset, group in self._fd_groups if offset < end)
            if attached > MAX_FDS_PER_MESSAGE:
                self._fail(f"{REQUEST_NAMES[request]}: {attached} fds attached, more than {MAX_FDS_PER_MESSAGE}")
            if len(self._buf) < VHOST_USER_HDR_SIZE + size:
                return
            payload = bytes(self._buf[VHOST_USER_HDR_SIZE:VHOST_USER_HDR_SIZE + size])
            del self._buf[:VHOST_USER_HDR_SIZE + size]
            self._base = end
            fds: list[int] = []
            while self._fd_groups and self._fd_groups[0][0] < end:
                fds += self._fd_groups.popleft()[1]
            try:
                message = _decode(request, flags, payload, tuple(fds), self.max_queues)
            except ProtocolError as e:
                self._fail(str(e), fds)
            if isinstance(message, Unsupported):
                _close_all(fds)
            yield message

    def close(self) -> None:
        """Close every fd not yet handed out in a message; the decoder is unusable after."""
        if self._error is None:
            self._error = "decoder closed"
        self._release()

    def _check_header(self, request: int, flags: int, size: int) -> None:
        if request not in REQUEST_NAMES:
            self._fail(f"unknown request {request}")
        name = REQUEST_NAMES[request]
        if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            self._fail(f"{name}: version {flags & VHOST_USER_VERSION_MASK}, not {VHOST_USER_VERSION}")
        if flags & VHOST_USER_REPLY_MASK:
            self._fail(f"{name}: the reply flag is set on a request")
        if flags & ~_KNOWN_FLAGS:
            self._fail(f"{name}: unknown flags {flags & ~_KNOWN_FLAGS:#x}")
        if size > MAX_PAYLOAD:
            self._fail(f"{name}: payload of {size} bytes, over the {MAX_PAYLOAD}-byte cap")
        least, most = _payload_sizes(request)
        if not least <= size <= most:
            expected = str(least) if least == most else f"{least}..{most}"
            self._fail(f"{name}: payload of {size} bytes, expected {expected}")

    def _fail(self, reason: str, fds: Iterable[int] = ()) -> NoReturn:
        """Mark the decoder failed, close `fds` and every fd it holds, raise ProtocolError."""
        _close_all(fds)
        self._error = reason
        self._release()
        raise ProtocolError(reason)

    def _release(self) -> None:
        while self._fd_groups:
            _close_all(self._fd_groups.popleft()[1])
        self._buf.clear()


# Encoding ---------------------------------------------------------------------------------

def _header(request: int, flags: int, payload: bytes) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    """A reply to `request` (version 1 and the REPLY flag) carrying `payload` as it is."""
    return _header(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload)


def encode_u64_reply(request: int, value: int) -> bytes:
    """GET_FEATURES, GET_PROTOCOL_FEATURES and GET_QUEUE_NUM replies."""
    return encode_reply(request, U64.pack(value))


def encode_vring_state_reply(index: int, num: int) -> bytes:
    """The GET_VRING_BASE reply: the ring's index and its next available index."""
    return encode_reply(VHOST_USER_GET_VRING_BASE, VRING_STATE.pack(index, num))


def encode_reply_ack(request: int, status: int = 0) -> bytes:
    """A REPLY_ACK for a need_reply request: 0 on success, anything else on failure."""
    return encode_u64_reply(request, status)


def encode_config_reply(offset: int, flags: int, data: bytes) -> bytes:
    """A GET_CONFIG reply with the config bytes read; an empty payload means failure."""
    return encode_reply(VHOST_USER_GET_CONFIG, CONFIG_HEADER.pack(offset, len(data), flags) + data)


def encode_config_failure() -> bytes:
    """A GET_CONFIG reply that says the read failed (a payload of zero bytes)."""
    return encode_reply(VHOST_USER_GET_CONFIG)


def encode_request(msg: Message) -> tuple[bytes, list[int]]:
    """The bytes and fds a frontend sends for `msg` (fds still owned by the caller)."""
    flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if msg.need_reply else 0)
    fds = list(msg.fds)
    if isinstance(msg, Unsupported):
        return _header(msg.request_id, flags, msg.payload), fds
    if isinstance(msg, SetFeatures | SetProtocolFeatures):
        payload = U64.pack(msg.features)
    elif isinstance(msg, SetMemTable):
        payload = MEMORY_HEADER.pack(len(msg.regions), 0) + b"".join(
            MEMORY_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in msg.regions
        )
    elif isinstance(msg, _VringFd):
        payload = U64.pack(msg.index | (0 if fds else VHOST_USER_VRING_NOFD_MASK))
    elif isinstance(msg, _VringState):
        payload = VRING_STATE.pack(msg.index, msg.num)
    elif isinstance(msg, SetVringEnable):
        payload = VRING_STATE.pack(msg.index, int(msg.enable))
    elif isinstance(msg, SetVringAddr):
        payload = VRING_ADDR.pack(msg.index, msg.flags, msg.desc_user_addr, msg.used_user_addr,
                                  msg.avail_user_addr, msg.log_guest_addr)
    elif isinstance(msg, _Config):
        payload = CONFIG_HEADER.pack(msg.offset, len(msg.payload), msg.flags) + msg.payload
    else:
        payload = b""
    return _header(msg.request, flags, payload), fds
