"""The vhost-user backend server against a fake frontend on its real unix socket.

The frontend plays QEMU's part: guest memory is a memfd it maps and passes by SCM_RIGHTS,
the driver mock (tests/virtio_driver.py) writes the rings into it, kicks and calls are
eventfds. The server and the NAT run on one EventLoop, pumped by the test.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import select
import socket
import stat
import struct
import threading
import time

import pytest

from tests.requires import requires
from tests.virtio_driver import Driver
from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop
from voidbox.net.backend import SlirpBackend
from voidbox.net.config import NatConfig
from voidbox.net.packets import (
    ARPOP_REPLY,
    ARPOP_REQUEST,
    ETH_P_ARP,
    build_arp,
    build_ethernet,
    ip_to_bytes,
    parse_arp,
)
from voidbox.net.policy import Policy
from voidbox.ring import VIRTQ_AVAIL_F_NO_INTERRUPT
from voidbox.vhost_user import protocol as p
from voidbox.vhost_user.backend import OFFERED_PROTOCOL_FEATURES, VhostUserServer
from voidbox.virtio.device import VIRTIO_F_VERSION_1
from voidbox.virtio.net import VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_LEN, VirtioNet

MEM_SIZE = 32 << 20
UADDR = 0x7F00_0000_0000  # where the "frontend" says it mapped guest memory
QSIZE = 64
MAC = bytes.fromhex("525400123456")
GUEST_IP = ip_to_bytes("10.0.2.15")
GATEWAY_IP = ip_to_bytes("10.0.2.2")
TX_RINGS = {"desc_addr": 0x50_0000, "avail_addr": 0x60_0000, "used_addr": 0x70_0000}


class MemfdMemory:
    """Guest memory as the frontend holds it: one memfd, mapped shared, at gpa 0."""

    def __init__(self, size: int = MEM_SIZE):
        self.fd = os.memfd_create("vhost-user-test", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.size = size
        self.area = mmap.mmap(self.fd, size, mmap.MAP_SHARED)

    def read(self, gpa: int, length: int) -> bytes:
        return self.area[gpa:gpa + length]

    def write(self, gpa: int, data) -> None:
        self.area[gpa:gpa + len(data)] = bytes(data)

    def close(self) -> None:
        self.area.close()
        os.close(self.fd)


class Rig:
    """A VirtioNet on a SlirpBackend served by a VhostUserServer on `path`."""

    def __init__(self, path, ring_factory):
        self.loop = EventLoop(debug=False)
        self.backend = SlirpBackend(self.loop, NatConfig(), Policy(host_loopback=True))
        self.device = VirtioNet(self.backend, MAC, schedule=self.loop.call_soon)
        self.backend.attach(self.device.receive, self.device.rx_room, self.device.stream_port())
        self.server = VhostUserServer(self.device, str(path), self.loop, ring_factory=ring_factory)
        self.server.start()

    def pump(self, until=lambda: False, rounds: int = 50) -> None:
        for _ in range(rounds):
            self.loop.run_once(0.01)
            if until():
                return

    def close(self) -> None:
        self.server.close()
        self.device.close()
        self.loop.close()


class Frontend:
    """The frontend's side: requests over the socket, the rings through the driver mock."""

    def __init__(self, rig: Rig, path):
        self.rig = rig
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(0)
        rig.pump(lambda: rig.server.session is not None, rounds=5)
        self.memory = MemfdMemory()
        self.rx = Driver(self.memory, size=QSIZE)
        self.tx = Driver(self.memory, size=QSIZE, **TX_RINGS)
        self.tx._data_next += 8 << 20
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]

    def send_raw(self, data: bytes, fds=()) -> None:
        socket.send_fds(self.sock, [data], list(fds))

    def send(self, msg: p.Message) -> None:
        data, fds = p.encode_request(msg)
        self.send_raw(data, fds)

    def reply(self) -> tuple[int, int, bytes]:
        """Pump the server until a reply arrives: (request, flags, payload)."""
        buf = b""
        for _ in range(100):
            self.rig.loop.run_once(0.01)
            try:
                chunk = self.sock.recv(4096)
            except BlockingIOError:
                continue
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
            if len(buf) >= p.VHOST_USER_HDR_SIZE:
                request, flags, size = p.HEADER.unpack_from(buf)
                if len(buf) >= p.VHOST_USER_HDR_SIZE + size:
                    return request, flags, buf[p.VHOST_USER_HDR_SIZE:]
        raise TimeoutError("no reply")

    def call(self, msg: p.Message) -> bytes:
        self.send(msg)
        request, flags, payload = self.reply()
        assert request == msg.request and flags & p.VHOST_USER_REPLY_MASK
        return payload

    def closed_by_server(self) -> bool:
        self.rig.pump(rounds=3)
        try:
            return self.sock.recv(4096) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    def user(self, gpa: int) -> int:
        return UADDR + gpa

    def negotiate(self) -> int:
        (features,) = struct.unpack("<Q", self.call(p.GetFeatures()))
        assert features & (1 << p.VHOST_USER_F_PROTOCOL_FEATURES)
        (proto,) = struct.unpack("<Q", self.call(p.GetProtocolFeatures()))
        assert proto & (1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK)
        self.send(p.SetProtocolFeatures(features=proto & OFFERED_PROTOCOL_FEATURES))
        self.send(p.SetOwner())
        acked = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF) \
            | (1 << p.VHOST_USER_F_PROTOCOL_FEATURES)
        assert features & acked == acked
        # need_reply: REPLY_ACK says the server took it.
        self.send(p.SetFeatures(features=acked, need_reply=True))
        request, _flags, payload = self.reply()
        assert request == p.VHOST_USER_SET_FEATURES and payload == struct.pack("<Q", 0)
        return acked

    def mem_table(self, **overrides) -> p.SetMemTable:
        region = {"guest_phys_addr": 0, "memory_size": self.memory.size, "userspace_addr": UADDR,
                  "mmap_offset": 0, **overrides}
        return p.SetMemTable(regions=(p.MemoryRegion(**region),), fds=(self.memory.fd,))

    def setup_ring(self, index: int, driver: Driver, base: int = 0, **addr_overrides) -> None:
        self.send(p.SetVringNum(index=index, num=driver.size))
        addrs = {"desc_user_addr": self.user(driver.desc_addr),
                 "avail_user_addr": self.user(driver.avail_addr),
                 "used_user_addr": self.user(driver.used_addr), **addr_overrides}
        self.send(p.SetVringAddr(index=index, flags=0, log_guest_addr=0, **addrs))
        self.send(p.SetVringBase(index=index, num=base))
        self.send(p.SetVringCall(index=index, fds=(self.calls[index],)))
        self.send(p.SetVringKick(index=index, fds=(self.kicks[index],)))
        self.send(p.SetVringEnable(index=index, enable=True))

    def start(self, rx_buffers: int = 4) -> None:
        self.negotiate()
        self.send(self.mem_table())
        for _ in range(rx_buffers):
            self.rx.add_buffers(writable=[2048])
        self.setup_ring(0, self.rx)
        self.setup_ring(1, self.tx)
        self.rig.pump(lambda: self.rig.device.queues != (), rounds=20)
        assert len(self.rig.device.queues) == 2

    def transmit(self, frame: bytes) -> None:
        self.tx.add_buffers(readable=[bytes(VIRTIO_NET_HDR_LEN) + frame])
        os.eventfd_write(self.kicks[1], 1)

    def called(self, index: int) -> bool:
        try:
            return os.eventfd_read(self.calls[index]) > 0
        except BlockingIOError:
            return False

    def received(self) -> list[bytes]:
        out = []
        for head, length in self.rx.collect():
            addr = self.rx.read_desc(head)[0]
            out.append(self.memory.read(addr, length)[VIRTIO_NET_HDR_LEN:])
        return out

    def close(self) -> None:
        self.sock.close()
        for fd in self.kicks + self.calls:
            os.close(fd)
        self.memory.close()


