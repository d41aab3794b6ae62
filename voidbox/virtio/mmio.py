"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2): a register file, no device logic.

The guest's driver configures features and queues through these registers; the transport
builds a `Virtqueue` per queue when the driver sets QueueReady and hands the queues to the
device at DRIVER_OK. A queue the driver configured badly (size 0, not a power of two,
rings outside memory) sets DEVICE_NEEDS_RESET and raises a configuration interrupt; the
other devices carry on, and a driver reset (status 0) brings the device back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .device import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
)

# Register offsets (§4.2.2)
VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090  # "QueueDriver" in the spec
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0  # "QueueDevice" in the spec
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

VIRTIO_MMIO_MAGIC = 0x74726976  # "virt"
VIRTIO_MMIO_TRANSPORT_VERSION = 2
VOIDBOX_VENDOR_ID = 0x564F4942  # "BIOV": any value; drivers do not match on it
U32 = 0xFFFFFFFF


class _QueueConfig:
    """What the driver wrote for one queue before setting it ready."""

    __slots__ = ("size", "desc", "avail", "used", "ready", "ring")

    def __init__(self):
        self.size = 0
        self.desc = self.avail = self.used = 0
        self.ready = False
        self.ring = None


def _set_half(value: int, half: int, high: bool) -> int:
    if high:
        return (value & U32) | (half << 32)
    return (value & ~U32) | half


