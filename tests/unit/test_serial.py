"""The 16550A UART against the probes and paths Linux's 8250 driver takes."""

import threading

import pytest

from voidbox.devices import serial as s
from voidbox.devices.bus import Bus
from voidbox.devices.serial import RX_QUEUE_LIMIT, Serial8250
from voidbox.layout import SERIAL_COM1_PORT


class Uart:
    """A UART with recorded interrupt levels and output batches."""

    def __init__(self):
        self.levels: list[int] = []
        self.chunks: list[bytes] = []
        self.dev = Serial8250(self.levels.append, self.chunks.append)

    def out(self, reg, value):
        self.dev.write(reg, 1, value)

    def inp(self, reg):
        return self.dev.read(reg, 1)

    @property
    def output(self) -> bytes:
        return b"".join(self.chunks)

    def enable_irq(self, ier):
        self.out(s.UART_MCR, s.UART_MCR_OUT2 | s.UART_MCR_DTR | s.UART_MCR_RTS)
        self.out(s.UART_IER, ier)


@pytest.fixture
def uart():
    return Uart()


def test_reset_state(uart):
    assert uart.inp(s.UART_IIR) == s.UART_IIR_NO_INT
    assert uart.inp(s.UART_LSR) == s.UART_LSR_THRE | s.UART_LSR_TEMT
    assert uart.inp(s.UART_IER) == 0
    assert uart.levels == []


def test_polled_output_batches_by_line(uart):
    for byte in b"hello\nwor":
        assert uart.inp(s.UART_LSR) & s.UART_LSR_THRE
        uart.out(s.UART_THR, byte)
    assert uart.chunks == [b"hello\n"]
    uart.dev.flush()
    assert uart.chunks == [b"hello\n", b"wor"]
    assert uart.dev.tx_bytes == 9
    uart.dev.flush()
    assert len(uart.chunks) == 2  # nothing pending: no empty write


def test_output_flushes_at_batch_size(uart):
    for _ in range(s.TX_BATCH):
        uart.out(s.UART_THR, ord("a"))
    assert uart.output == b"a" * s.TX_BATCH


def test_ier_write_flushes_pending_output(uart):
    # Linux ends a console write and a transmit burst by rewriting IER.
    for byte in b"login: ":
        uart.out(s.UART_THR, byte)
    assert uart.output == b""
    uart.out(s.UART_IER, 0)
    assert uart.output == b"login: "


def test_polled_writer_is_batched_until_it_waits_for_input(uart):
    for byte in b"> ":
        assert uart.inp(s.UART_LSR) & s.UART_LSR_THRE  # one LSR read per byte
        uart.out(s.UART_THR, byte)
    assert uart.output == b""
    # Now it polls LSR for DR, waiting for the user: the prompt must show.
    assert not uart.inp(s.UART_LSR) & s.UART_LSR_DR
    assert uart.output == b""
    assert not uart.inp(s.UART_LSR) & s.UART_LSR_DR
    assert uart.output == b"> "


def test_rbr_read_flushes_pending_output(uart):
    uart.out(s.UART_THR, ord("?"))
    uart.inp(s.UART_RBR)
    assert uart.output == b"?"


def test_ier_keeps_low_nibble_only(uart):
    # autoconfig(): IER 0 reads 0, 0x0F reads 0x0F; the UUE probe writes bit 6.
    uart.out(s.UART_IER, 0xFF)
    assert uart.inp(s.UART_IER) == 0x0F
    uart.out(s.UART_IER, 0)
    assert uart.inp(s.UART_IER) == 0


def test_fifo_enable_identifies_16550a(uart):
    uart.out(s.UART_FCR, s.UART_FCR_ENABLE_FIFO)
    assert uart.inp(s.UART_IIR) >> 6 == 3
    assert uart.inp(s.UART_IIR) & 0x30 == 0  # not a 16750 (64-byte FIFO bit)
    uart.out(s.UART_FCR, 0)
    assert uart.inp(s.UART_IIR) >> 6 == 0


