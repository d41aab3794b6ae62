"""The virtio-mmio transport (virtio 1.2 §4.2.2) with real rings over a GuestMemory.

The tests play the guest driver through the register file (32-bit accesses at register
offsets, as §4.2.2.2 requires) and the driver-side ring mock in tests/virtio_driver.py.
Every test that builds a ring runs against both twins (compiled `_ring`, pure `_ring_py`).
"""

import threading

import pytest

import voidbox._ring_py as pure
from tests.unit.conftest import RING_MEM_SIZE
from tests.virtio_driver import Driver
from voidbox.ring import QueueError
from voidbox.virtio.blk import SECTOR_SIZE, BlockBackend, VirtioBlk
from voidbox.virtio.device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
)
from voidbox.virtio.mmio import (
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC,
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
    VirtioMmioTransport,
)

MEM_SIZE = RING_MEM_SIZE  # the memory fixture's size (conftest.py)
U32 = 0xFFFFFFFF
U64_MAX = (1 << 64) - 1
QUEUE_MAX = 16
FAKE_DEVICE_ID = 42
FAKE_FEATURE = 3  # a device-specific bit the fake offers
UNOFFERED_FEATURE = 7
FAKE_CONFIG = bytes(range(1, 13))
STATUS_UP_TO_FEATURES = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
# Ring layouts (guest-physical) for a second queue or a second device.
SECOND_RINGS = {"desc_addr": 0x50_0000, "avail_addr": 0x60_0000, "used_addr": 0x70_0000}
SECOND_DATA = 0x200_0000


# impl and memory fixtures: tests/unit/conftest.py


class FakeDevice(VirtioDevice):
    """Completes every chain with 0 bytes written; records what the transport did to it."""

    device_id = FAKE_DEVICE_ID
    queue_max_sizes = (QUEUE_MAX, QUEUE_MAX)

    def __init__(self):
        super().__init__()
        self.activations = []
        self.kicks = []
        self.resets = 0
        self.served = []

    @property
    def features(self):
        return (1 << VIRTIO_F_VERSION_1) | (1 << FAKE_FEATURE) | (1 << VIRTIO_F_EVENT_IDX)

    def config_bytes(self):
        return FAKE_CONFIG

    def activate(self, memory, queues, interrupt):
        super().activate(memory, queues, interrupt)
        self.activations.append(queues)

    def queue_notify(self, index):
        self.kicks.append(index)
        queue = self.queues[index]
        chains = queue.pop()
        self.served += [chain.head for chain in chains]
        queue.push_many([(chain.head, 0) for chain in chains])
        if queue.needs_notification():
            self.interrupt(VIRTIO_MMIO_INT_VRING)

    def reset(self):
        super().reset()
        self.resets += 1


class Guest:
    """The driver's side of the register file: 32-bit accesses, as §4.2.2.2 requires."""

    def __init__(self, transport):
        self.t = transport

    def r(self, offset):
        return self.t.read(offset, 4)

    def w(self, offset, value):
        self.t.write(offset, 4, value)

    def device_features(self):
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        high = self.r(VIRTIO_MMIO_DEVICE_FEATURES)
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
        return (high << 32) | self.r(VIRTIO_MMIO_DEVICE_FEATURES)

    def negotiate(self, features):
        """§3.1.1 steps 1-6; returns the status read back after FEATURES_OK."""
        self.w(VIRTIO_MMIO_STATUS, 0)
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.w(VIRTIO_MMIO_STATUS, STATUS_UP_TO_FEATURES)
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, features >> 32)
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, features & U32)
        self.w(VIRTIO_MMIO_STATUS, STATUS_UP_TO_FEATURES | VIRTIO_CONFIG_S_FEATURES_OK)
        return self.r(VIRTIO_MMIO_STATUS)

    def setup_queue(self, index, size, desc, avail, used, ready=True):
        self.w(VIRTIO_MMIO_QUEUE_SEL, index)
        self.w(VIRTIO_MMIO_QUEUE_NUM, size)
        self.w(VIRTIO_MMIO_QUEUE_DESC_LOW, desc & U32)
        self.w(VIRTIO_MMIO_QUEUE_DESC_HIGH, desc >> 32)
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail & U32)
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, avail >> 32)
        self.w(VIRTIO_MMIO_QUEUE_USED_LOW, used & U32)
        self.w(VIRTIO_MMIO_QUEUE_USED_HIGH, used >> 32)
        if ready:
            self.w(VIRTIO_MMIO_QUEUE_READY, 1)
        return self.r(VIRTIO_MMIO_QUEUE_READY)

    def setup_driver_queue(self, index, drv):
        return self.setup_queue(index, drv.size, drv.desc_addr, drv.avail_addr, drv.used_addr)

    def driver_ok(self):
        status = self.r(VIRTIO_MMIO_STATUS)
        self.w(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK)
        return self.r(VIRTIO_MMIO_STATUS)

    def kick(self, index):
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, index)


