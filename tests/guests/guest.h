/*
 * Freestanding support for voidbox's tiny test guests.
 *
 * Each guest is one C file that includes this header and defines guest_main().
 * voidbox's ELF loader enters _start at 1 MiB in 64-bit long mode (paging on,
 * identity map of the first 4 GiB in 2 MiB pages, CS = 0x10, DS = SS = 0x18,
 * interrupts off). _start moves to a stack of our own in .bss, calls guest_main()
 * and halts with interrupts off if it returns.
 *
 * Every instruction a guest executes is emulated on software-only KVM (about
 * 0.3 M per second): keep guests to a few thousand instructions, and use only
 * general-purpose registers (built with -mgeneral-regs-only; SSE is not enabled).
 *
 * The port and address constants repeat voidbox/layout.py under the same names;
 * tests/unit/test_guests_build.py checks that they agree.
 */
#ifndef VOIDBOX_GUEST_H
#define VOIDBOX_GUEST_H

#include <stddef.h>
#include <stdint.h>

/* ---- voidbox/layout.py ---- */
#define SERIAL_COM1_PORT 0x3F8
#define I8042_DATA_PORT 0x60
#define I8042_COMMAND_PORT 0x64
#define ACPI_SLEEP_CONTROL_PORT 0x600
#define ACPI_SLEEP_STATUS_PORT 0x601
#define IOAPIC_ADDR 0xFEC00000UL
#define LAPIC_ADDR 0xFEE00000UL
#define HIMEM_ADDR 0x100000UL

/* ---- 16550 UART (PC16550D register summary) ---- */
#define UART_THR 0
#define UART_LSR 5
#define UART_LSR_THRE 0x20

/* ---- ACPI 6.4 §4.8.3.7 sleep control register ---- */
#define ACPI_SLEEP_TYPE_SHIFT 2
#define ACPI_SLEEP_ENABLE 0x20
#define ACPI_S5_SLEEP_TYPE 5 /* \_S5_ in voidbox's DSDT */

/* ---- i8042 ---- */
#define I8042_CMD_PULSE_RESET 0xFE

/* ---- 8259A PICs: masked, so only the IOAPIC delivers ---- */
#define PIC_MASTER_IMR 0x21
#define PIC_SLAVE_IMR 0xA1

/* ---- local APIC (Intel SDM vol. 3A §11.4-11.8) ---- */
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xB0
#define LAPIC_SVR 0xF0
#define LAPIC_IRR 0x200
#define LAPIC_SVR_APIC_ENABLE 0x100
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_MASKED 0x10000
#define LAPIC_SPURIOUS_VECTOR 0xFF

/* ---- I/O APIC (82093AA datasheet §3.2) ---- */
#define IOAPIC_IOREGSEL 0x00
#define IOAPIC_IOWIN 0x10
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define IOAPIC_DEST_SHIFT 24 /* bits 56-63 of the entry: physical APIC ID */

/* ---- long-mode IDT (Intel SDM vol. 3A §6.14.1) ---- */
#define GUEST_CODE_SELECTOR 0x10
#define IDT_GATE_INTERRUPT 0x8E /* present, DPL 0, 64-bit interrupt gate */
#define IDT_VECTORS 256

#define GUEST_STACK_SIZE 16384
#define GUEST_STR_(x) #x
#define GUEST_STR(x) GUEST_STR_(x)

void guest_main(void);

unsigned char guest_stack[GUEST_STACK_SIZE] __attribute__((aligned(16)));

/* The entry point, placed first in .text by guest.ld so that e_entry == 1 MiB. */
__asm__(".section .text.start, \"ax\", @progbits\n"
        ".globl _start\n"
        ".type _start, @function\n"
        "_start:\n"
        "    cli\n"
        "    lea guest_stack+" GUEST_STR(GUEST_STACK_SIZE) "(%rip), %rsp\n"
        "    call guest_main\n"
        "1:  cli\n"
        "    hlt\n"
        "    jmp 1b\n"
        ".previous\n");

/* ---- port I/O ---- */
static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %b0, %w1" : : "a"(value), "Nd"(port) : "memory");
}

