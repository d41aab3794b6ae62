"""virtio-net's numbers (virtio 1.2 §5.1) without its device core.

The vhost-user frontend (the VMM's side of a card whose backend is another process) needs
the device id, feature bits and config-space values, but none of the data path that
virtio/net.py imports (packets, rings, the NAT's fast path: ~3 ms of a boot). virtio/net.py
takes its own from here.
"""

VIRTIO_ID_NET = 1
QUEUE_SIZE = 256
DEFAULT_MTU = 1500

# Feature bits (§5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

VIRTIO_NET_S_LINK_UP = 1  # §5.1.4: status field