class VirtioMmioTransport:
    """One virtio-mmio device window.

    `signal_interrupt()` is how an interrupt leaves the transport (an irqfd write in a VM);
    `notify(index)` is called for a QueueNotify write that did not go through an ioeventfd.

    Counters for tests and diagnostics: `notifies` (kicks handed to `handle_notify`, by
    either path), `trapped_notifies` (QueueNotify writes that reached this register file,
    i.e. did not go through an ioeventfd), `interrupts_signalled` (calls of the signal
    function) and `queue_errors`.
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory,
        signal_interrupt: Callable[[], None],
        notify: Callable[[int], None] | None = None,
        ring_factory=None,
    ):
        self.device = device
        self.memory = memory
        self._signal = signal_interrupt
        self._notify = notify or self.handle_notify
        self._ring_factory = ring_factory  # None: voidbox.ring.Virtqueue, imported when
        # the driver readies a queue (a boot that never does never imports the rings)
        self._lock = threading.RLock()
        # Held while the device serves a kick, and by a driver reset: a reset waits for
        # the request in hand instead of pulling the queues from under it (§2.1.2: after
        # reset the device must not touch the old rings). Order: _device_lock, then _lock.
        self._device_lock = threading.Lock()
        self.queue_errors = 0
        self.last_error = ""
        self.notifies = 0
        self.trapped_notifies = 0
        self.interrupts_signalled = 0
        # Set when the device's backend signals used buffers on the irqfd directly
        # (vhost-user): InterruptStatus then always shows the used-buffer bit.
        self.direct_vring_interrupts = False
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.queues = [_QueueConfig() for _ in self.device.queue_max_sizes]

    @property
    def device_features(self) -> int:
        return self.device.features | (1 << VIRTIO_F_VERSION_1)

    # -- interrupts ----------------------------------------------------------------

    def interrupt(self, kind: int = VIRTIO_MMIO_INT_VRING, queue: int | None = None) -> None:
        """Set the interrupt-status bit first, then signal (§4.2.3.4). `queue` (the one
        whose used ring asked for it) does not matter here: virtio-mmio has one line."""
        with self._lock:
            self.interrupt_status |= kind
            self.interrupts_signalled += 1
        self._signal()

    def _needs_reset(self, why: str) -> None:
        self.queue_errors += 1
        self.last_error = why
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self.interrupt(VIRTIO_MMIO_INT_CONFIG)

    def handle_notify(self, index: int) -> None:
        """Run the device for a kick on queue `index` (from an ioeventfd worker or a
        trapped QueueNotify write). A queue that turns out unusable stops the device."""
        from ..ring import QueueError

        self.notifies += 1
        with self._device_lock:
            # Checked under the lock: a reset may have run while this kick waited.
            if not self._live():
                return
            try:
                self.device.queue_notify(index)
            except QueueError as error:
                with self._lock:
                    self._needs_reset(f"queue {index}: {error}")

    # -- register file -------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset >= VIRTIO_MMIO_CONFIG:
            return self.device.config_read(offset - VIRTIO_MMIO_CONFIG, size)
        if size != 4 or offset % 4:
            return 0  # §4.2.2.2: non-config registers are 32-bit only
        with self._lock:
            queue = self._selected()
            if offset == VIRTIO_MMIO_MAGIC_VALUE:
                return VIRTIO_MMIO_MAGIC
            if offset == VIRTIO_MMIO_VERSION:
                return VIRTIO_MMIO_TRANSPORT_VERSION
            if offset == VIRTIO_MMIO_DEVICE_ID:
                return self.device.device_id
            if offset == VIRTIO_MMIO_VENDOR_ID:
                return VOIDBOX_VENDOR_ID
            if offset == VIRTIO_MMIO_DEVICE_FEATURES:
                if self.device_features_sel > 1:
                    return 0
                return (self.device_features >> (32 * self.device_features_sel)) & U32
            if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
                return 0 if queue is None else self.device.queue_max_sizes[self.queue_sel]
            if offset == VIRTIO_MMIO_QUEUE_READY:
                return int(queue is not None and queue.ready)
            if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
                if self.direct_vring_interrupts and self.status & VIRTIO_CONFIG_S_DRIVER_OK:
                    # The backend signals the irqfd itself: a used-buffer interrupt may
                    # be pending at any time, and the driver finds no work if there is none.
                    return self.interrupt_status | VIRTIO_MMIO_INT_VRING
                return self.interrupt_status
            if offset == VIRTIO_MMIO_STATUS:
                return self.status
            if offset in (VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH,
                          VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_BASE_HIGH):
                return U32  # no shared memory regions: length and base read as -1
            if offset == VIRTIO_MMIO_CONFIG_GENERATION:
                return self.config_generation + getattr(self.device, "config_generation", 0)
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= VIRTIO_MMIO_CONFIG:
            self.device.config_write(offset - VIRTIO_MMIO_CONFIG, size, value)
            return
        if size != 4 or offset % 4:
            return
        value &= U32
        if offset == VIRTIO_MMIO_QUEUE_NOTIFY:
            self.trapped_notifies += 1
            # Outside the lock: the device may take a while and raise interrupts.
            if value < len(self.queues) and self.queues[value].ring is not None and self._live():
                self._notify(value)
            return
        if offset == VIRTIO_MMIO_STATUS and value == 0:
            # A reset waits for the device to finish the request it is serving.
            with self._device_lock, self._lock:
                self._write_status(0)
            return
        with self._lock:
            queue = self._selected()
            if offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
                if self.driver_features_sel <= 1 and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
                    self.driver_features = _set_half(
                        self.driver_features, value, self.driver_features_sel == 1
                    )
            elif offset == VIRTIO_MMIO_QUEUE_SEL:
                self.queue_sel = value
            elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
                self.interrupt_status &= ~value
            elif offset == VIRTIO_MMIO_STATUS:
                self._write_status(value)
            elif queue is not None and not queue.ready:
                self._write_queue(queue, offset, value)
            elif queue is not None and offset == VIRTIO_MMIO_QUEUE_READY and value == 0:
                queue.ready = False
                queue.ring = None

    def _selected(self) -> _QueueConfig | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _live(self) -> bool:
        return bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK) and not (
            self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED)
        )

    def _write_queue(self, queue: _QueueConfig, offset: int, value: int) -> None:
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            queue.size = value
        elif offset == VIRTIO_MMIO_QUEUE_DESC_LOW:
            queue.desc = _set_half(queue.desc, value, False)
        elif offset == VIRTIO_MMIO_QUEUE_DESC_HIGH:
            queue.desc = _set_half(queue.desc, value, True)
        elif offset == VIRTIO_MMIO_QUEUE_AVAIL_LOW:
            queue.avail = _set_half(queue.avail, value, False)
        elif offset == VIRTIO_MMIO_QUEUE_AVAIL_HIGH:
            queue.avail = _set_half(queue.avail, value, True)
        elif offset == VIRTIO_MMIO_QUEUE_USED_LOW:
            queue.used = _set_half(queue.used, value, False)
        elif offset == VIRTIO_MMIO_QUEUE_USED_HIGH:
            queue.used = _set_half(queue.used, value, True)
        elif offset == VIRTIO_MMIO_QUEUE_READY and value == 1:
            self._make_ready(queue)

    def _make_ready(self, queue: _QueueConfig) -> None:
        from ..ring import QueueError, Virtqueue

        max_size = self.device.queue_max_sizes[self.queue_sel]
        ring = (self._ring_factory or Virtqueue)(self.memory, max_size)
        try:
            ring.activate(size=queue.size, desc_addr=queue.desc, avail_addr=queue.avail,
                          used_addr=queue.used,
                          event_idx=bool(self.driver_features & (1 << VIRTIO_F_EVENT_IDX)))
        except QueueError as error:
            self._needs_reset(f"queue {self.queue_sel}: {error}")
            return
        queue.ring = ring
        queue.ready = True

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_state()
            return
        # §2.1.2: the driver must not clear a status bit; only a reset (0) does. A write
        # that tries keeps them: clearing DRIVER_OK and setting it again would otherwise
        # activate a live device a second time, its buffers still held from the old rings.
        value |= self.status & ~VIRTIO_CONFIG_S_NEEDS_RESET
        new_bits = value & ~self.status
        if new_bits & VIRTIO_CONFIG_S_FEATURES_OK:
            # §2.2.2: the device refuses feature sets it did not offer, and VERSION_1 is
            # required on this transport (legacy drivers are not supported).
            offered = self.device_features
            if self.driver_features & ~offered or not self.driver_features & (1 << VIRTIO_F_VERSION_1):
                value &= ~VIRTIO_CONFIG_S_FEATURES_OK
            else:
                self.device.acked_features = self.driver_features
        if new_bits & VIRTIO_CONFIG_S_DRIVER_OK:
            if not value & VIRTIO_CONFIG_S_FEATURES_OK or self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
                value &= ~VIRTIO_CONFIG_S_DRIVER_OK
            else:
                rings = tuple(q.ring for q in self.queues)
                self.status = value
                self.device.activate(self.memory, rings, self.interrupt)
                return
        self.status = value | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET)