static inline void outw(uint16_t port, uint16_t value)
{
    __asm__ volatile("outw %w0, %w1" : : "a"(value), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t value)
{
    __asm__ volatile("outl %k0, %w1" : : "a"(value), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ volatile("inb %w1, %b0" : "=a"(value) : "Nd"(port) : "memory");
    return value;
}

static inline uint16_t inw(uint16_t port)
{
    uint16_t value;
    __asm__ volatile("inw %w1, %w0" : "=a"(value) : "Nd"(port) : "memory");
    return value;
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t value;
    __asm__ volatile("inl %w1, %k0" : "=a"(value) : "Nd"(port) : "memory");
    return value;
}

/* ---- MMIO: one access of exactly the named width each ---- */
static inline void mmio_write8(uintptr_t addr, uint8_t value)
{
    *(volatile uint8_t *)addr = value;
}

static inline void mmio_write16(uintptr_t addr, uint16_t value)
{
    *(volatile uint16_t *)addr = value;
}

static inline void mmio_write32(uintptr_t addr, uint32_t value)
{
    *(volatile uint32_t *)addr = value;
}

static inline void mmio_write64(uintptr_t addr, uint64_t value)
{
    *(volatile uint64_t *)addr = value;
}

static inline uint8_t mmio_read8(uintptr_t addr)
{
    return *(volatile uint8_t *)addr;
}

static inline uint16_t mmio_read16(uintptr_t addr)
{
    return *(volatile uint16_t *)addr;
}

static inline uint32_t mmio_read32(uintptr_t addr)
{
    return *(volatile uint32_t *)addr;
}

static inline uint64_t mmio_read64(uintptr_t addr)
{
    return *(volatile uint64_t *)addr;
}

/* ---- CPU ---- */
static inline void cli(void)
{
    __asm__ volatile("cli" : : : "memory");
}

static inline void sti(void)
{
    __asm__ volatile("sti" : : : "memory");
}

static inline void hlt(void)
{
    __asm__ volatile("hlt" : : : "memory");
}

/* sti's one-instruction interrupt shadow makes "sti; hlt" race-free: an interrupt
 * that is already pending wakes the hlt instead of slipping in before it. */
static inline void sti_hlt(void)
{
    __asm__ volatile("sti\n\thlt" : : : "memory");
}

static inline void cpu_pause(void)
{
    __asm__ volatile("pause" : : : "memory");
}

static inline __attribute__((noreturn)) void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli\n\thlt" : : : "memory");
}

/* gcc may emit calls to these for struct copies and clears even when freestanding.
 * The volatile stores keep it from turning the loops back into calls to themselves. */
__attribute__((used)) void *memset(void *dst, int c, size_t n)
{
    volatile unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

__attribute__((used)) void *memcpy(void *dst, const void *src, size_t n)
{
    volatile unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

/* ---- serial console: polled, no interrupts ---- */
static inline void serial_putc(char c)
{
    while (!(inb(SERIAL_COM1_PORT + UART_LSR) & UART_LSR_THRE))
        cpu_pause();
    outb(SERIAL_COM1_PORT + UART_THR, (uint8_t)c);
}

static inline void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

/* Lower-case hex, exactly `digits` digits, no prefix. */
static inline void serial_puthex(uint64_t value, int digits)
{
    static const char hex[] = "0123456789abcdef";
    for (int shift = 4 * (digits - 1); shift >= 0; shift -= 4)
        serial_putc(hex[(value >> shift) & 0xF]);
}

/* ---- power ---- */
static inline __attribute__((noreturn)) void acpi_poweroff(void)
{
    outb(ACPI_SLEEP_CONTROL_PORT,
         (ACPI_S5_SLEEP_TYPE << ACPI_SLEEP_TYPE_SHIFT) | ACPI_SLEEP_ENABLE);
    halt_forever();
}

/* ---- interrupt controllers ---- */
static inline void pic_mask_all(void)
{
    /* An uninitialised 8259 pair would pass a GSI on as vector 0-15 through
     * LINT0 (ExtINT); mask both so the IOAPIC is the only path. */
    outb(PIC_MASTER_IMR, 0xFF);
    outb(PIC_SLAVE_IMR, 0xFF);
}

static inline void lapic_write(uint32_t reg, uint32_t value)
{
    mmio_write32(LAPIC_ADDR + reg, value);
}

static inline uint32_t lapic_read(uint32_t reg)
{
    return mmio_read32(LAPIC_ADDR + reg);
}

static inline void lapic_enable(void)
{
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_SVR, LAPIC_SVR_APIC_ENABLE | LAPIC_SPURIOUS_VECTOR);
}

static inline void lapic_eoi(void)
{
    lapic_write(LAPIC_EOI, 0);
}

/* Whether `vector` waits in the LAPIC's Interrupt Request Register (0x200 + 0x10 per 32). */
static inline int lapic_pending(uint8_t vector)
{
    return (lapic_read(LAPIC_IRR + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

static inline void ioapic_write(uint32_t index, uint32_t value)
{
    mmio_write32(IOAPIC_ADDR + IOAPIC_IOREGSEL, index);
    mmio_write32(IOAPIC_ADDR + IOAPIC_IOWIN, value);
}

static inline uint32_t ioapic_read(uint32_t index)
{
    mmio_write32(IOAPIC_ADDR + IOAPIC_IOREGSEL, index);
    return mmio_read32(IOAPIC_ADDR + IOAPIC_IOWIN);
}

/* Route IOAPIC pin `pin` to `vector` on APIC `dest`: fixed delivery, physical
 * destination, active high, edge triggered, unmasked. High half first, so the
 * entry is never live with a stale destination. */
static inline void ioapic_route(unsigned pin, uint8_t vector, uint8_t dest)
{
    ioapic_write(IOAPIC_REDTBL(pin) + 1, (uint32_t)dest << IOAPIC_DEST_SHIFT);
    ioapic_write(IOAPIC_REDTBL(pin), vector);
}

/* ---- IDT ---- */
struct interrupt_frame {
    uint64_t rip;
    uint64_t cs;
    uint64_t rflags;
    uint64_t rsp;
    uint64_t ss;
};

struct idt_gate {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t reserved;
} __attribute__((packed));

struct idt_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

__attribute__((unused, aligned(16))) static struct idt_gate guest_idt[IDT_VECTORS];

static inline void idt_set_gate(unsigned vector, void (*handler)(struct interrupt_frame *))
{
    uint64_t addr = (uint64_t)(uintptr_t)handler;
    struct idt_gate *gate = &guest_idt[vector];
    gate->offset_low = (uint16_t)addr;
    gate->selector = GUEST_CODE_SELECTOR;
    gate->ist = 0;
    gate->type_attr = IDT_GATE_INTERRUPT;
    gate->offset_mid = (uint16_t)(addr >> 16);
    gate->offset_high = (uint32_t)(addr >> 32);
    gate->reserved = 0;
}

static inline void lidt(uint16_t limit, uint64_t base)
{
    struct idt_ptr ptr = {limit, base};
    __asm__ volatile("lidt %0" : : "m"(ptr) : "memory");
}

/* Any vector nobody asked for: say so and power off, so a test fails with a
 * message rather than a timeout. Never returns, so vectors that push an error
 * code (8, 10-14, 17, 21, 29, 30) are fine here too. */
__attribute__((interrupt, unused)) static void unexpected_vector(struct interrupt_frame *frame)
{
    serial_puts("unexpected interrupt at rip=");
    serial_puthex(frame->rip, 16);
    serial_puts("\n");
    acpi_poweroff();
}

/* Point every vector at unexpected_vector and load the IDT. */
static inline void idt_init(void)
{
    for (unsigned v = 0; v < IDT_VECTORS; v++)
        idt_set_gate(v, unexpected_vector);
    lidt(sizeof(guest_idt) - 1, (uint64_t)(uintptr_t)guest_idt);
}

#endif /* VOIDBOX_GUEST_H */

/*
 * ---- virtio over MMIO, driver side (virtio 1.2 §4.2.2, §2.7) ----
 *
 * Appended for the virtio test guests; guarded separately so the section above is
 * unchanged. Register offsets and bits use the names of voidbox/virtio/mmio.py and
 * device.py (which follow the spec and Linux's uapi headers).
 */
#ifndef VOIDBOX_GUEST_VIRTIO_H
#define VOIDBOX_GUEST_VIRTIO_H

/* ---- voidbox/layout.py ---- */
#define VIRTIO_MMIO_BASE 0xD0000000UL
#define VIRTIO_MMIO_FIRST_IRQ 5

/* ---- virtio-mmio registers (§4.2.2) ---- */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x0A0
#define VIRTIO_MMIO_QUEUE_USED_HIGH 0x0A4
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_MMIO_INT_VRING 0x1
#define VIRTIO_MMIO_INT_CONFIG 0x2

/* ---- device status (§2.1) and reserved feature bits (§6) ---- */
#define VIRTIO_CONFIG_S_ACKNOWLEDGE 1
#define VIRTIO_CONFIG_S_DRIVER 2
#define VIRTIO_CONFIG_S_DRIVER_OK 4
#define VIRTIO_CONFIG_S_FEATURES_OK 8
#define VIRTIO_CONFIG_S_NEEDS_RESET 64
#define VIRTIO_F_VERSION_1 32

/* ---- split virtqueue (§2.7) ---- */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_ALIGN 16
#define VIRTQ_AVAIL_ALIGN 2
#define VIRTQ_USED_ALIGN 4

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

/* x86 keeps stores in program order (TSO), so the ring stores reach memory before the
 * QueueNotify store that follows them; only the compiler must not reorder them. */
static inline void virtio_barrier(void)
{
    __asm__ volatile("" : : : "memory");
}

static inline uint32_t virtio_read32(uintptr_t base, uint32_t reg)
{
    return mmio_read32(base + reg);
}

static inline void virtio_write32(uintptr_t base, uint32_t reg, uint32_t value)
{
    mmio_write32(base + reg, value);
}

/* Writes a 64-bit guest-physical address into a LOW/HIGH register pair. */
static inline void virtio_write64(uintptr_t base, uint32_t low_reg, uint32_t high_reg,
                                  uint64_t value)
{
    mmio_write32(base + low_reg, (uint32_t)value);
    mmio_write32(base + high_reg, (uint32_t)(value >> 32));
}

#endif /* VOIDBOX_GUEST_VIRTIO_H */