class Signals:
    """The interrupt line: records InterruptStatus as the guest would see it when raised."""

    def __init__(self):
        self.transport = None
        self.seen = []

    def __call__(self):
        self.seen.append(self.transport.read(VIRTIO_MMIO_INTERRUPT_STATUS, 4))


@pytest.fixture
def rig(impl, memory):
    """(transport, guest, device, signals) for a FakeDevice over `memory`."""

    def _make(device=None, **kwargs):
        device = device or FakeDevice()
        signals = Signals()
        transport = VirtioMmioTransport(device, memory, signals, ring_factory=impl.Virtqueue, **kwargs)
        signals.transport = transport
        return transport, Guest(transport), device, signals

    return _make


def live(rig, memory, size=8, features=(1 << VIRTIO_F_VERSION_1)):
    """A transport with queue 0 set up by a driver mock and DRIVER_OK written."""
    transport, guest, device, signals = rig()
    assert guest.negotiate(features) & VIRTIO_CONFIG_S_FEATURES_OK
    drv = Driver(memory, size=size)
    assert guest.setup_driver_queue(0, drv) == 1
    assert guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK
    return transport, guest, device, signals, drv


# -- identity and features ---------------------------------------------------------------


def test_magic_version_device_and_vendor_id(rig):
    _, guest, _, _ = rig()
    assert guest.r(VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC == 0x74726976
    assert guest.r(VIRTIO_MMIO_VERSION) == 2
    assert guest.r(VIRTIO_MMIO_DEVICE_ID) == FAKE_DEVICE_ID
    assert guest.r(VIRTIO_MMIO_VENDOR_ID) != 0


def test_device_features_are_read_in_two_32_bit_halves(rig):
    transport, guest, device, _ = rig()
    guest.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
    low = guest.r(VIRTIO_MMIO_DEVICE_FEATURES)
    guest.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
    high = guest.r(VIRTIO_MMIO_DEVICE_FEATURES)
    assert low == (1 << FAKE_FEATURE) | (1 << VIRTIO_F_EVENT_IDX)
    assert high == 1 << (VIRTIO_F_VERSION_1 - 32)
    assert (high << 32) | low == device.features
    guest.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2)  # no bits beyond 63
    assert guest.r(VIRTIO_MMIO_DEVICE_FEATURES) == 0


def test_features_ok_accepts_an_offered_subset_with_version_1(rig):
    transport, guest, device, _ = rig()
    wanted = (1 << VIRTIO_F_VERSION_1) | (1 << FAKE_FEATURE)
    status = guest.negotiate(wanted)
    assert status == STATUS_UP_TO_FEATURES | VIRTIO_CONFIG_S_FEATURES_OK
    assert device.acked_features == wanted
    # Both halves landed: the high one carries VERSION_1, the low one the device bit.
    assert transport.driver_features == wanted


@pytest.mark.parametrize(
    "features",
    [
        (1 << VIRTIO_F_VERSION_1) | (1 << UNOFFERED_FEATURE),  # not offered
        (1 << VIRTIO_F_VERSION_1) | (1 << 63),  # not offered, high half
        1 << FAKE_FEATURE,  # no VERSION_1: a legacy driver
        0,
    ],
    ids=["unoffered-low", "unoffered-high", "no-version-1", "nothing"],
)
def test_features_ok_is_refused(rig, memory, features):
    _, guest, device, _ = rig()
    status = guest.negotiate(features)
    assert not status & VIRTIO_CONFIG_S_FEATURES_OK
    assert status == STATUS_UP_TO_FEATURES
    assert device.acked_features == 0
    # And DRIVER_OK cannot follow a refused negotiation.
    assert guest.setup_driver_queue(0, Driver(memory, size=8)) == 1
    assert not guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK
    assert device.activations == []


