/*
 * virtio_net: a minimal virtio-net driver (virtio 1.2 §3.1.1, §4.2.3, §5.1) that asks
 * voidbox's user-mode NAT for an address and for its gateway's MAC.
 *
 * With no disk image the NIC is the first virtio-mmio window (VIRTIO_MMIO_BASE, GSI
 * VIRTIO_MMIO_FIRST_IRQ). The driver checks magic, version 2 and device id 1, negotiates
 * VERSION_1 and MAC and nothing else (in particular not MRG_RXBUF, so each RX buffer holds
 * a whole frame behind its header: RX_BUF_SIZE = 12 + 1514 bytes), reads the MAC from
 * config space, sets up receiveq1 (queue 0) and transmitq1 (queue 1) with QUEUE_SIZE
 * entries each, posts RX_BUFFERS receive buffers, sets DRIVER_OK and kicks the receiveq.
 * Then, one transmit at a time:
 *
 *     DHCP DISCOVER  Ethernet broadcast, 0.0.0.0:68 -> 255.255.255.255:67, BOOTP with the
 *                    DHCP magic cookie and option 53 = DISCOVER (RFC 2131, RFC 2132);
 *                    waits for the OFFER and prints yiaddr and the message type
 *     ARP request    who has 10.0.2.2, from the offered address and our MAC (RFC 826);
 *                    waits for the reply and prints its sender IP and MAC
 *
 * Each frame goes out behind a zeroed 12-byte struct virtio_net_hdr (§5.1.6) in one
 * descriptor, with one kick (QueueNotify, which voidbox serves through an ioeventfd). The
 * driver waits in HLT with interrupts enabled until the transmit is used and the reply is
 * in an RX buffer. GSI 5 is routed through the IOAPIC (edge) to VIRTIO_NET_VECTOR; the
 * handler reads InterruptStatus, writes it back to InterruptACK and counts. Serial output
 * (hex, lower case):
 *
 *     virtio-net magic=74726976 version=00000002 device=00000001
 *     features=XXXXXXXXXXXXXXXX driver=XXXXXXXXXXXXXXXX
 *     mac=xx:xx:xx:xx:xx:xx
 *     queue 0 max=XXXX size=XXXX
 *     queue 1 max=XXXX size=XXXX
 *     dhcp offer yiaddr=XXXXXXXX type=XX len=XXXX
 *     arp reply ip=XXXXXXXX mac=xx:xx:xx:xx:xx:xx len=XXXX
 *     rx frames=XX tx used=XX interrupts=XX vring=XX
 *     virtio-net done
 *
 * then ACPI poweroff. Any check that fails prints "virtio-net FAIL: ..." and powers off.
 *
 * Two variants build from this file (a wrapper .c that defines one switch):
 *
 *   VIRTIO_NET_LENIENT     (virtio_net_lenient) also negotiates GUEST_CSUM when offered, and
 *                          takes an RX frame marked DATA_VALID without it (§5.1.6.4.1 says
 *                          flags must then be zero; this driver checks no checksum, so the
 *                          mark is harmless), counting each: "rx data_valid unasked=XX"
 *                          before the last lines
 *   VIRTIO_NET_RELINK      (virtio_net_relink) also negotiates STATUS; after the ARP reply
 *                          it prints "relink waiting", waits in HLT for the link to go down
 *                          and to come back (config interrupts, §5.1.4 status), printing
 *                          "link down" and "link up", then asks for the gateway's MAC again
 *                          on the same rings: "arp again ip=... mac=..."
 */
#include "guest.h"

#define VIRTIO_NET_PIN VIRTIO_MMIO_FIRST_IRQ
#define VIRTIO_NET_VECTOR 0x31
#define LAPIC_BSP_ID 0

#define VIRTIO_MMIO_TRANSPORT_VERSION 2
#define VIRTIO_ID_NET 1
#define VIRTIO_NET_F_GUEST_CSUM 1 /* §5.1.3 */
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_S_LINK_UP 1 /* §5.1.4 */
#define VIRTIO_NET_CONFIG_STATUS 6 /* offset of le16 status in struct virtio_net_config */
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_F_DATA_VALID 2
#define RX_QUEUE 0         /* receiveq1 */
#define TX_QUEUE 1         /* transmitq1 */

