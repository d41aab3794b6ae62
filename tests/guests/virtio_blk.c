/*
 * virtio_blk: a minimal virtio-blk driver (virtio 1.2 §3.1.1, §4.2.3, §5.2).
 *
 * Finds the device at VIRTIO_MMIO_BASE (magic, version 2, device id 2), negotiates
 * VERSION_1 plus FLUSH if offered (nothing else: this driver handles no other
 * feature), sets up queue 0 with QUEUE_SIZE entries whose rings live in .bss with
 * exactly the alignment §2.7 requires, then runs three requests one at a time:
 *
 *     IN    sector 0            prints its first 16 bytes and an FNV-1a hash
 *     OUT   sector WRITE_SECTOR  fills it with pattern_byte(i)
 *     FLUSH
 *
 * Each request is one kick (QueueNotify, which voidbox serves through an ioeventfd)
 * and the driver waits for its used entry and its interrupt in HLT with interrupts
 * enabled. GSI 5 is routed through the IOAPIC (edge) to VIRTIO_BLK_VECTOR; the handler
 * reads InterruptStatus, writes it back to InterruptACK and counts. Serial output (hex,
 * lower case):
 *
 *     virtio-blk magic=74726976 version=00000002 device=00000002
 *     features=XXXXXXXXXXXXXXXX ro=N
 *     capacity=XXXXXXXXXXXXXXXX
 *     queue max=XXXX size=XXXX
 *     read status=XX first=<32 hex digits> fnv=XXXXXXXX used=XXXXXXXX
 *     write status=XX used=XXXXXXXX
 *     flush status=XX used=XXXXXXXX
 *     interrupts=XX vring=XX
 *     virtio-blk done
 *
 * then ACPI poweroff. Any check that fails prints "virtio-blk FAIL: ..." and powers off.
 */
#include "guest.h"

#define VIRTIO_BLK_PIN VIRTIO_MMIO_FIRST_IRQ
#define VIRTIO_BLK_VECTOR 0x31
#define LAPIC_BSP_ID 0

#define VIRTIO_MMIO_TRANSPORT_VERSION 2
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define SECTOR_SIZE 512

#define QUEUE_SIZE 8
#define WRITE_SECTOR 1
#define SHOWN_BYTES 16
#define STATUS_UNSET 0xFF /* no virtio-blk status has this value */
#define FNV_OFFSET_BASIS 0x811C9DC5u
#define FNV_PRIME 0x01000193u

#define BASE VIRTIO_MMIO_BASE

/* The three parts of the split virtqueue (§2.7), each aligned as the spec requires
 * and no more, so that the device's alignment checks are exercised as written. */
static struct virtq_desc vq_desc[QUEUE_SIZE] __attribute__((aligned(VIRTQ_DESC_ALIGN)));

static struct {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[QUEUE_SIZE];
    uint16_t used_event;
} vq_avail __attribute__((aligned(VIRTQ_AVAIL_ALIGN)));

static struct {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[QUEUE_SIZE];
    uint16_t avail_event;
} vq_used __attribute__((aligned(VIRTQ_USED_ALIGN)));

/* struct virtio_blk_req (§5.2.6): header, data, status. */
static struct {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
} req_header __attribute__((aligned(16)));

static uint8_t req_data[SECTOR_SIZE] __attribute__((aligned(16)));
static volatile uint8_t req_status;

static volatile int irq_count;
static volatile int vring_irq_count;
static uint16_t next_avail;

__attribute__((interrupt)) static void virtio_irq_handler(struct interrupt_frame *frame)
{
    (void)frame;
    /* §4.2.3.4: read InterruptStatus, acknowledge exactly those bits. */
    uint32_t pending = virtio_read32(BASE, VIRTIO_MMIO_INTERRUPT_STATUS);
    virtio_write32(BASE, VIRTIO_MMIO_INTERRUPT_ACK, pending);
    irq_count++;
    if (pending & VIRTIO_MMIO_INT_VRING)
        vring_irq_count++;
    lapic_eoi();
}

static __attribute__((noreturn)) void fail(const char *why)
{
    serial_puts("virtio-blk FAIL: ");
    serial_puts(why);
    serial_puts("\n");
    acpi_poweroff();
}

static void set_desc(unsigned index, const volatile void *addr, uint32_t len, uint16_t flags,
                     uint16_t next)
{
    vq_desc[index].addr = (uint64_t)(uintptr_t)addr;
    vq_desc[index].len = len;
    vq_desc[index].flags = flags;
    vq_desc[index].next = next;
}