def test_driver_features_cannot_change_after_features_ok(rig):
    transport, guest, device, _ = rig()
    guest.negotiate(1 << VIRTIO_F_VERSION_1)
    guest.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
    guest.w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << FAKE_FEATURE)
    assert transport.driver_features == 1 << VIRTIO_F_VERSION_1
    assert device.acked_features == 1 << VIRTIO_F_VERSION_1


# -- queues and activation ----------------------------------------------------------------


def test_queue_registers_then_ready_then_driver_ok_activates_the_device(rig, memory, impl):
    transport, guest, device, _ = rig()
    guest.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX))
    guest.w(VIRTIO_MMIO_QUEUE_SEL, 0)
    assert guest.r(VIRTIO_MMIO_QUEUE_NUM_MAX) == QUEUE_MAX
    assert guest.r(VIRTIO_MMIO_QUEUE_READY) == 0
    # Any address with the alignment the spec asks for (§2.7: 16, 2, 4) is accepted.
    desc, avail, used = 0x10_0010, 0x20_0002, 0x30_0004
    assert guest.setup_queue(0, 8, desc, avail, used) == 1
    assert device.activations == []  # nothing reaches the device before DRIVER_OK
    status = guest.driver_ok()
    assert status & VIRTIO_CONFIG_S_DRIVER_OK
    (queues,) = device.activations
    ring, unused = queues
    assert unused is None  # queue 1 was never set up
    assert isinstance(ring, impl.Virtqueue)
    assert (ring.size, ring.desc_addr, ring.avail_addr, ring.used_addr) == (8, desc, avail, used)
    assert ring.event_idx  # negotiated
    assert device.memory is memory


def test_queue_registers_are_frozen_once_ready(rig, memory):
    transport, guest, device, _, drv = live(rig, memory)
    guest.w(VIRTIO_MMIO_QUEUE_SEL, 0)
    guest.w(VIRTIO_MMIO_QUEUE_NUM, 2)
    guest.w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x123450)
    ring = transport.queues[0].ring
    assert (ring.size, ring.desc_addr) == (drv.size, drv.desc_addr)


def test_queue_sel_beyond_the_device_reads_zero_and_ignores_writes(rig):
    transport, guest, _, _ = rig()
    guest.w(VIRTIO_MMIO_QUEUE_SEL, 2)
    assert guest.r(VIRTIO_MMIO_QUEUE_NUM_MAX) == 0
    guest.w(VIRTIO_MMIO_QUEUE_NUM, 8)
    guest.w(VIRTIO_MMIO_QUEUE_READY, 1)
    assert guest.r(VIRTIO_MMIO_QUEUE_READY) == 0
    assert all(q.size == 0 and not q.ready for q in transport.queues)


def test_queue_notify_write_runs_the_device(rig, memory):
    transport, guest, device, signals, drv = live(rig, memory)
    head = drv.add_buffers(readable=[b"ping"])
    guest.kick(0)
    assert device.kicks == [0]
    assert device.served == [head]
    assert drv.collect() == [(head, 0)]
    assert transport.trapped_notifies == 1 and transport.notifies == 1
    # A queue that is not ready, and an index beyond the device, never reach it.
    guest.kick(1)
    guest.kick(7)
    guest.kick(U32)
    assert device.kicks == [0]


def test_queue_notify_before_driver_ok_is_ignored(rig, memory):
    _, guest, device, _ = rig()
    guest.negotiate(1 << VIRTIO_F_VERSION_1)
    drv = Driver(memory, size=8)
    guest.setup_driver_queue(0, drv)
    drv.add_buffers(readable=[b"early"])
    guest.kick(0)
    assert device.kicks == []
    assert drv.collect() == []


def test_trapped_notify_goes_to_the_notify_callback_when_given(rig, memory):
    calls = []
    transport, guest, device, _ = rig(notify=calls.append)
    guest.negotiate(1 << VIRTIO_F_VERSION_1)
    guest.setup_driver_queue(0, Driver(memory, size=8))
    guest.driver_ok()
    guest.kick(0)
    assert calls == [0] and device.kicks == []
    assert transport.trapped_notifies == 1


# -- interrupts ---------------------------------------------------------------------------


def test_interrupt_status_is_set_before_the_signal_and_cleared_by_ack(rig, memory):
    transport, guest, device, signals, drv = live(rig, memory)
    drv.add_buffers(readable=[b"x"])
    guest.kick(0)
    # The signal function saw the bit already set (the guest's handler reads it at once).
    assert signals.seen == [VIRTIO_MMIO_INT_VRING]
    assert transport.interrupts_signalled == 1
    assert guest.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
    guest.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG)  # acks only what it names
    assert guest.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
    guest.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert guest.r(VIRTIO_MMIO_INTERRUPT_STATUS) == 0