/* struct virtio_net_hdr (§5.1.6), VERSION_1 layout: always 12 bytes. */
struct virtio_net_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};
#define VIRTIO_NET_HDR_LEN 12
#define VIRTIO_NET_HDR_GSO_NONE 0

#define QUEUE_SIZE 8
#define RX_BUFFERS QUEUE_SIZE
/* Without MRG_RXBUF each buffer must take a whole frame (§5.1.6.3.1). */
#define ETH_FRAME_MAX 1514
#define RX_BUF_SIZE (VIRTIO_NET_HDR_LEN + ETH_FRAME_MAX)
#define TX_BUF_SIZE 512

/* ---- Ethernet, IPv4, UDP, ARP, BOOTP/DHCP ---- */
#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define IPV4_HLEN 20
#define IPV4_VERSION_IHL 0x45
#define IPV4_TTL 64
#define IPPROTO_UDP 17
#define UDP_HLEN 8
#define DHCP_SERVER_PORT 67
#define DHCP_CLIENT_PORT 68
#define BOOTREQUEST 1
#define BOOTREPLY 2
#define HTYPE_ETHER 1
#define BOOTP_FIXED_LEN 236 /* RFC 2131 §2: op .. file */
#define BOOTP_XID 4
#define BOOTP_YIADDR 16
#define BOOTP_CHADDR 28
#define DHCP_MAGIC 0x63825363u /* RFC 2132 §2 */
#define DHO_PAD 0
#define DHO_DHCP_MESSAGE_TYPE 53
#define DHO_END 255
#define DHCPDISCOVER 1
#define DHCPOFFER 2
#define DHCP_XID 0x766f6964u /* "void" */
/* The DISCOVER: fixed header, cookie, option 53 (3 bytes), option 255. */
#define DHCP_DISCOVER_LEN (BOOTP_FIXED_LEN + 4 + 3 + 1)
#define ARPHRD_ETHER 1
#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2
#define ARP_LEN 28
#define ARP_OP 6
#define ARP_SHA 8
#define ARP_SPA 14
#define ARP_THA 18
#define ARP_TPA 24
#define GATEWAY_IP 0x0a000202u /* 10.0.2.2, voidbox/net/config.py */

#define BASE VIRTIO_MMIO_BASE

/* The three parts of a split virtqueue (§2.7), each aligned as the spec requires. */
struct vq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[QUEUE_SIZE];
    uint16_t used_event;
};

struct vq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[QUEUE_SIZE];
    uint16_t avail_event;
};

static struct virtq_desc rx_desc[QUEUE_SIZE] __attribute__((aligned(VIRTQ_DESC_ALIGN)));
static struct vq_avail rx_avail __attribute__((aligned(VIRTQ_AVAIL_ALIGN)));
static struct vq_used rx_used __attribute__((aligned(VIRTQ_USED_ALIGN)));
static struct virtq_desc tx_desc[QUEUE_SIZE] __attribute__((aligned(VIRTQ_DESC_ALIGN)));
static struct vq_avail tx_avail __attribute__((aligned(VIRTQ_AVAIL_ALIGN)));
static struct vq_used tx_used __attribute__((aligned(VIRTQ_USED_ALIGN)));

static uint8_t rx_buf[RX_BUFFERS][RX_BUF_SIZE] __attribute__((aligned(16)));
/* One zeroed buffer per frame sent, so nothing needs clearing: header, then frame. */
static uint8_t tx_dhcp[TX_BUF_SIZE] __attribute__((aligned(16)));
static uint8_t tx_arp[TX_BUF_SIZE] __attribute__((aligned(16)));