/* Submit one request as descriptors 0..2 (header, data if any, status), kick, and
 * wait in HLT until the device has used it. Returns the status byte; *used_len gets
 * the length the device reported. */
static uint8_t blk_request(uint32_t type, uint64_t sector, int with_data, uint32_t *used_len)
{
    req_header.type = type;
    req_header.reserved = 0;
    req_header.sector = sector;
    req_status = STATUS_UNSET;

    unsigned status_desc = with_data ? 2 : 1;
    set_desc(0, &req_header, sizeof(req_header), VIRTQ_DESC_F_NEXT, 1);
    if (with_data)
        set_desc(1, req_data, SECTOR_SIZE,
                 VIRTQ_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VIRTQ_DESC_F_WRITE : 0), 2);
    set_desc(status_desc, &req_status, 1, VIRTQ_DESC_F_WRITE, 0);

    uint16_t slot = next_avail % QUEUE_SIZE;
    vq_avail.ring[slot] = 0;
    virtio_barrier(); /* the entry before the index (§2.7.13) */
    next_avail++;
    *(volatile uint16_t *)&vq_avail.idx = next_avail;
    virtio_barrier(); /* the index before the notification (§2.7.13.4) */
    virtio_write32(BASE, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    /* Wait for the used entry and for this request's interrupt, so that no edge is
     * still pending (two pending edges of one vector would merge in the LAPIC) when
     * the next request goes out. Interrupts are off while checking: one arriving
     * between the check and the HLT stays pending, and sti's shadow lets it wake the
     * HLT (guest.h sti_hlt). */
    while (*(volatile uint16_t *)&vq_used.idx != next_avail || vring_irq_count != next_avail) {
        sti_hlt();
        cli();
    }
    virtio_barrier();
    struct virtq_used_elem *elem = &vq_used.ring[slot];
    if (elem->id != 0)
        fail("used ring names the wrong head");
    *used_len = elem->len;
    return req_status;
}

static uint8_t pattern_byte(unsigned i)
{
    return (uint8_t)(i * 7 + 0x3C);
}