def test_no_interrupt_when_the_driver_suppresses_it(rig, memory):
    transport, guest, device, signals, drv = live(rig, memory)
    drv.set_avail_flags(pure.VIRTQ_AVAIL_F_NO_INTERRUPT)
    head = drv.add_buffers(readable=[b"quiet"])
    guest.kick(0)
    assert drv.collect() == [(head, 0)]
    assert signals.seen == [] and transport.interrupts_signalled == 0


# -- configuration space --------------------------------------------------------------------


def test_config_space_reads_any_width_and_zero_past_the_end(rig):
    _, guest, _, _ = rig()
    t = guest.t
    assert t.read(VIRTIO_MMIO_CONFIG, 1) == FAKE_CONFIG[0]
    assert t.read(VIRTIO_MMIO_CONFIG + 1, 2) == int.from_bytes(FAKE_CONFIG[1:3], "little")
    assert t.read(VIRTIO_MMIO_CONFIG + 4, 4) == int.from_bytes(FAKE_CONFIG[4:8], "little")
    assert t.read(VIRTIO_MMIO_CONFIG + 4, 8) == int.from_bytes(FAKE_CONFIG[4:12], "little")
    assert t.read(VIRTIO_MMIO_CONFIG + len(FAKE_CONFIG), 4) == 0
    assert t.read(VIRTIO_MMIO_CONFIG + len(FAKE_CONFIG) - 2, 4) == 0  # straddles the end
    assert guest.r(VIRTIO_MMIO_CONFIG_GENERATION) == 0


def test_virtio_blk_capacity_through_the_config_window(impl, memory, tmp_path):
    sectors = 2048 + 3
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(sectors * SECTOR_SIZE))
    backend = BlockBackend(str(image))
    try:
        transport = VirtioMmioTransport(VirtioBlk(backend), memory, lambda: None,
                                        ring_factory=impl.Virtqueue)
        guest = Guest(transport)
        assert guest.r(VIRTIO_MMIO_DEVICE_ID) == 2
        # The Linux driver reads the 64-bit capacity as two 32-bit halves, low first.
        low = transport.read(VIRTIO_MMIO_CONFIG, 4)
        high = transport.read(VIRTIO_MMIO_CONFIG + 4, 4)
        assert (high << 32) | low == sectors
        assert transport.read(VIRTIO_MMIO_CONFIG, 8) == sectors
        blk_size = transport.read(VIRTIO_MMIO_CONFIG + 20, 4)  # §5.2.4 blk_size
        assert blk_size == SECTOR_SIZE
    finally:
        backend.close()


def test_shared_memory_regions_read_as_absent(rig):
    _, guest, _, _ = rig()
    assert guest.r(VIRTIO_MMIO_SHM_LEN_LOW) == U32
    assert guest.r(VIRTIO_MMIO_SHM_LEN_HIGH) == U32


# -- reset ------------------------------------------------------------------------------------


