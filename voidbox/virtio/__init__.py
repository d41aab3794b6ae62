"""virtio devices (virtio 1.2) on the MMIO transport.

`mmio.VirtioMmioTransport` is the register file (§4.2.2) with no device logic; each device
(`blk.VirtioBlk`, ...) sees guest memory, its queues and an interrupt callback when the
driver activates it, and nothing else.
"""