def arp_request() -> bytes:
    arp = build_arp(ARPOP_REQUEST, MAC, GUEST_IP, bytes(6), GATEWAY_IP)
    return build_ethernet(b"\xff" * 6, MAC, ETH_P_ARP, arp)


def open_fds() -> set[str]:
    # Objects earlier tests left for the garbage collector may close fds mid-test.
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def path(tmp_path):
    return tmp_path / "net.sock"


@pytest.fixture
def rig(path, impl):
    rig = Rig(path, impl.Virtqueue)
    yield rig
    rig.close()


def arp_round_trip(front: Frontend) -> None:
    front.transmit(arp_request())
    frames: list[bytes] = []
    front.rig.pump(lambda: frames.extend(front.received()) or frames, rounds=50)
    assert len(frames) == 1
    frame = frames[0]
    assert frame[:6] == MAC and int.from_bytes(frame[12:14], "big") == ETH_P_ARP
    reply = parse_arp(frame[14:])
    assert reply.op == ARPOP_REPLY and reply.spa == GATEWAY_IP and reply.tpa == GUEST_IP
    assert front.called(0)  # the RX call eventfd
    assert front.called(1)  # the TX chain was used too


def test_the_socket_is_private_and_goes_with_the_server(path, impl):
    rig = Rig(path, impl.Virtqueue)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    rig.close()
    assert not path.exists()


