/* virtio_blk_spin: the virtio_blk guest, but it spins after its flush instead of powering
 * off, so the host can stop the VM with a signal and check what reached the image. */
#define VIRTIO_BLK_SPIN_AT_END
#include "virtio_blk.c"
