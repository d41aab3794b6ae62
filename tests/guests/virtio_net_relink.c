/* virtio_net_relink: virtio_net, then it waits for the card's link to go down and come
 * back (a backend restarted under --net-reconnect) and asks for the gateway's MAC again
 * (see virtio_net.c). */
#define VIRTIO_NET_RELINK 1
#include "virtio_net.c"