def test_an_existing_file_is_never_replaced(path, impl):
    path.write_text("precious")
    loop = EventLoop()
    server = VhostUserServer(VirtioNet(None, MAC), str(path), loop, ring_factory=impl.Virtqueue)
    with pytest.raises(VoidboxError, match="not a socket"):
        server.start()
    assert path.read_text() == "precious"
    loop.close()


def test_a_live_socket_is_never_taken_over_and_a_stale_one_is(path, impl):
    """Another server listening on the path keeps it; a dead socket file of ours is
    replaced."""
    loop = EventLoop()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    server = VhostUserServer(VirtioNet(None, MAC), str(path), loop, ring_factory=impl.Virtqueue)
    with pytest.raises(VoidboxError, match="in use by another server"):
        server.start()
    live.close()  # the file stays: now a stale socket
    assert path.exists()
    server.start()
    server.close()
    loop.close()


@requires(os.geteuid() == 0, "needs root to give a socket file to another user")
def test_another_users_socket_is_never_replaced(path, impl):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    os.chown(path, 65534, 65534)  # uid nobody's, as another user's would be
    loop = EventLoop()
    server = VhostUserServer(VirtioNet(None, MAC), str(path), loop, ring_factory=impl.Virtqueue)
    with pytest.raises(VoidboxError, match="another user's socket"):
        server.start()
    assert path.exists()
    loop.close()


def test_arp_through_the_nat_and_back(rig, path):
    front = Frontend(rig, path)
    front.start()
    arp_round_trip(front)
    assert rig.device.counters["tx_frames"] == 1 and rig.device.counters["rx_frames"] == 1
    # GET_CONFIG: the MAC at offset 0.
    config = front.call(p.GetConfig(offset=0, flags=0, payload=bytes(6)))
    assert config[p.CONFIG_HEADER.size:] == MAC
    # GET_VRING_BASE stops the ring and reports how far the device read.
    assert front.call(p.GetVringBase(index=1, num=0)) == p.VRING_STATE.pack(1, 1)
    assert rig.device.queues == ()
    front.close()


def test_each_queue_is_called_only_when_its_own_driver_asks(rig, path):
    """A used ring that moved is not a reason to call its queue: with the transmitq's
    interrupts suppressed (VIRTQ_AVAIL_F_NO_INTERRUPT, §2.7.7), a frame nobody answers is
    used without a call, and the ARP reply after it calls the receiveq alone."""
    front = Frontend(rig, path)
    front.start()
    front.tx.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    front.transmit(b"\xff" * 6 + MAC + b"\x88\xb5" + bytes(46))  # a local experimental type
    rig.pump(lambda: front.tx.used_idx == 1, rounds=50)
    assert front.tx.used_idx == 1 and not front.called(1)
    front.transmit(arp_request())
    frames: list[bytes] = []
    rig.pump(lambda: frames.extend(front.received()) or frames, rounds=50)
    assert len(frames) == 1 and front.tx.used_idx == 2
    assert front.called(0)  # the receiveq's driver asked
    assert not front.called(1)  # the transmitq's did not
    front.close()


