"""A 16550A-compatible UART (COM1) for the guest's serial console.

Register file as in the National Semiconductor / TI PC16550D datasheet, "Table II.
Summary of Accessible Registers"; the behaviour Linux relies on is the one
drivers/tty/serial/8250/8250_port.c probes in autoconfig() and serial8250_startup():

- IER keeps only its low four bits (bits 4-7 read 0 on a 16550A, the "UUE" probe);
- FCR bit 0 turns IIR bits 6-7 on (0b11 identifies a 16550A with a 16-byte FIFO);
- loopback (MCR.LOOP) routes THR to RBR and MCR's outputs to MSR's inputs
  (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD), which autoconfig checks for 0x90;
- the THRE interrupt is re-asserted whenever ETBEI goes from 0 to 1 while the
  transmitter is empty (the UART_BUG_THRE test), and after every transmitted byte.

Output is immediate, so THR is always empty: LSR.THRE and LSR.TEMT always read 1.
A write to THR clears the THRE interrupt and raises it again once the byte is sent
(as QEMU's hw/char/serial.c does), so an edge-triggered IOAPIC pin sees a new
edge for every byte; without it Linux's interrupt-driven writer stalls after one
FIFO's worth of output.

Interrupt line: level semantics through `irq(level)`, called only when the level
changes. As on PC mainboards, the UART's INTR pin reaches the interrupt controller
only through the OUT2-driven buffer, so the line is low while MCR.OUT2 is clear, and
also in loopback mode, where the 16550 forces its OUT2 pin inactive.

Guest output is handed to `output` in batches: at a newline, when 256 bytes are
pending, when the guest writes IER (Linux ends both its console write and its
interrupt-driven transmit burst by rewriting IER), when it reads RBR or reads LSR
twice with no transmit in between (a polled writer reads LSR once per byte; a
second read means it is waiting for input, so a prompt must be visible), and on
`flush()`, which the VMM calls when the VM stops.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# Register offsets from the base port (PC16550D Table II). Several names share an
# offset; LCR.DLAB and the access direction select between them.
UART_RBR = 0  # receiver buffer (read, DLAB=0)
UART_THR = 0  # transmitter holding (write, DLAB=0)
UART_DLL = 0  # divisor latch LSB (DLAB=1)
UART_IER = 1  # interrupt enable (DLAB=0)
UART_DLM = 1  # divisor latch MSB (DLAB=1)
UART_IIR = 2  # interrupt identification (read)
UART_FCR = 2  # FIFO control (write)
UART_LCR = 3  # line control
UART_MCR = 4  # modem control
UART_LSR = 5  # line status
UART_MSR = 6  # modem status
UART_SCR = 7  # scratch
UART_NR_PORTS = 8

# IER bits
UART_IER_ERBFI = 0x01  # received data available
UART_IER_ETBEI = 0x02  # transmitter holding register empty
UART_IER_ELSI = 0x04  # receiver line status
UART_IER_EDSSI = 0x08  # modem status
UART_IER_MASK = 0x0F  # bits 4-7 are always 0 on a 16550A

# IIR values (bits 0-3); bits 6-7 mirror FCR's FIFO enable
UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_FIFO_ENABLED = 0xC0

# FCR bits
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04

# LCR bits
UART_LCR_DLAB = 0x80

# MCR bits
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
UART_MCR_MASK = 0x1F

# LSR bits
UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LSR_ERRORS = 0x1E  # OE | PE | FE | BI: cleared by reading LSR

# MSR bits
UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80
UART_MSR_DELTAS = 0x0F
# Outside loopback the "modem" is a connected host: carrier, data set ready, clear to send.
UART_MSR_CONNECTED = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS

# Divisor for 115200 baud from the PC's 1.8432 MHz clock (datasheet Table III)
DEFAULT_DIVISOR = 1

RX_QUEUE_LIMIT = 64 * 1024
"""Host keystrokes waiting for the guest; more than this is dropped and counted."""

TX_BATCH = 256
"""Pending guest output handed to `output` once this many bytes accumulate."""


class Serial8250:
    """COM1 as a 16550A; register it on the port bus at SERIAL_COM1_PORT, length 8."""

    def __init__(self, irq: Callable[[int], None], output: Callable[[bytes], None]):
        self._irq = irq
        self._output = output
        self._lock = threading.Lock()
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._lsr_errors = 0
        self._msr = UART_MSR_CONNECTED
        self._scr = 0
        self._fcr = 0
        self._divisor = DEFAULT_DIVISOR
        self._thri_pending = False
        # Received bytes: _rx[_rx_head:] is the queue; compacted lazily.
        self._rx = bytearray()
        self._rx_head = 0
        self._tx = bytearray()
        self._irq_level = 0
        self._lsr_polls = 0  # LSR reads since the last transmit
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.rx_dropped = 0
        self.irq_changes = 0

    # ----- host side -----

    def enqueue_input(self, data: bytes) -> int:
        """Queue host bytes for the guest to read; returns how many were accepted."""
        with self._lock:
            accepted = self._rx_push(data)
            self._update_irq()
        return accepted

    def flush(self) -> None:
        """Hand any pending guest output to `output` now."""
        with self._lock:
            self._flush_tx()

    @property
    def irq_level(self) -> int:
        return self._irq_level

    @property
    def pending_input(self) -> int:
        return len(self._rx) - self._rx_head

    # ----- bus device -----

    def read(self, offset: int, size: int) -> int:
        # The registers are byte-wide; a wider access reads consecutive registers
        # the way an ISA bus splits it into byte lanes.
        with self._lock:
            if size == 1 and offset < UART_NR_PORTS:  # every access Linux makes
                value = self._read_reg(offset)
                self._update_irq()
                return value
            value = 0
            for i in range(size):
                if offset + i < UART_NR_PORTS:
                    value |= self._read_reg(offset + i) << (8 * i)
                else:
                    value |= 0xFF << (8 * i)
            self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if size == 1 and offset < UART_NR_PORTS:
                self._write_reg(offset, value & 0xFF)
                self._update_irq()
                return
            for i in range(size):
                if offset + i < UART_NR_PORTS:
                    self._write_reg(offset + i, (value >> (8 * i)) & 0xFF)
            self._update_irq()

    # ----- registers (called with the lock held) -----

    def _read_reg(self, reg: int) -> int:
        dlab = self._lcr & UART_LCR_DLAB
        if reg == UART_RBR:
            if dlab:
                return self._divisor & 0xFF
            self._flush_tx()
            return self._rx_pop()
        if reg == UART_IER:
            if dlab:
                return (self._divisor >> 8) & 0xFF
            return self._ier
        if reg == UART_IIR:
            iir = self._iir()
            # Reading IIR while it reports THRI is one of the two ways to clear it
            # (the other is writing THR): PC16550D Table IV.
            if iir & 0x0F == UART_IIR_THRI:
                self._thri_pending = False
            if self._fcr & UART_FCR_ENABLE_FIFO:
                iir |= UART_IIR_FIFO_ENABLED
            return iir
        if reg == UART_LCR:
            return self._lcr
        if reg == UART_MCR:
            return self._mcr
        if reg == UART_LSR:
            lsr = UART_LSR_THRE | UART_LSR_TEMT | self._lsr_errors
            if self.pending_input:
                lsr |= UART_LSR_DR
            self._lsr_errors = 0
            self._lsr_polls += 1
            if self._lsr_polls > 1:
                self._flush_tx()
            return lsr
        if reg == UART_MSR:
            msr = self._msr
            self._msr &= ~UART_MSR_DELTAS
            return msr
        return self._scr  # UART_SCR

    def _write_reg(self, reg: int, value: int) -> None:
        dlab = self._lcr & UART_LCR_DLAB
        if reg == UART_THR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
                return
            self._transmit(value)
        elif reg == UART_IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
                return
            old = self._ier
            self._ier = value & UART_IER_MASK
            if self._ier & UART_IER_ETBEI:
                # THR is always empty, so enabling ETBEI asserts THRI at once.
                if not old & UART_IER_ETBEI:
                    self._thri_pending = True
            else:
                self._thri_pending = False
            self._flush_tx()
        elif reg == UART_FCR:
            self._fcr = value
            if value & UART_FCR_CLEAR_RCVR:
                self.rx_dropped += self.pending_input
                self._rx.clear()
                self._rx_head = 0
        elif reg == UART_LCR:
            self._lcr = value
        elif reg == UART_MCR:
            self._set_mcr(value & UART_MCR_MASK)
        elif reg == UART_LSR:
            pass  # read-only (factory test register on some parts)
        elif reg == UART_MSR:
            pass  # read-only
        else:
            self._scr = value

    def _transmit(self, byte: int) -> None:
        self._lsr_polls = 0
        self._thri_pending = False
        self._update_irq()
        if self._mcr & UART_MCR_LOOP:
            if not self._rx_push(bytes((byte,))):
                self._lsr_errors |= UART_LSR_OE
        else:
            self._tx.append(byte)
            self.tx_bytes += 1
            if byte == 0x0A or len(self._tx) >= TX_BATCH:
                self._flush_tx()
        if self._ier & UART_IER_ETBEI:
            self._thri_pending = True

    def _set_mcr(self, mcr: int) -> None:
        old = self._mcr
        self._mcr = mcr
        if mcr & UART_MCR_LOOP:
            msr = 0
            if mcr & UART_MCR_RTS:
                msr |= UART_MSR_CTS
            if mcr & UART_MCR_DTR:
                msr |= UART_MSR_DSR
            if mcr & UART_MCR_OUT1:
                msr |= UART_MSR_RI
            if mcr & UART_MCR_OUT2:
                msr |= UART_MSR_DCD
        else:
            msr = UART_MSR_CONNECTED
        if (old ^ mcr) & UART_MCR_LOOP or mcr & UART_MCR_LOOP:
            self._set_msr(msr)

    def _set_msr(self, msr: int) -> None:
        old = self._msr
        deltas = old & UART_MSR_DELTAS
        changed = old ^ msr
        if changed & UART_MSR_CTS:
            deltas |= UART_MSR_DCTS
        if changed & UART_MSR_DSR:
            deltas |= UART_MSR_DDSR
        if changed & UART_MSR_DCD:
            deltas |= UART_MSR_DDCD
        # TERI reports the trailing edge of RI only (RI going inactive).
        if old & UART_MSR_RI and not msr & UART_MSR_RI:
            deltas |= UART_MSR_TERI
        self._msr = msr | deltas

    def _iir(self) -> int:
        """Highest-priority pending interrupt (PC16550D Table IV)."""
        if self._ier & UART_IER_ELSI and self._lsr_errors:
            return UART_IIR_RLSI
        if self._ier & UART_IER_ERBFI and self.pending_input:
            return UART_IIR_RDI
        if self._ier & UART_IER_ETBEI and self._thri_pending:
            return UART_IIR_THRI
        if self._ier & UART_IER_EDSSI and self._msr & UART_MSR_DELTAS:
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        level = int(
            self._iir() != UART_IIR_NO_INT
            and bool(self._mcr & UART_MCR_OUT2)
            and not self._mcr & UART_MCR_LOOP
        )
        if level != self._irq_level:
            self._irq_level = level
            self.irq_changes += 1
            self._irq(level)

    def _rx_push(self, data: bytes) -> int:
        room = RX_QUEUE_LIMIT - self.pending_input
        accepted = min(room, len(data))
        if accepted < len(data):
            self.rx_dropped += len(data) - accepted
        if accepted:
            if self._rx_head and self._rx_head >= len(self._rx) // 2:
                del self._rx[: self._rx_head]
                self._rx_head = 0
            self._rx += data[:accepted]
        return accepted

    def _rx_pop(self) -> int:
        if self._rx_head >= len(self._rx):
            return 0
        byte = self._rx[self._rx_head]
        self._rx_head += 1
        self.rx_bytes += 1
        if self._rx_head == len(self._rx):
            self._rx.clear()
            self._rx_head = 0
        return byte

    def _flush_tx(self) -> None:
        if self._tx:
            data = bytes(self._tx)
            self._tx.clear()
            self._output(data)
