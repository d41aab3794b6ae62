/*
 * serial_irq: the UART's interrupt paths, driven the way Linux's 8250 driver uses
 * them, through IRQ 4 on the IOAPIC (edge triggered, as ISA interrupts are).
 *
 * Transmit: with IER.ETBEI set, the handler writes at most one FIFO's worth
 * (16 bytes) per interrupt and reads IIR only once, so the rest of the line goes
 * out only if the UART raises a fresh THRE interrupt after each burst. A UART
 * that does not hangs here, which is the "output stalls after one FIFO" bug.
 * The guest prints the line
 *     tx: 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz!
 * that way, then "tx done\n" (polled).
 *
 * Receive: with IER.ERBFI set it prints "waiting for input\n" and halts; the host
 * queues a line ending in '\n' (for example "ping\n"); the handler drains RBR while
 * LSR.DR is set. The guest then prints "got: <line>\n" and powers off.
 */
#include "guest.h"

#define UART_IRQ_PIN 4 /* layout.SERIAL_COM1_IRQ */
#define UART_VECTOR 0x24
#define LAPIC_BSP_ID 0
#define UART_FIFO_SIZE 16

#define UART_RBR 0
#define UART_IER 1
#define UART_IIR 2
#define UART_FCR 2
#define UART_MCR 4
#define UART_IER_ERBFI 0x01
#define UART_IER_ETBEI 0x02
#define UART_IIR_ID_MASK 0x0F
#define UART_IIR_THRI 0x02
#define UART_IIR_RDI 0x04
#define UART_FCR_ENABLE_FIFO 0x01
#define UART_MCR_DTR 0x01
#define UART_MCR_RTS 0x02
#define UART_MCR_OUT2 0x08 /* gates INTR onto the IRQ line on PCs */
#define UART_LSR_DR 0x01

#define RX_MAX 64

static const char tx_line[] =
    "tx: 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz!\n";
static volatile unsigned tx_pos;
static volatile int tx_done;
static volatile unsigned interrupts;
static char rx_line[RX_MAX + 1];
static volatile unsigned rx_len;
static volatile int rx_done;

__attribute__((interrupt)) static void uart_handler(struct interrupt_frame *frame)
{
    (void)frame;
    uint8_t iir = inb(SERIAL_COM1_PORT + UART_IIR) & UART_IIR_ID_MASK;
    interrupts++;
    if (iir == UART_IIR_THRI) {
        for (int n = 0; n < UART_FIFO_SIZE && tx_line[tx_pos]; n++)
            outb(SERIAL_COM1_PORT + UART_THR, (uint8_t)tx_line[tx_pos++]);
        if (!tx_line[tx_pos]) {
            outb(SERIAL_COM1_PORT + UART_IER, UART_IER_ERBFI);
            tx_done = 1;
        }
    } else if (iir == UART_IIR_RDI) {
        while (inb(SERIAL_COM1_PORT + UART_LSR) & UART_LSR_DR) {
            char c = (char)inb(SERIAL_COM1_PORT + UART_RBR);
            if (c == '\n')
                rx_done = 1;
            else if (rx_len < RX_MAX)
                rx_line[rx_len++] = c;
        }
    }
    lapic_eoi();
}

static void wait_until(volatile int *flag)
{
    while (!*flag) {
        sti_hlt();
        cli();
    }
}

void guest_main(void)
{
    pic_mask_all();
    idt_init();
    idt_set_gate(UART_VECTOR, uart_handler);
    lapic_enable();
    /* Route the pin before the UART can raise it: an edge on a masked pin is lost. */
    ioapic_route(UART_IRQ_PIN, UART_VECTOR, LAPIC_BSP_ID);
    outb(SERIAL_COM1_PORT + UART_FCR, UART_FCR_ENABLE_FIFO);
    outb(SERIAL_COM1_PORT + UART_MCR, UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2);

    outb(SERIAL_COM1_PORT + UART_IER, UART_IER_ETBEI);
    wait_until(&tx_done);
    serial_puts("tx done\n");

    serial_puts("waiting for input\n");
    wait_until(&rx_done);
    rx_line[rx_len] = 0;
    serial_puts("got: ");
    serial_puts(rx_line);
    serial_puts("\n");
    acpi_poweroff();
}