def test_a_second_frontend_is_refused_while_one_is_served(rig, path):
    front = Frontend(rig, path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.connect(str(path))
    rig.pump(lambda: rig.server.refused == 1, rounds=10)
    assert other.recv(16) == b""
    other.close()
    front.start()
    arp_round_trip(front)
    front.close()


def test_the_next_frontend_is_served_after_a_disconnect(rig, path):
    before = open_fds()
    for _ in range(2):
        front = Frontend(rig, path)
        front.start()
        arp_round_trip(front)
        front.close()
        rig.pump(lambda: rig.server.session is None, rounds=10)
        assert rig.server.session is None and rig.device.queues == ()
    assert rig.server.sessions == 2 and rig.server.activations == 2
    assert rig.server.lingering_mappings == 0
    assert open_fds() == before
    with open("/proc/self/maps") as maps:
        assert "vhost-user-test" not in maps.read()


MALFORMED = {
    "unknown request": p.HEADER.pack(99, 1, 0),
    "bad version": p.HEADER.pack(p.VHOST_USER_GET_FEATURES, 2, 0),
    "short payload": p.HEADER.pack(p.VHOST_USER_SET_FEATURES, 1, 4) + bytes(4),
    "index out of range": p.HEADER.pack(p.VHOST_USER_SET_VRING_NUM, 1, 8) + p.VRING_STATE.pack(7, 64),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_messages_close_the_connection_not_the_server(rig, path, name, caplog):
    before = open_fds()
    front = Frontend(rig, path)
    front.negotiate()
    front.send(front.mem_table())
    with caplog.at_level(logging.WARNING, logger="voidbox.vhost_user.backend"):
        front.send_raw(MALFORMED[name])
        assert front.closed_by_server()
    assert len(caplog.records) == 1
    assert rig.server.session is None
    front.close()
    assert open_fds() == before
    second = Frontend(rig, path)
    second.start()
    arp_round_trip(second)
    second.close()


OUT_OF_ORDER = {  # name: (what the frontend does, what the log line says)
    "ring address before the table": (lambda f: f.send(p.SetVringAddr(
        index=0, flags=0, desc_user_addr=UADDR, used_user_addr=UADDR, avail_user_addr=UADDR,
        log_guest_addr=0)), "before SET_MEM_TABLE"),
    "a protocol feature not offered": (
        lambda f: f.send(p.SetProtocolFeatures(features=1 << 5)), "not offered"),
    "a virtio feature not offered": (
        lambda f: f.send(p.SetFeatures(features=1 << 60)), "not offered"),
    # QEMU's virtio-mmio gives its guest 1024-entry rings; more is refused.
    "a ring larger than 1024 entries": (
        lambda f: f.send(p.SetVringNum(index=0, num=2048)), "2048 is not a power of two in 1..1024"),
    "a ring size not a power of two": (
        lambda f: f.send(p.SetVringNum(index=0, num=768)), "768 is not a power of two"),
    "a ring started before its address": (
        lambda f: (f.send(p.SetVringNum(index=0, num=QSIZE)),
                   f.send(p.SetVringKick(index=0, fds=(f.kicks[0],))),
                   f.send(p.SetVringKick(index=1, fds=(f.kicks[1],)))),
        "before SET_VRING_NUM and SET_VRING_ADDR"),
}


@pytest.mark.parametrize("name", OUT_OF_ORDER)
def test_out_of_order_or_unsupported_requests_close_the_connection(rig, path, name):
    before = open_fds()
    front = Frontend(rig, path)
    action, reason = OUT_OF_ORDER[name]
    action(front)
    assert front.closed_by_server()
    assert reason in rig.server.last_error
    front.close()
    assert open_fds() == before


@pytest.mark.parametrize("where", ["desc_user_addr", "avail_user_addr", "used_user_addr"])
def test_a_ring_outside_the_table_is_refused(rig, path, where):
    front = Frontend(rig, path)
    front.negotiate()
    front.send(front.mem_table())
    front.send(p.SetVringNum(index=0, num=QSIZE))
    bad = {where: UADDR + MEM_SIZE - 8}  # straddles the region's end
    addrs = {"desc_user_addr": UADDR + 0x10_0000, "avail_user_addr": UADDR + 0x20_0000,
             "used_user_addr": UADDR + 0x30_0000, **bad}
    front.send(p.SetVringAddr(index=0, flags=0, log_guest_addr=0, **addrs))
    assert front.closed_by_server()
    assert "maps into no memory region" in rig.server.last_error
    front.close()


def test_a_region_beyond_its_file_is_refused(rig, path):
    front = Frontend(rig, path)
    front.negotiate()
    front.send(front.mem_table(mmap_offset=4096))  # one page past the memfd's end
    assert front.closed_by_server()
    assert "bytes of a" in rig.server.last_error
    front.close()


def test_net_serve_cli_serves_until_sigterm(path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "voidbox", "net", "serve", "--vhost-user",
                             str(path), "--mtu", "1400"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the socket never appeared"
            time.sleep(0.05)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(p.encode_request(p.GetFeatures())[0])
        request, _flags, size = p.HEADER.unpack(sock.recv(p.VHOST_USER_HDR_SIZE))
        (features,) = struct.unpack("<Q", sock.recv(size))
        assert request == p.VHOST_USER_GET_FEATURES and features & (1 << VIRTIO_F_VERSION_1)
        sock.sendall(p.encode_request(p.GetConfig(offset=0, flags=0, payload=bytes(12)))[0])
        reply = sock.recv(p.VHOST_USER_HDR_SIZE + p.CONFIG_HEADER.size + 12)
        config = reply[p.VHOST_USER_HDR_SIZE + p.CONFIG_HEADER.size:]
        assert config[:6] == bytes.fromhex("525400123456")  # the NAT's guest MAC
        assert struct.unpack_from("<H", config, 10)[0] == 1400
        sock.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_a_frontend_that_goes_away_takes_its_flows_with_it(path, impl):
    """The NAT's flows of a disconnected frontend's guest are closed, host sides reset
    (serve.py wires on_disconnect to SlirpBackend.drop_flows, as here)."""
    rig = Rig(path, impl.Virtqueue)
    rig.server.on_disconnect = rig.backend.drop_flows
    engine = rig.backend.engine
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        front = Frontend(rig, path)
        front.start()
        arp_round_trip(front)
        # A flow as the guest would open one (its SYN through the engine directly).
        from tests.unit.test_destinations import syn_frame
        from voidbox.net.config import GATEWAY_IP

        engine.guest_frame(syn_frame(socket.inet_aton(GATEWAY_IP),
                                     listener.getsockname()[1]))
        rig.pump(lambda: engine.flow_count() == 1, rounds=20)
        conn, _ = listener.accept()
        conn.settimeout(5)
        assert engine.flow_count() == 1
        front.close()
        rig.pump(lambda: rig.server.session is None, rounds=20)
        assert engine.flow_count() == 0
        with pytest.raises(ConnectionResetError):
            conn.recv(10)
        conn.close()
    finally:
        listener.close()
        rig.close()


def test_engine_drop_flows_keeps_the_forward_listeners():
    from tests.unit.netframes import Harness
    from voidbox.net.config import Forward

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    h = Harness(NatConfig(forwards=[Forward("tcp", "127.0.0.1", port, 80)]))
    try:
        h.engine.drop_flows()
        assert h.engine.tcp.listener_addresses() == [("127.0.0.1", port)]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # still listening
    finally:
        h.close()


def test_rings_stopped_with_get_vring_base_resume_at_set_vring_base(rig, path):
    """Stop both rings (GET_VRING_BASE), set them up again with the bases the server
    reported (as QEMU does across a stop/start or migration): traffic continues where the
    rings left off, and the next used entries follow the earlier ones."""
    front = Frontend(rig, path)
    front.start()
    arp_round_trip(front)
    bases = [front.call(p.GetVringBase(index=i, num=0)) for i in range(2)]
    # RX: 4 buffers posted, 1 used; the 3 the card held unused count as not taken.
    assert bases == [p.VRING_STATE.pack(0, 1), p.VRING_STATE.pack(1, 1)]
    for index, driver in ((0, front.rx), (1, front.tx)):
        front.setup_ring(index, driver, base=1)  # the full set-up again, as QEMU sends it
    rig.pump(lambda: rig.device.queues != (), rounds=20)
    assert len(rig.device.queues) == 2
    assert [q.last_avail_idx for q in rig.device.queues] == [1, 1]
    arp_round_trip(front)
    assert front.tx.used_idx == 2 and front.rx.used_idx == 2
    front.close()


def test_fds_piling_up_before_a_message_ends_close_the_connection(rig, path, caplog):
    """A frontend that sends a message a byte at a time, each byte with fds, cannot make
    the server hold more fds than one message may carry (MAX_FDS_PER_MESSAGE): left alone
    they would pile up until the process has none left (EMFILE for everyone)."""
    before = open_fds()
    front = Frontend(rig, path)
    header = p.HEADER.pack(p.VHOST_USER_SET_MEM_TABLE, p.VHOST_USER_VERSION, p.MEMORY_HEADER.size)
    with caplog.at_level(logging.WARNING, logger="voidbox.vhost_user.backend"):
        for byte in header[:2]:  # each read: one byte and a full message's worth of fds
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(p.MAX_FDS_PER_MESSAGE)]
            try:
                front.send_raw(bytes([byte]), fds)
            finally:
                for fd in fds:
                    os.close(fd)
            rig.pump(rounds=2)
        assert front.closed_by_server()
    assert [r.getMessage() for r in caplog.records] == [
        f"vhost-user {path}: closing the connection: protocol error: "
        f"{2 * p.MAX_FDS_PER_MESSAGE} fds received for one message, more than {p.MAX_FDS_PER_MESSAGE}"]
    front.close()
    assert open_fds() == before


def _pipe_whose_writer_closed() -> int:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    os.close(write_end)
    return read_end  # epoll says EPOLLHUP every turn, reads return nothing


NOT_EVENTFDS = {
    "a pipe whose writer closed": _pipe_whose_writer_closed,
    "/dev/null": lambda: os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC),
    "a memfd": lambda: os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC),
}