static uint8_t mac[ETH_ALEN];
static uint16_t rx_seen;  /* used entries of the receiveq consumed so far */
static uint16_t tx_next;  /* avail index of the transmitq */
static volatile int irq_count;
static volatile int vring_irq_count;
#ifdef VIRTIO_NET_LENIENT
static int guest_csum;              /* GUEST_CSUM negotiated */
static unsigned data_valid_unasked; /* frames marked DATA_VALID without it */
#endif

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
    serial_puts("virtio-net FAIL: ");
    serial_puts(why);
    serial_puts("\n");
    acpi_poweroff();
}

static void put16(uint8_t *p, uint16_t v) /* network byte order */
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
    put16(p, (uint16_t)(v >> 16));
    put16(p + 2, (uint16_t)v);
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)get16(p) << 16 | get16(p + 2);
}

static void put_mac(uint8_t *p, const uint8_t *m)
{
    for (unsigned i = 0; i < ETH_ALEN; i++)
        p[i] = m[i];
}

static int same_mac(const uint8_t *a, const uint8_t *b)
{
    for (unsigned i = 0; i < ETH_ALEN; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

static void print_mac(const uint8_t *m)
{
    for (unsigned i = 0; i < ETH_ALEN; i++) {
        if (i)
            serial_putc(':');
        serial_puthex(m[i], 2);
    }
}

/* RFC 1071 over an even number of bytes: the IPv4 header checksum. */
static uint16_t inet_checksum(const uint8_t *p, unsigned len)
{
    uint32_t sum = 0;
    for (unsigned i = 0; i < len; i += 2)
        sum += get16(p + i);
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

static void set_desc(struct virtq_desc *desc, const volatile void *addr, uint32_t len,
                     uint16_t flags)
{
    desc->addr = (uint64_t)(uintptr_t)addr;
    desc->len = len;
    desc->flags = flags;
    desc->next = 0;
}

static void setup_queue(unsigned index, struct virtq_desc *desc, struct vq_avail *avail,
                        struct vq_used *used)
{
    virtio_write32(BASE, VIRTIO_MMIO_QUEUE_SEL, index);
    if (virtio_read32(BASE, VIRTIO_MMIO_QUEUE_READY) != 0)
        fail("queue already ready");
    uint32_t max = virtio_read32(BASE, VIRTIO_MMIO_QUEUE_NUM_MAX);
    serial_puts("queue ");
    serial_puthex(index, 1);
    serial_puts(" max=");
    serial_puthex(max, 4);
    serial_puts(" size=");
    serial_puthex(QUEUE_SIZE, 4);
    serial_puts("\n");
    if (max < QUEUE_SIZE)
        fail("queue too small");
    virtio_write32(BASE, VIRTIO_MMIO_QUEUE_NUM, QUEUE_SIZE);
    virtio_write64(BASE, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
                   (uint64_t)(uintptr_t)desc);
    virtio_write64(BASE, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                   (uint64_t)(uintptr_t)avail);
    virtio_write64(BASE, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH,
                   (uint64_t)(uintptr_t)used);
    virtio_write32(BASE, VIRTIO_MMIO_QUEUE_READY, 1);
    if (virtio_read32(BASE, VIRTIO_MMIO_QUEUE_READY) != 1)
        fail("queue refused");
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
    if (!(high & (1u << (VIRTIO_F_VERSION_1 - 32))))
        fail("no VIRTIO_F_VERSION_1");
    if (!(low & (1u << VIRTIO_NET_F_MAC)))
        fail("no VIRTIO_NET_F_MAC");

    /* Only what this driver handles: VERSION_1 and MAC. Without MRG_RXBUF, CSUM and
     * GUEST_CSUM every frame is whole, in one buffer, with its checksums filled in. */
    uint32_t driver_high = 1u << (VIRTIO_F_VERSION_1 - 32);
    uint32_t driver_low = 1u << VIRTIO_NET_F_MAC;
#ifdef VIRTIO_NET_LENIENT
    /* This driver checks no UDP or ARP checksum, so a partial or vouched-for one is fine. */
    driver_low |= low & (1u << VIRTIO_NET_F_GUEST_CSUM);
#endif
#ifdef VIRTIO_NET_RELINK
    if (!(low & (1u << VIRTIO_NET_F_STATUS)))
        fail("no VIRTIO_NET_F_STATUS");
    driver_low |= 1u << VIRTIO_NET_F_STATUS;
#endif
    virtio_write32(BASE, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_write32(BASE, VIRTIO_MMIO_DRIVER_FEATURES, driver_high);
    virtio_write32(BASE, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_write32(BASE, VIRTIO_MMIO_DRIVER_FEATURES, driver_low);
#ifdef VIRTIO_NET_LENIENT
    guest_csum = (driver_low >> VIRTIO_NET_F_GUEST_CSUM) & 1;
#endif
    serial_puts("features=");
    serial_puthex(((uint64_t)high << 32) | low, 16);
    serial_puts(" driver=");
    serial_puthex(((uint64_t)driver_high << 32) | driver_low, 16);
    serial_puts("\n");
    status |= VIRTIO_CONFIG_S_FEATURES_OK;
    virtio_write32(BASE, VIRTIO_MMIO_STATUS, status);
    if (!(virtio_read32(BASE, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK))
        fail("FEATURES_OK refused");

    /* struct virtio_net_config (§5.1.4): mac is u8[6] at offset 0, read byte by byte. */
    for (unsigned i = 0; i < ETH_ALEN; i++)
        mac[i] = mmio_read8(BASE + VIRTIO_MMIO_CONFIG + i);
    serial_puts("mac=");
    print_mac(mac);
    serial_puts("\n");

    setup_queue(RX_QUEUE, rx_desc, &rx_avail, &rx_used);
    setup_queue(TX_QUEUE, tx_desc, &tx_avail, &tx_used);

    /* §5.1.5: fill the receiveq before going live; every buffer is device-writable. */
    for (unsigned i = 0; i < RX_BUFFERS; i++) {
        set_desc(&rx_desc[i], rx_buf[i], RX_BUF_SIZE, VIRTQ_DESC_F_WRITE);
        rx_avail.ring[i] = (uint16_t)i;
    }
    virtio_barrier(); /* the entries before the index (§2.7.13) */
    *(volatile uint16_t *)&rx_avail.idx = RX_BUFFERS;

    status |= VIRTIO_CONFIG_S_DRIVER_OK;
    virtio_write32(BASE, VIRTIO_MMIO_STATUS, status);
    if (virtio_read32(BASE, VIRTIO_MMIO_STATUS) != status)
        fail("DRIVER_OK refused");
    virtio_barrier();
    virtio_write32(BASE, VIRTIO_MMIO_QUEUE_NOTIFY, RX_QUEUE); /* buffers posted */
}

/* Put the frame in tx (behind its zeroed header) on the transmitq as one descriptor and
 * kick. The caller waits for it to be used. */
static void transmit(uint8_t *tx, unsigned frame_len)
{
    unsigned slot = tx_next % QUEUE_SIZE;
    set_desc(&tx_desc[slot], tx, VIRTIO_NET_HDR_LEN + frame_len, 0);
    tx_avail.ring[slot] = (uint16_t)slot;
    virtio_barrier(); /* the entry before the index (§2.7.13) */
    tx_next++;
    *(volatile uint16_t *)&tx_avail.idx = tx_next;
    virtio_barrier(); /* the index before the notification (§2.7.13.4) */
    virtio_write32(BASE, VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE);
}

/* Wait in HLT until every transmit is used and the receiveq has an entry we have not
 * seen; return that frame (past its header) and its length. Interrupts are off while
 * checking: one arriving between the check and the HLT stays pending, and sti's shadow
 * lets it wake the HLT (guest.h sti_hlt). Each buffer is used once and never reposted:
 * past RX_BUFFERS frames the driver gives up. */
static const uint8_t *receive(uint32_t *frame_len)
{
    if (rx_seen == RX_BUFFERS)
        fail("every RX buffer used without the expected reply");
    while (*(volatile uint16_t *)&tx_used.idx != tx_next ||
           *(volatile uint16_t *)&rx_used.idx == rx_seen) {
        sti_hlt();
        cli();
    }
    virtio_barrier();
    struct virtq_used_elem *elem = &rx_used.ring[rx_seen % QUEUE_SIZE];
    rx_seen++;
    uint32_t id = elem->id;
    uint32_t len = elem->len;
    if (id >= RX_BUFFERS)
        fail("used ring names an unknown RX buffer");
    if (len < VIRTIO_NET_HDR_LEN + ETH_HLEN || len > RX_BUF_SIZE)
        fail("RX used length out of range");
    const struct virtio_net_hdr *hdr = (const struct virtio_net_hdr *)rx_buf[id];
    /* No GUEST_TSO or MRG_RXBUF acked: no GSO, one buffer; checksum flags only with
     * GUEST_CSUM. */
    uint8_t allowed_flags = 0;
#ifdef VIRTIO_NET_LENIENT
    if (guest_csum) {
        allowed_flags = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID;
    } else if (hdr->flags == VIRTIO_NET_HDR_F_DATA_VALID) {
        allowed_flags = VIRTIO_NET_HDR_F_DATA_VALID;
        data_valid_unasked++;
    }
#endif
    if ((hdr->flags & ~allowed_flags) != 0 || hdr->gso_type != VIRTIO_NET_HDR_GSO_NONE) {
        serial_puts("rx header flags=");
        serial_puthex(hdr->flags, 2);
        serial_puts(" gso_type=");
        serial_puthex(hdr->gso_type, 2);
        serial_puts("\n");
        fail("RX header uses an offload that was not negotiated");
    }
    if (hdr->num_buffers > 1)
        fail("RX frame spread over several buffers");
    *frame_len = len - VIRTIO_NET_HDR_LEN;
    return rx_buf[id] + VIRTIO_NET_HDR_LEN;
}

static uint8_t *eth_header(uint8_t *tx, const uint8_t *dst, uint16_t ethertype)
{
    uint8_t *eth = tx + VIRTIO_NET_HDR_LEN; /* the header stays zero: no offload */
    put_mac(eth, dst);
    put_mac(eth + ETH_ALEN, mac);
    put16(eth + 2 * ETH_ALEN, ethertype);
    return eth + ETH_HLEN;
}

static const uint8_t broadcast[ETH_ALEN] = {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};

static unsigned build_dhcp_discover(void)
{
    uint8_t *ip = eth_header(tx_dhcp, broadcast, ETH_P_IP);
    uint8_t *udp = ip + IPV4_HLEN;
    uint8_t *bootp = udp + UDP_HLEN;

    /* RFC 2131 §2 and §4.4.1: a client without an address, asking by broadcast. */
    bootp[0] = BOOTREQUEST;
    bootp[1] = HTYPE_ETHER;
    bootp[2] = ETH_ALEN;
    put32(bootp + BOOTP_XID, DHCP_XID);
    put_mac(bootp + BOOTP_CHADDR, mac);
    uint8_t *opt = bootp + BOOTP_FIXED_LEN;
    put32(opt, DHCP_MAGIC);
    opt[4] = DHO_DHCP_MESSAGE_TYPE;
    opt[5] = 1;
    opt[6] = DHCPDISCOVER;
    opt[7] = DHO_END;

    /* RFC 768: a zero checksum means none was computed. */
    put16(udp, DHCP_CLIENT_PORT);
    put16(udp + 2, DHCP_SERVER_PORT);
    put16(udp + 4, UDP_HLEN + DHCP_DISCOVER_LEN);

    /* RFC 791 §3.1: 0.0.0.0 -> 255.255.255.255, checksum over the header. */
    ip[0] = IPV4_VERSION_IHL;
    put16(ip + 2, IPV4_HLEN + UDP_HLEN + DHCP_DISCOVER_LEN);
    ip[8] = IPV4_TTL;
    ip[9] = IPPROTO_UDP;
    put32(ip + 16, 0xFFFFFFFFu);
    put16(ip + 10, inet_checksum(ip, IPV4_HLEN));
    return ETH_HLEN + IPV4_HLEN + UDP_HLEN + DHCP_DISCOVER_LEN;
}

/* The OFFER's yiaddr if frame is a BOOTREPLY to our DISCOVER (*type gets option 53),
 * else 0. */
static uint32_t parse_dhcp_reply(const uint8_t *frame, uint32_t len, uint8_t *type)
{
    if (get16(frame + 2 * ETH_ALEN) != ETH_P_IP || len < ETH_HLEN + IPV4_HLEN)
        return 0;
    const uint8_t *ip = frame + ETH_HLEN;
    unsigned ihl = (ip[0] & 0x0F) * 4u;
    if (ip[0] >> 4 != 4 || ip[9] != IPPROTO_UDP || ihl < IPV4_HLEN)
        return 0;
    if (len < ETH_HLEN + ihl + UDP_HLEN + BOOTP_FIXED_LEN + 4)
        return 0;
    const uint8_t *udp = ip + ihl;
    if (get16(udp) != DHCP_SERVER_PORT || get16(udp + 2) != DHCP_CLIENT_PORT)
        return 0;
    const uint8_t *bootp = udp + UDP_HLEN;
    if (bootp[0] != BOOTREPLY || get32(bootp + BOOTP_XID) != DHCP_XID ||
        !same_mac(bootp + BOOTP_CHADDR, mac) || get32(bootp + BOOTP_FIXED_LEN) != DHCP_MAGIC)
        fail("BOOTP reply is not an answer to our DISCOVER");
    /* RFC 2132 §2: walk the options, bounded by the frame. */
    const uint8_t *end = frame + len;
    const uint8_t *opt = bootp + BOOTP_FIXED_LEN + 4;
    *type = 0;
    while (opt < end && *opt != DHO_END) {
        if (*opt == DHO_PAD) {
            opt++;
            continue;
        }
        if (opt + 2 > end || opt + 2 + opt[1] > end)
            fail("DHCP options run past the frame");
        if (opt[0] == DHO_DHCP_MESSAGE_TYPE && opt[1] == 1)
            *type = opt[2];
        opt += 2 + opt[1];
    }
    return get32(bootp + BOOTP_YIADDR);
}

static unsigned build_arp_request(uint32_t our_ip, uint32_t target_ip)
{
    uint8_t *arp = eth_header(tx_arp, broadcast, ETH_P_ARP);
    put16(arp, ARPHRD_ETHER);
    put16(arp + 2, ETH_P_IP);
    arp[4] = ETH_ALEN;
    arp[5] = 4;
    put16(arp + ARP_OP, ARPOP_REQUEST);
    put_mac(arp + ARP_SHA, mac);
    put32(arp + ARP_SPA, our_ip);
    put32(arp + ARP_TPA, target_ip); /* tha stays zero */
    return ETH_HLEN + ARP_LEN;
}

/* ARP for the gateway from `our_ip`; print the reply as "<label> ip=... mac=... len=...". */
static void ask_gateway(uint32_t our_ip, const char *label)
{
    uint32_t len;
    const uint8_t *frame;
    const uint8_t *arp;
    transmit(tx_arp, build_arp_request(our_ip, GATEWAY_IP));
    do {
        frame = receive(&len);
        arp = frame + ETH_HLEN;
    } while (get16(frame + 2 * ETH_ALEN) != ETH_P_ARP || len < ETH_HLEN + ARP_LEN ||
             get16(arp + ARP_OP) != ARPOP_REPLY);
    if (!same_mac(frame, mac) || !same_mac(arp + ARP_THA, mac) || get32(arp + ARP_TPA) != our_ip)
        fail("ARP reply for someone else");
    if (!same_mac(frame + ETH_ALEN, arp + ARP_SHA))
        fail("ARP reply's Ethernet source is not its sender");
    serial_puts(label);
    serial_puts(" ip=");
    serial_puthex(get32(arp + ARP_SPA), 8);
    serial_puts(" mac=");
    print_mac(arp + ARP_SHA);
    serial_puts(" len=");
    serial_puthex(len, 4);
    serial_puts("\n");
    if (get32(arp + ARP_SPA) != GATEWAY_IP)
        fail("ARP reply from the wrong address");
}

#ifdef VIRTIO_NET_RELINK
static int link_up(void)
{
    return mmio_read16(BASE + VIRTIO_MMIO_CONFIG + VIRTIO_NET_CONFIG_STATUS) & VIRTIO_NET_S_LINK_UP;
}
#endif

void guest_main(void)
{
    pic_mask_all();
    idt_init();
    idt_set_gate(VIRTIO_NET_VECTOR, virtio_irq_handler);
    lapic_enable();
    ioapic_route(VIRTIO_NET_PIN, VIRTIO_NET_VECTOR, LAPIC_BSP_ID);

    uint32_t magic = virtio_read32(BASE, VIRTIO_MMIO_MAGIC_VALUE);
    uint32_t version = virtio_read32(BASE, VIRTIO_MMIO_VERSION);
    uint32_t device = virtio_read32(BASE, VIRTIO_MMIO_DEVICE_ID);
    serial_puts("virtio-net magic=");
    serial_puthex(magic, 8);
    serial_puts(" version=");
    serial_puthex(version, 8);
    serial_puts(" device=");
    serial_puthex(device, 8);
    serial_puts("\n");
    if (magic != VIRTIO_MMIO_MAGIC || version != VIRTIO_MMIO_TRANSPORT_VERSION ||
        device != VIRTIO_ID_NET)
        fail("no virtio-net device");

    negotiate();

    transmit(tx_dhcp, build_dhcp_discover());
    uint32_t len;
    uint32_t yiaddr = 0;
    uint8_t type = 0;
    const uint8_t *frame;
    do {
        frame = receive(&len);
        yiaddr = parse_dhcp_reply(frame, len, &type);
    } while (yiaddr == 0);
    if (!same_mac(frame, mac) && !same_mac(frame, broadcast))
        fail("DHCP reply for another MAC");
    serial_puts("dhcp offer yiaddr=");
    serial_puthex(yiaddr, 8);
    serial_puts(" type=");
    serial_puthex(type, 2);
    serial_puts(" len=");
    serial_puthex(len, 4);
    serial_puts("\n");
    if (type != DHCPOFFER)
        fail("DHCP reply is not an OFFER");

    ask_gateway(yiaddr, "arp reply");

#ifdef VIRTIO_NET_RELINK
    /* The backend goes away and another takes its place: the card's link goes down and
     * comes back, each with a configuration interrupt that wakes the HLT. */
    serial_puts("relink waiting\n");
    while (link_up()) {
        sti_hlt();
        cli();
    }
    serial_puts("link down\n");
    while (!link_up()) {
        sti_hlt();
        cli();
    }
    serial_puts("link up\n");
    ask_gateway(yiaddr, "arp again");
#endif

    /* A used-buffer interrupt the device signalled while receive() checked the rings with
     * interrupts off stays pending until they are on again: a fast backend (another
     * process) can finish before this driver ever halts. Take it now (bounded), so the
     * count says whether interrupts arrive, not how that race went. KVM injects a pending
     * interrupt only at an entry with interrupts on; a software KVM (kvm_pvm) has no
     * interrupt-window exit, so a bare "sti; nop; cli" may never see it: halt instead,
     * once the LAPIC holds the vector (a pending interrupt wakes the HLT at once). */
    for (int spin = 0; spin < 100000 && vring_irq_count == 0; spin++) {
        if (lapic_pending(VIRTIO_NET_VECTOR)) {
            sti_hlt();
            cli();
        }
    }

#ifdef VIRTIO_NET_LENIENT
    serial_puts("rx data_valid unasked=");
    serial_puthex(data_valid_unasked, 2);
    serial_puts("\n");
#endif
    serial_puts("rx frames=");
    serial_puthex(rx_seen, 2);
    serial_puts(" tx used=");
    serial_puthex(*(volatile uint16_t *)&tx_used.idx, 2);
    serial_puts(" interrupts=");
    serial_puthex((uint64_t)irq_count, 2);
    serial_puts(" vring=");
    serial_puthex((uint64_t)vring_irq_count, 2);
    serial_puts("\nvirtio-net done\n");
    acpi_poweroff();
}