def test_divisor_latch_and_scratch(uart):
    uart.out(s.UART_LCR, s.UART_LCR_DLAB | 0x03)
    uart.out(s.UART_DLL, 0x0C)
    uart.out(s.UART_DLM, 0x01)
    assert (uart.inp(s.UART_DLL), uart.inp(s.UART_DLM)) == (0x0C, 0x01)
    assert uart.inp(s.UART_LCR) == s.UART_LCR_DLAB | 0x03
    uart.out(s.UART_LCR, 0x03)
    # The latch is not the data path: IER and THR are back.
    assert uart.inp(s.UART_IER) == 0
    uart.out(s.UART_THR, ord("\n"))
    assert uart.output == b"\n"
    uart.out(s.UART_SCR, 0x5A)
    assert uart.inp(s.UART_SCR) == 0x5A


def test_loopback_probe_and_data(uart):
    # autoconfig(): MCR = LOOP | RTS | OUT2 must read back MSR high nibble 0x90.
    uart.out(s.UART_MCR, s.UART_MCR_LOOP | 0x0A)
    assert uart.inp(s.UART_MSR) & 0xF0 == 0x90
    uart.out(s.UART_MCR, s.UART_MCR_LOOP | s.UART_MCR_DTR | s.UART_MCR_OUT1)
    assert uart.inp(s.UART_MSR) & 0xF0 == s.UART_MSR_DSR | s.UART_MSR_RI
    uart.out(s.UART_THR, 0x42)
    assert uart.output == b""
    assert uart.inp(s.UART_LSR) & s.UART_LSR_DR
    assert uart.inp(s.UART_RBR) == 0x42
    uart.out(s.UART_MCR, 0)
    assert uart.inp(s.UART_MSR) & 0xF0 == s.UART_MSR_CONNECTED


def test_msr_deltas_clear_on_read(uart):
    uart.out(s.UART_MCR, s.UART_MCR_LOOP)
    first = uart.inp(s.UART_MSR)
    assert first & s.UART_MSR_DELTAS  # CTS, DSR, DCD all dropped
    assert uart.inp(s.UART_MSR) & s.UART_MSR_DELTAS == 0


def test_thre_interrupt_on_enable_and_iir_read_clears(uart):
    uart.enable_irq(s.UART_IER_ETBEI)
    assert uart.levels == [1]
    assert uart.inp(s.UART_IIR) == s.UART_IIR_THRI
    assert uart.levels == [1, 0]
    assert uart.inp(s.UART_IIR) == s.UART_IIR_NO_INT


def test_thre_reasserted_after_reenable(uart):
    # serial8250_startup's UART_BUG_THRE probe: IER=THRI, read IIR, IER=0,
    # IER=THRI, read IIR: a real 16550 reports THRI both times.
    uart.out(s.UART_IER, s.UART_IER_ETBEI)
    assert uart.inp(s.UART_IIR) & 0x0F == s.UART_IIR_THRI
    uart.out(s.UART_IER, 0)
    uart.out(s.UART_IER, s.UART_IER_ETBEI)
    assert uart.inp(s.UART_IIR) & 0x0F == s.UART_IIR_THRI


def test_every_transmitted_byte_gives_a_new_edge(uart):
    uart.enable_irq(s.UART_IER_ETBEI)
    assert uart.inp(s.UART_IIR) == s.UART_IIR_THRI  # the ISR's read
    assert uart.levels == [1, 0]
    for byte in b"abc":
        uart.out(s.UART_THR, byte)
    # One rising edge per byte, so an edge-triggered IOAPIC pin never misses one.
    assert uart.levels == [1, 0, 1, 0, 1, 0, 1]
    assert uart.levels.count(1) == 4


def test_no_interrupt_without_out2(uart):
    uart.out(s.UART_IER, s.UART_IER_ETBEI | s.UART_IER_ERBFI)
    uart.dev.enqueue_input(b"x")
    uart.out(s.UART_THR, ord("y"))
    assert uart.levels == []
    assert uart.inp(s.UART_IIR) & 0x0F != s.UART_IIR_NO_INT  # pending, just not wired
    uart.out(s.UART_MCR, s.UART_MCR_OUT2)
    assert uart.levels == [1]


def test_no_interrupt_in_loopback(uart):
    uart.out(s.UART_MCR, s.UART_MCR_OUT2 | s.UART_MCR_LOOP)
    uart.out(s.UART_IER, s.UART_IER_ETBEI)
    assert uart.levels == []
    uart.out(s.UART_MCR, s.UART_MCR_OUT2)
    assert uart.levels == [1]