def test_status_zero_resets_the_transport_and_the_device(rig, memory):
    transport, guest, device, signals, drv = live(rig, memory)
    drv.add_buffers(readable=[b"x"])
    guest.kick(0)
    assert guest.r(VIRTIO_MMIO_INTERRUPT_STATUS)
    guest.w(VIRTIO_MMIO_STATUS, 0)
    assert guest.r(VIRTIO_MMIO_STATUS) == 0
    assert guest.r(VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    guest.w(VIRTIO_MMIO_QUEUE_SEL, 0)
    assert guest.r(VIRTIO_MMIO_QUEUE_READY) == 0
    assert transport.driver_features == 0
    assert device.resets == 2  # negotiate() starts with a reset too
    assert device.queues == () and device.acked_features == 0
    # A kick after the reset reaches nothing.
    drv.add_buffers(readable=[b"y"])
    guest.kick(0)
    assert device.kicks == [0]


def test_a_driver_cannot_clear_a_status_bit_and_activate_twice(rig, memory):
    """§2.1.2: only a reset clears status bits. Clearing DRIVER_OK and setting it again
    (no reset) must not activate the live device a second time."""
    transport, guest, device, signals, drv = live(rig, memory)
    status = guest.r(VIRTIO_MMIO_STATUS)
    guest.w(VIRTIO_MMIO_STATUS, status & ~(VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FEATURES_OK))
    assert guest.r(VIRTIO_MMIO_STATUS) == status
    guest.w(VIRTIO_MMIO_STATUS, status)
    assert len(device.activations) == 1 and device.resets == 1
    drv.add_buffers(readable=[b"x"])
    guest.kick(0)
    assert device.kicks == [0]  # still served, by the one activation


def test_reset_waits_for_the_request_in_hand(rig, memory):
    """A driver reset on a vCPU must not pull the queues from under the I/O worker."""
    entered, release = threading.Event(), threading.Event()
    seen_during = []

    class SlowDevice(FakeDevice):
        def queue_notify(self, index):
            entered.set()
            release.wait()
            seen_during.append(self.queues)  # still the activated queues
            super().queue_notify(index)

    transport, guest, device, _ = rig(SlowDevice())
    guest.negotiate(1 << VIRTIO_F_VERSION_1)
    drv = Driver(memory, size=8)
    guest.setup_driver_queue(0, drv)
    guest.driver_ok()
    head = drv.add_buffers(readable=[b"slow"])
    worker = threading.Thread(target=transport.handle_notify, args=(0,))
    worker.start()
    assert entered.wait(30)
    resetter = threading.Thread(target=guest.w, args=(VIRTIO_MMIO_STATUS, 0))
    resetter.start()
    resetter.join(0.2)
    still_waiting = resetter.is_alive()
    release.set()
    worker.join(30)
    resetter.join(30)
    assert still_waiting, "the reset did not wait for the device"
    assert seen_during and seen_during[0][0] is not None
    assert drv.collect() == [(head, 0)]
    assert device.resets == 2 and guest.r(VIRTIO_MMIO_STATUS) == 0


# -- hostile drivers --------------------------------------------------------------------------


def assert_needs_reset(transport, guest, signals, device):
    status = guest.r(VIRTIO_MMIO_STATUS)
    assert status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert guest.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG
    assert signals.seen and signals.seen[-1] & VIRTIO_MMIO_INT_CONFIG
    assert transport.queue_errors >= 1 and transport.last_error


@pytest.mark.parametrize("size", [0, 3, 12, QUEUE_MAX * 2, 1 << 16, U32],
                         ids=["zero", "three", "twelve", "above-max", "2^16", "2^32-1"])
def test_bad_queue_num_is_refused_with_needs_reset(rig, memory, size):
    transport, guest, device, signals = rig()
    guest.negotiate(1 << VIRTIO_F_VERSION_1)
    drv = Driver(memory, size=8)
    assert guest.setup_queue(0, size, drv.desc_addr, drv.avail_addr, drv.used_addr) == 0
    assert_needs_reset(transport, guest, signals, device)
    assert not guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK
    assert device.activations == []


@pytest.mark.parametrize(
    "rings",
    [
        {"desc": U64_MAX - 15},
        {"avail": U64_MAX - 1},
        {"used": U64_MAX - 3},
        {"desc": (1 << 64) - 0x1000},
        {"desc": MEM_SIZE - 16},  # 8 descriptors do not fit before the end of RAM
        {"used": MEM_SIZE - 4},
        {"avail": MEM_SIZE},
        {"desc": 0x10_0008},  # misaligned: 16 bytes required
        {"avail": 0x20_0001},  # misaligned: 2 bytes required
        {"used": 0x30_0002},  # misaligned: 4 bytes required
    ],
    ids=["desc-2^64", "avail-2^64", "used-2^64", "desc-2^64-page", "desc-end", "used-end",
         "avail-past-end", "desc-align", "avail-align", "used-align"],
)
def test_rings_outside_memory_are_refused_with_needs_reset(rig, memory, rings):
    transport, guest, device, signals = rig()
    guest.negotiate(1 << VIRTIO_F_VERSION_1)
    addrs = {"desc": 0x10_0000, "avail": 0x20_0000, "used": 0x30_0000, **rings}
    assert guest.setup_queue(0, 8, addrs["desc"], addrs["avail"], addrs["used"]) == 0
    assert_needs_reset(transport, guest, signals, device)
    assert not guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK


def test_avail_index_jump_on_a_kick_sets_needs_reset(rig, memory):
    transport, guest, device, signals, drv = live(rig, memory)
    drv.set_avail_idx(drv.size + 1)
    guest.kick(0)
    assert_needs_reset(transport, guest, signals, device)
    assert device.served == []
    assert "moved by" in transport.last_error
    # The broken device is dead until reset: later kicks do not reach it.
    guest.kick(0)
    assert device.kicks == [0]


def test_a_broken_device_leaves_other_devices_working(rig, memory):
    broken, bguest, bdevice, bsignals, bdrv = live(rig, memory)
    other, oguest, odevice, osignals = rig()
    oguest.negotiate(1 << VIRTIO_F_VERSION_1)
    odrv = Driver(memory, size=8, **SECOND_RINGS)
    odrv._data_next = SECOND_DATA
    oguest.setup_driver_queue(0, odrv)
    oguest.driver_ok()
    bdrv.set_avail_idx(0xFFFF)
    bguest.kick(0)
    assert_needs_reset(broken, bguest, bsignals, bdevice)
    head = odrv.add_buffers(readable=[b"still here"])
    oguest.kick(0)
    assert odrv.collect() == [(head, 0)]
    assert not oguest.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert osignals.seen == [VIRTIO_MMIO_INT_VRING]


def test_a_driver_reset_brings_the_queue_back(rig, memory):
    transport, guest, device, signals, drv = live(rig, memory)
    drv.set_avail_idx(drv.size + 5)
    guest.kick(0)
    assert guest.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    guest.w(VIRTIO_MMIO_STATUS, 0)
    assert guest.r(VIRTIO_MMIO_STATUS) == 0
    # The driver starts over with fresh rings, as after any reset (§3.1.1).
    memory.write(drv.avail_addr, bytes(16))
    memory.write(drv.used_addr, bytes(16))
    fresh = Driver(memory, size=8)
    assert guest.negotiate(1 << VIRTIO_F_VERSION_1) & VIRTIO_CONFIG_S_FEATURES_OK
    assert guest.setup_driver_queue(0, fresh) == 1
    assert guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK
    head = fresh.add_buffers(readable=[b"again"])
    guest.kick(0)
    assert fresh.collect() == [(head, 0)]
    assert device.served == [head]
    assert guest.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING


def test_a_queue_error_raised_by_the_device_sets_needs_reset(rig, memory):
    class Failing(FakeDevice):
        def queue_notify(self, index):
            raise QueueError("synthetic")

    transport, guest, device, signals = rig(Failing())
    guest.negotiate(1 << VIRTIO_F_VERSION_1)
    guest.setup_driver_queue(0, Driver(memory, size=8))
    guest.driver_ok()
    transport.handle_notify(0)  # the ioeventfd path
    assert_needs_reset(transport, guest, signals, device)
    assert transport.trapped_notifies == 0 and transport.notifies == 1


# -- access widths ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 8])
def test_register_reads_of_other_widths_return_zero(rig, size):
    _, guest, _, _ = rig()
    t = guest.t
    assert t.read(VIRTIO_MMIO_MAGIC_VALUE, size) == 0
    assert t.read(VIRTIO_MMIO_DEVICE_ID, size) == 0


def test_misaligned_register_reads_return_zero(rig):
    _, guest, _, _ = rig()
    assert guest.t.read(VIRTIO_MMIO_MAGIC_VALUE + 1, 4) == 0
    assert guest.t.read(VIRTIO_MMIO_VERSION + 2, 4) == 0


@pytest.mark.parametrize("size", [1, 2, 8])
def test_register_writes_of_other_widths_are_ignored(rig, memory, size):
    transport, guest, device, signals, drv = live(rig, memory)
    drv.add_buffers(readable=[b"x"])
    t = guest.t
    t.write(VIRTIO_MMIO_QUEUE_NOTIFY, size, 0)
    assert device.kicks == [] and transport.trapped_notifies == 0
    t.write(VIRTIO_MMIO_STATUS, size, 0)  # no reset
    assert guest.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK and device.resets == 1
    t.write(VIRTIO_MMIO_QUEUE_SEL, size, 1)
    assert transport.queue_sel == 0
    guest.kick(0)
    t.write(VIRTIO_MMIO_INTERRUPT_ACK, size, VIRTIO_MMIO_INT_VRING)
    assert guest.r(VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING


def test_misaligned_register_writes_are_ignored(rig, memory):
    transport, guest, device, signals, drv = live(rig, memory)
    transport.write(VIRTIO_MMIO_STATUS + 1, 4, 0)
    transport.write(VIRTIO_MMIO_QUEUE_NOTIFY + 2, 4, 0)
    assert guest.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK
    assert device.kicks == [] and device.resets == 1