static void negotiate(void)
{
    uint32_t status = 0;
    virtio_write32(BASE, VIRTIO_MMIO_STATUS, 0); /* reset */
    status |= VIRTIO_CONFIG_S_ACKNOWLEDGE;
    virtio_write32(BASE, VIRTIO_MMIO_STATUS, status);
    status |= VIRTIO_CONFIG_S_DRIVER;
    virtio_write32(BASE, VIRTIO_MMIO_STATUS, status);

    virtio_write32(BASE, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    uint32_t high = virtio_read32(BASE, VIRTIO_MMIO_DEVICE_FEATURES);
    virtio_write32(BASE, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint32_t low = virtio_read32(BASE, VIRTIO_MMIO_DEVICE_FEATURES);
    serial_puts("features=");
    serial_puthex(((uint64_t)high << 32) | low, 16);
    serial_puts(" ro=");
    serial_puthex((low >> VIRTIO_BLK_F_RO) & 1, 1);
    serial_puts("\n");
    if (!(high & (1u << (VIRTIO_F_VERSION_1 - 32))))
        fail("no VIRTIO_F_VERSION_1");

    /* Only what this driver handles: VERSION_1, and FLUSH so that it may flush. */
    virtio_write32(BASE, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_write32(BASE, VIRTIO_MMIO_DRIVER_FEATURES, 1u << (VIRTIO_F_VERSION_1 - 32));
    virtio_write32(BASE, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_write32(BASE, VIRTIO_MMIO_DRIVER_FEATURES, low & (1u << VIRTIO_BLK_F_FLUSH));
    status |= VIRTIO_CONFIG_S_FEATURES_OK;
    virtio_write32(BASE, VIRTIO_MMIO_STATUS, status);
    if (!(virtio_read32(BASE, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK))
        fail("FEATURES_OK refused");
    if (!(low & (1u << VIRTIO_BLK_F_FLUSH)))
        fail("no VIRTIO_BLK_F_FLUSH");

    uint64_t capacity = virtio_read32(BASE, VIRTIO_MMIO_CONFIG) |
                        (uint64_t)virtio_read32(BASE, VIRTIO_MMIO_CONFIG + 4) << 32;
    serial_puts("capacity=");
    serial_puthex(capacity, 16);
    serial_puts("\n");

    virtio_write32(BASE, VIRTIO_MMIO_QUEUE_SEL, 0);
    if (virtio_read32(BASE, VIRTIO_MMIO_QUEUE_READY) != 0)
        fail("queue 0 already ready");
    uint32_t max = virtio_read32(BASE, VIRTIO_MMIO_QUEUE_NUM_MAX);
    serial_puts("queue max=");
    serial_puthex(max, 4);
    serial_puts(" size=");
    serial_puthex(QUEUE_SIZE, 4);
    serial_puts("\n");
    if (max < QUEUE_SIZE)
        fail("queue too small");
    virtio_write32(BASE, VIRTIO_MMIO_QUEUE_NUM, QUEUE_SIZE);
    virtio_write64(BASE, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
                   (uint64_t)(uintptr_t)vq_desc);
    virtio_write64(BASE, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                   (uint64_t)(uintptr_t)&vq_avail);
    virtio_write64(BASE, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH,
                   (uint64_t)(uintptr_t)&vq_used);
    virtio_write32(BASE, VIRTIO_MMIO_QUEUE_READY, 1);
    if (virtio_read32(BASE, VIRTIO_MMIO_QUEUE_READY) != 1)
        fail("queue 0 refused");

    status |= VIRTIO_CONFIG_S_DRIVER_OK;
    virtio_write32(BASE, VIRTIO_MMIO_STATUS, status);
    if (virtio_read32(BASE, VIRTIO_MMIO_STATUS) != status)
        fail("DRIVER_OK refused");
}

static void print_result(const char *what, uint8_t status, uint32_t used_len)
{
    serial_puts(what);
    serial_puts(" status=");
    serial_puthex(status, 2);
    serial_puts(" used=");
    serial_puthex(used_len, 8);
    serial_puts("\n");
}

void guest_main(void)
{
    pic_mask_all();
    idt_init();
    idt_set_gate(VIRTIO_BLK_VECTOR, virtio_irq_handler);
    lapic_enable();
    ioapic_route(VIRTIO_BLK_PIN, VIRTIO_BLK_VECTOR, LAPIC_BSP_ID);

    uint32_t magic = virtio_read32(BASE, VIRTIO_MMIO_MAGIC_VALUE);
    uint32_t version = virtio_read32(BASE, VIRTIO_MMIO_VERSION);
    uint32_t device = virtio_read32(BASE, VIRTIO_MMIO_DEVICE_ID);
    serial_puts("virtio-blk magic=");
    serial_puthex(magic, 8);
    serial_puts(" version=");
    serial_puthex(version, 8);
    serial_puts(" device=");
    serial_puthex(device, 8);
    serial_puts("\n");
    if (magic != VIRTIO_MMIO_MAGIC || version != VIRTIO_MMIO_TRANSPORT_VERSION ||
        device != VIRTIO_ID_BLOCK)
        fail("no virtio-blk device");

    negotiate();

    uint32_t used_len;
    uint8_t status = blk_request(VIRTIO_BLK_T_IN, 0, 1, &used_len);
    uint32_t hash = FNV_OFFSET_BASIS;
    for (unsigned i = 0; i < SECTOR_SIZE; i++)
        hash = (hash ^ req_data[i]) * FNV_PRIME;
    serial_puts("read status=");
    serial_puthex(status, 2);
    serial_puts(" first=");
    for (unsigned i = 0; i < SHOWN_BYTES; i++)
        serial_puthex(req_data[i], 2);
    serial_puts(" fnv=");
    serial_puthex(hash, 8);
    serial_puts(" used=");
    serial_puthex(used_len, 8);
    serial_puts("\n");

    for (unsigned i = 0; i < SECTOR_SIZE; i++)
        req_data[i] = pattern_byte(i);
    status = blk_request(VIRTIO_BLK_T_OUT, WRITE_SECTOR, 1, &used_len);
    print_result("write", status, used_len);

    status = blk_request(VIRTIO_BLK_T_FLUSH, 0, 0, &used_len);
    print_result("flush", status, used_len);

    serial_puts("interrupts=");
    serial_puthex((uint64_t)irq_count, 2);
    serial_puts(" vring=");
    serial_puthex((uint64_t)vring_irq_count, 2);
    serial_puts("\nvirtio-blk done\n");
#ifdef VIRTIO_BLK_SPIN_AT_END
    for (;;)
        __asm__ volatile("pause");
#endif
    acpi_poweroff();
}