def test_receive_interrupt_and_data_ready(uart):
    uart.enable_irq(s.UART_IER_ERBFI)
    assert uart.levels == []
    assert uart.dev.enqueue_input(b"ok") == 2
    assert uart.levels == [1]
    assert uart.inp(s.UART_IIR) == s.UART_IIR_RDI
    got = []
    while uart.inp(s.UART_LSR) & s.UART_LSR_DR:
        got.append(uart.inp(s.UART_RBR))
    assert bytes(got) == b"ok"
    assert uart.levels == [1, 0]
    assert uart.inp(s.UART_IIR) == s.UART_IIR_NO_INT
    assert uart.dev.rx_bytes == 2


def test_receive_has_priority_over_thre(uart):
    uart.enable_irq(s.UART_IER_ERBFI | s.UART_IER_ETBEI)
    uart.dev.enqueue_input(b"k")
    assert uart.inp(s.UART_IIR) == s.UART_IIR_RDI
    uart.inp(s.UART_RBR)
    assert uart.inp(s.UART_IIR) == s.UART_IIR_THRI


def test_rbr_empty_reads_zero(uart):
    assert uart.inp(s.UART_RBR) == 0
    assert uart.dev.rx_bytes == 0


def test_input_queue_is_bounded(uart):
    assert uart.dev.enqueue_input(b"a" * (RX_QUEUE_LIMIT - 1)) == RX_QUEUE_LIMIT - 1
    assert uart.dev.enqueue_input(b"bcd") == 1
    assert uart.dev.rx_dropped == 2
    assert uart.dev.pending_input == RX_QUEUE_LIMIT
    for _ in range(RX_QUEUE_LIMIT - 1):
        assert uart.inp(s.UART_RBR) == ord("a")
    assert uart.inp(s.UART_RBR) == ord("b")
    assert uart.dev.pending_input == 0


def test_input_order_survives_compaction(uart):
    uart.dev.enqueue_input(bytes(range(100)))
    got = [uart.inp(s.UART_RBR) for _ in range(60)]
    uart.dev.enqueue_input(bytes(range(100, 200)))
    while uart.inp(s.UART_LSR) & s.UART_LSR_DR:
        got.append(uart.inp(s.UART_RBR))
    assert got == list(range(200))


def test_fifo_clear_drops_queued_input(uart):
    uart.dev.enqueue_input(b"typed early")
    uart.out(s.UART_FCR, s.UART_FCR_ENABLE_FIFO | s.UART_FCR_CLEAR_RCVR)
    assert not uart.inp(s.UART_LSR) & s.UART_LSR_DR
    assert uart.dev.rx_dropped == len(b"typed early")


def test_loopback_overrun_sets_oe_and_line_status_interrupt(uart):
    uart.dev.enqueue_input(b"z" * RX_QUEUE_LIMIT)
    uart.out(s.UART_IER, s.UART_IER_ELSI)
    uart.out(s.UART_MCR, s.UART_MCR_LOOP)
    uart.out(s.UART_THR, 1)
    assert uart.inp(s.UART_IIR) == s.UART_IIR_RLSI
    assert uart.inp(s.UART_LSR) & s.UART_LSR_OE
    assert not uart.inp(s.UART_LSR) & s.UART_LSR_OE  # cleared by the read


def test_wide_access_splits_into_byte_registers(uart):
    uart.dev.write(s.UART_SCR - 1, 2, 0x7700)  # MSR (read-only) then SCR
    assert uart.inp(s.UART_SCR) == 0x77
    assert uart.dev.read(s.UART_SCR, 2) == 0xFF77  # past the last register floats high


def test_on_the_port_bus():
    uart = Uart()
    bus = Bus("pio")
    bus.register(SERIAL_COM1_PORT, s.UART_NR_PORTS, uart.dev)
    bus.write(SERIAL_COM1_PORT + s.UART_THR, 1, ord("\n"))
    assert uart.output == b"\n"
    assert bus.read(SERIAL_COM1_PORT + s.UART_LSR, 1) & s.UART_LSR_THRE


def test_concurrent_writers_lose_no_bytes():
    uart = Uart()
    per_thread = 2000

    def writer(ch):
        for _ in range(per_thread):
            uart.out(s.UART_THR, ch)

    threads = [threading.Thread(target=writer, args=(c,)) for c in b"abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uart.dev.flush()
    out = uart.output
    assert len(out) == 4 * per_thread
    assert all(out.count(c) == per_thread for c in b"abcd")