@pytest.mark.parametrize("message", [p.SetVringKick, p.SetVringCall, p.SetVringErr])
@pytest.mark.parametrize("kind", NOT_EVENTFDS)
def test_a_vring_fd_that_is_not_an_eventfd_is_refused(rig, path, kind, message, caplog):
    """A kick that is not an eventfd would spin the loop (a pipe's EPOLLHUP every turn,
    every read failing); a call that is a file or a pipe would be written on for ever."""
    before = open_fds()
    front = Frontend(rig, path)
    front.negotiate()
    fd = NOT_EVENTFDS[kind]()
    with caplog.at_level(logging.WARNING):
        try:
            front.send(message(index=0, fds=(fd,)))
        finally:
            os.close(fd)
        assert front.closed_by_server()
    assert [r.getMessage() for r in caplog.records] == [
        f"vhost-user {path}: closing the connection: protocol error: "
        f"{message(index=0).name}: the fd is not an eventfd"]
    front.close()
    assert open_fds() == before


def test_a_full_blocking_call_eventfd_never_blocks_the_loop(rig, path):
    """A frontend's call eventfds may be blocking, their counters one short of full: a
    write would then block the loop thread for ever. The server makes them non-blocking,
    and a write that finds the counter full is dropped: the frontend sees the interrupt
    anyway (the counter is not zero)."""
    front = Frontend(rig, path)
    for index in range(2):
        os.close(front.calls[index])
        front.calls[index] = os.eventfd(0, os.EFD_CLOEXEC)
        os.eventfd_write(front.calls[index], 0xFFFF_FFFF_FFFF_FFFE)
    front.negotiate()
    front.send(p.SetVringCall(index=0, fds=(front.calls[0],)))
    rig.pump(rounds=3)
    # The server's copy shares the open file description with the frontend's.
    assert not os.get_blocking(front.calls[0])
    front.send(front.mem_table())
    for _ in range(4):
        front.rx.add_buffers(writable=[2048])
    front.setup_ring(0, front.rx)
    front.setup_ring(1, front.tx)
    rig.pump(lambda: rig.device.queues != (), rounds=20)
    front.transmit(arp_request())
    frames: list[bytes] = []
    rig.pump(lambda: frames.extend(front.received()) or frames, rounds=50)
    assert len(frames) == 1 and front.tx.used_idx == 1
    assert rig.server.full_calls >= 2 and rig.server.session is not None
    arp_round_trip(front)  # the counters read, calls get through again
    front.close()


