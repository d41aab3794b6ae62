"""What a virtio device implements, and the constants every device shares (virtio 1.2 §2, §6)."""

from __future__ import annotations

# Device status bits (§2.1)
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 64
VIRTIO_CONFIG_S_FAILED = 128

# Reserved feature bits (§6)
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# Interrupt status bits (§4.2.2, InterruptStatus)
VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1


class VirtioDevice:
    """Base class: a device's identity, features, configuration space and queues.

    The transport calls `activate(memory, queues, interrupt)` once the driver sets
    DRIVER_OK, `queue_notify(index)` for each kick, and `reset()` when the driver writes 0
    to the status register. `interrupt(kind)` raises VIRTIO_MMIO_INT_VRING or _CONFIG.
    """

    device_id = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self):
        self.acked_features = 0
        self.memory = None
        self.queues = ()
        self.interrupt = None

    @property
    def features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def config_bytes(self) -> bytes:
        return b""

    def config_read(self, offset: int, size: int) -> int:
        config = self.config_bytes()
        if offset < 0 or offset + size > len(config):
            return 0
        return int.from_bytes(config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Most devices' configuration space is read-only; writes are ignored."""

    def activate(self, memory, queues, interrupt) -> None:
        self.memory = memory
        self.queues = queues
        self.interrupt = interrupt

    def queue_notify(self, index: int) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.memory = None
        self.queues = ()
        self.interrupt = None
        self.acked_features = 0