def test_a_kick_or_call_fd_that_fails_in_use_ends_the_session(rig, path, caplog):
    """fstat cannot tell an eventfd from the other files on the kernel's anonymous inode
    (epoll, timerfd, signalfd...), and the sandboxed backend may not read /proc: such an fd
    is taken, and its first failing read (a kick) or write (a call) ends the session with
    one line, instead of a traceback every turn."""
    for which in ("kick", "call"):
        front = Frontend(rig, path)
        front.start()
        poller = select.epoll()
        signalled = os.eventfd(1, os.EFD_CLOEXEC)
        poller.register(signalled, select.EPOLLIN)  # the epoll fd is readable from now on
        message = p.SetVringKick if which == "kick" else p.SetVringCall
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            front.send(message(index=1, fds=(poller.fileno(),)))
            if which == "call":
                front.transmit(arp_request())  # its used buffer calls the transmitq
            rig.pump(lambda: rig.server.session is None, rounds=20)
            assert rig.server.session is None
        assert len(caplog.records) == 1, caplog.text
        assert caplog.records[0].exc_info is None
        assert f"{which} eventfd of ring 1: [Errno 22] Invalid argument" in caplog.records[0].getMessage()
        poller.close()
        os.close(signalled)
        front.close()


@pytest.mark.parametrize("when", ["kick", "activation"])
def test_a_broken_ring_stops_alone_until_it_is_set_up_again(rig, path, when, caplog):
    """A head beyond the ring in the transmitq's available ring (QueueError): one line,
    the ring's err eventfd signalled, its kicks no longer served; the session and the
    receiveq go on, and the ring serves again once the frontend sets it up afresh."""
    front = Frontend(rig, path)
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    bad_head = QSIZE + 5
    with caplog.at_level(logging.WARNING):
        if when == "kick":
            front.start()
            front.send(p.SetVringErr(index=1, fds=(err,)))
            front.tx.offer(bad_head)
            os.eventfd_write(front.kicks[1], 1)
        else:  # the kicks activation serves for the rings
            front.negotiate()
            front.send(front.mem_table())
            for _ in range(4):
                front.rx.add_buffers(writable=[2048])
            front.tx.offer(bad_head)
            front.send(p.SetVringErr(index=1, fds=(err,)))
            front.setup_ring(0, front.rx)
            front.setup_ring(1, front.tx)
        rig.pump(lambda: len(caplog.records) > 0, rounds=20)
        os.eventfd_write(front.kicks[1], 1)  # no longer served: no second line
        rx_kicks = rig.device.counters["rx_kicks"]
        os.eventfd_write(front.kicks[0], 1)  # the receiveq still is
        rig.pump(lambda: rig.device.counters["rx_kicks"] > rx_kicks, rounds=20)
    assert rig.device.counters["rx_kicks"] == rx_kicks + 1
    assert len(caplog.records) == 1, caplog.text
    assert caplog.records[0].exc_info is None
    assert f"vhost-user {path}: ring 1 stopped until it is set up again: " in caplog.records[0].getMessage()
    assert os.eventfd_read(err) == 1
    assert rig.server.session is not None and len(rig.device.queues) == 2
    # The frontend stops the rings, its driver mends the transmitq, and sets both up again.
    bases = [p.VRING_STATE.unpack(front.call(p.GetVringBase(index=i, num=0)))[1] for i in range(2)]
    assert bases[1] == 0  # the bad entry was never consumed
    front.tx.avail_idx = 0
    front.transmit(arp_request())  # a good chain where the bad head was
    for index, driver in ((0, front.rx), (1, front.tx)):
        front.setup_ring(index, driver, base=bases[index])
    frames: list[bytes] = []
    rig.pump(lambda: frames.extend(front.received()) or frames, rounds=50)
    assert len(frames) == 1 and front.tx.used_idx == 1
    arp_round_trip(front)
    assert len(caplog.records) == 1
    os.close(err)
    front.close()


def test_a_frontend_that_reads_its_replies_slowly_cannot_hold_the_loop(rig, path, monkeypatch):
    """A frontend that queues requests and reads one reply now and then keeps each wait for
    the socket short, but the loop thread would be in send() for as long as it keeps that
    up (64 replies a wakeup). The waits of a session share one budget, SEND_TIMEOUT: a
    frontend that reads each reply before its next request never waits at all."""
    from voidbox.vhost_user import backend

    monkeypatch.setattr(backend, "SEND_TIMEOUT", 0.3)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    rig.pump(lambda: rig.server.session is not None, rounds=5)
    # The kernel's least send buffer: a few unread replies fill it.
    rig.server.session.conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    sock.sendall(p.encode_request(p.GetFeatures())[0] * 200)
    stop = threading.Event()

    def read_a_reply_now_and_then() -> None:
        sock.settimeout(1)
        while not stop.wait(0.05):
            try:
                if not sock.recv(p.VHOST_USER_HDR_SIZE + 8):
                    return
            except (TimeoutError, ConnectionResetError):
                return

    reader = threading.Thread(target=read_a_reply_now_and_then)
    reader.start()
    try:
        deadline = time.monotonic() + 3  # without the budget: 200 replies take over 7 s
        while rig.server.session is not None and time.monotonic() < deadline:
            rig.loop.run_once(0.01)
        assert rig.server.session is None
        assert "does not read its replies" in rig.server.last_error
    finally:
        stop.set()
        reader.join()
        sock.close()
