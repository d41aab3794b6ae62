"""ACPI tables for a voidbox guest: RSDP, XSDT, FADT (hardware-reduced), MADT, DSDT.

Debian's kernels find virtio-mmio devices only through ACPI (DSDT devices with _HID
"LNRO0005") and, with more than one vCPU, read the CPUs from the MADT. This module
builds those tables as bytes at fixed guest-physical addresses; `AcpiTables.write`
copies them into guest RAM. References are to ACPI 6.5.

    base (layout.ACPI_ADDR, in the 0xE0000-0xFFFFF range Linux scans for the RSDP)
      RSDP   revision 2, points at the XSDT (no RSDT)
      DSDT   \\_S5_, \\_SB_.COM1 (PNP0501), \\_SB_.VRnn (LNRO0005) per virtio-mmio device
      FACP   FADT revision 6.5, HW_REDUCED_ACPI
      APIC   MADT
      XSDT   FACP, APIC (the DSDT is reached through the FADT)

Decisions, and why:

- Hardware-reduced ACPI (§4.1): no PM1/GPE register blocks, no SCI handler, no FACS.
  Poweroff goes through SLEEP_CONTROL_REG (§4.8.3.7), an 8-bit System I/O register at
  ACPI_SLEEP_CONTROL_PORT. For S5 the guest (ACPICA acpi_hw_extended_sleep) first writes
  WAK_STS (0x80) to SLEEP_STATUS_REG (ACPI_SLEEP_STATUS_PORT), then
  `(SLP_TYP << 2) | SLP_EN` to SLEEP_CONTROL_REG with SLP_TYP taken from \\_S5_[0]:
  `SLEEP_CONTROL_S5_VALUE` == 0x34. Under HW_REDUCED_ACPI Linux also uses neither the
  PIT nor the 8259s (acpi_generic_reduced_hw_init sets legacy_pic = null_legacy_pic), so
  ISA IRQs are not identity-mapped: COM1 gets its IRQ 4 only from its DSDT _CRS.
- Reset: RESET_REG_SUP with RESET_REG = System I/O port 0x64 (i8042 command), value 0xFE,
  the reset voidbox already handles. Caveat: on a hardware-reduced platform x86 Linux's
  default reboot order skips both ACPI and the keyboard controller (reboot_init picks
  BOOT_EFI when acpi_gbl_reduced_hardware; without EFI it falls through CF9 to a triple
  fault). The command line must say `reboot=acpi` (one write to 0x64 through RESET_REG,
  checked under QEMU) or `reboot=k` (polls the i8042 status port, then the same write).
- IAPC_BOOT_ARCH (§5.2.9.3): LEGACY_DEVICES (COM1 is an ISA-style device), VGA Not
  Present, MSI Not Supported (no PCI: virtio-mmio interrupts are IOAPIC pins), CMOS RTC
  Not Present (voidbox emulates no RTC). The 8042 bit is clear: voidbox's i8042 only
  implements reset, and a clear bit (with no PNP0303 device) keeps Linux's i8042 driver
  from probing it port by port.
- SCI_INT = ACPI_SCI_IRQ. OSPM ignores it on hardware-reduced platforms (§5.2.9) and
  Linux installs no SCI handler there, but an OS that does wire the SCI would default it
  to level/active-low, which KVM's IOAPIC (active-high lines) sees as permanently
  asserted. The MADT therefore overrides ISA IRQ 9 to GSI 9 level-triggered active-high,
  and IRQ 9 is not available to devices.
- ISA IRQ 0 (the in-kernel PIT): KVM's default GSI routing sends GSI 0 to IOAPIC pin 0,
  so by default the MADT has no IRQ0 override (identity). A VMM that routes GSI 0 to
  pin 2 with KVM_SET_GSI_ROUTING (as QEMU and kvmtool do) passes `irq0_gsi=2`.
- virtio-mmio interrupts: Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive).
  voidbox signals them through irqfds, which pulse the GSI (assert then deassert); a
  level-triggered pin would need a resample eventfd to be lowered on EOI. The driver
  re-reads InterruptStatus on each interrupt, so edges lose nothing. QEMU microvm and
  Firecracker make the same choice.
- COM1 (PNP0501, IO 0x3F8/8, IRQNoFlags {4}): see the hardware-reduced note above.
- MADT flags PCAT_COMPAT: KVM's in-kernel irqchip does contain the dual 8259s.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .. import layout
from .._records import dataclass
from ..errors import UsageError
from . import aml

# --- identity ------------------------------------------------------------------------

OEM_ID = b"VOIDBX"
OEM_TABLE_ID = b"VOIDBOX "
OEM_REVISION = 1
CREATOR_ID = b"VOID"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR_IDENTITY = b"VOIDBOX "  # FADT offset 268, 8 bytes (§5.2.9)

# --- generic table layout (§5.2.6) -----------------------------------------------------

SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # signature .. creator revision, 36 bytes
SDT_CHECKSUM_OFFSET = 9
TABLE_ALIGN = 16

# --- RSDP (§5.2.5.3) -------------------------------------------------------------------

RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has Length, XsdtAddress and the extended checksum
RSDP = struct.Struct("<8sB6sBIIQB3s")  # 36 bytes
RSDP_V1_LENGTH = 20  # bytes covered by the first checksum
RSDP_CHECKSUM_OFFSET = 8
RSDP_EXTENDED_CHECKSUM_OFFSET = 32
RSDP_ALIGN = 16  # the legacy scan looks at 16-byte boundaries (§5.2.5.1)

# --- XSDT (§5.2.8) ---------------------------------------------------------------------

XSDT_REVISION = 1
XSDT_ENTRY = struct.Struct("<Q")

# --- Generic Address Structure (§5.2.3.2) ----------------------------------------------

GAS = struct.Struct("<BBBBQ")  # space id, bit width, bit offset, access size, address
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# --- FADT (§5.2.9, Table 5.9) ----------------------------------------------------------

FADT_SIGNATURE = b"FACP"
FADT_REVISION = 6
FADT_MINOR_VERSION = 5  # ACPI 6.5
FADT_LENGTH = 276
FADT_DSDT_OFFSET = 40
FADT_PREFERRED_PM_PROFILE_OFFSET = 45
FADT_SCI_INT_OFFSET = 46
FADT_IAPC_BOOT_ARCH_OFFSET = 109
FADT_FLAGS_OFFSET = 112
FADT_RESET_REG_OFFSET = 116
FADT_RESET_VALUE_OFFSET = 128
FADT_MINOR_VERSION_OFFSET = 131
FADT_X_DSDT_OFFSET = 140
FADT_SLEEP_CONTROL_REG_OFFSET = 244
FADT_SLEEP_STATUS_REG_OFFSET = 256
FADT_HYPERVISOR_VENDOR_IDENTITY_OFFSET = 268

PM_PROFILE_UNSPECIFIED = 0

# Fixed Feature Flags (§5.2.9, Table 5.10).
FADT_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
FADT_FLAGS = FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI

# IA-PC Boot Architecture Flags (§5.2.9.3, Table 5.11).
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
IAPC_BOOT_ARCH = (
    IAPC_LEGACY_DEVICES | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT
)

RESET_VALUE = 0xFE  # i8042 command "pulse output line 0": CPU reset
SLEEP_REG_BIT_WIDTH = 8  # §4.8.3.7: both sleep registers are 8 bits

# Sleep control register fields (§4.8.3.7, Table 4.19), as ACPICA writes them.
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 5
WAK_STS = 1 << 7  # sleep status register: written (write-1-to-clear) before sleeping
S5_SLP_TYP = 5  # the value \_S5_ hands to SLP_TYP; any 3-bit value works if both agree
SLEEP_CONTROL_S5_VALUE = (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN  # 0x34

# --- MADT (§5.2.12) --------------------------------------------------------------------

MADT_SIGNATURE = b"APIC"
MADT_REVISION = 5  # ACPI 6.3+ layout (defines Online Capable)
MADT_HEADER = struct.Struct("<II")  # Local Interrupt Controller Address, Flags
MADT_PCAT_COMPAT = 1 << 0

MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
MADT_TYPE_INTERRUPT_OVERRIDE = 2
MADT_TYPE_LOCAL_APIC_NMI = 4
MADT_LOCAL_APIC = struct.Struct("<BBBBI")  # type, length, ACPI processor UID, APIC ID, flags
MADT_IO_APIC = struct.Struct("<BBBBII")  # type, length, id, reserved, address, GSI base
MADT_INTERRUPT_OVERRIDE = struct.Struct("<BBBBIH")  # type, length, bus, source, GSI, flags
MADT_LOCAL_APIC_NMI = struct.Struct("<BBBHB")  # type, length, processor UID, flags, LINT#
MADT_LOCAL_APIC_ENABLED = 1 << 0
MADT_ISA_BUS = 0
MADT_ALL_PROCESSORS = 0xFF  # Local APIC NMI: applies to every processor
NMI_LINT = 1  # LINT1 carries NMI (Linux warns otherwise)

# MPS INTI flags (§5.2.12.5, Table 5.26).
MPS_INTI_CONFORMS = 0
MPS_INTI_POLARITY_ACTIVE_HIGH = 0b01
MPS_INTI_TRIGGER_LEVEL = 0b11 << 2
SCI_INTI_FLAGS = MPS_INTI_POLARITY_ACTIVE_HIGH | MPS_INTI_TRIGGER_LEVEL

IOAPIC_NUM_PINS = 24  # KVM's in-kernel IOAPIC (KVM_IOAPIC_NUM_PINS)
ISA_IRQ_PIT = 0
ISA_IRQ_CASCADE = 2  # the slave 8259's cascade input on the master: never a device IRQ
# GSIs no device may use. IRQ 2 stays free whatever `irq0_gsi` says: it is the PIT's pin
# when GSI 0 is routed to pin 2, and the master 8259's cascade input otherwise.
RESERVED_IRQS = {
    ISA_IRQ_PIT: "the PIT",
    ISA_IRQ_CASCADE: "the PIT or the 8259 cascade",
    layout.SERIAL_COM1_IRQ: "COM1",
    layout.ACPI_SCI_IRQ: "the ACPI SCI",
}
VIRTIO_MMIO_IRQS = tuple(
    irq for irq in range(layout.VIRTIO_MMIO_FIRST_IRQ, IOAPIC_NUM_PINS) if irq not in RESERVED_IRQS
)
"""The GSIs virtio-mmio devices may take, in allocation order (5-8, then 10-23)."""
# xAPIC IDs are 8 bits and 0xFF is the broadcast ID; the IO APIC takes ID `cpus`.
MAX_CPUS = 254

# --- DSDT (§5.2.11.1) ------------------------------------------------------------------

DSDT_SIGNATURE = b"DSDT"
DSDT_REVISION = 2  # 2 and above: AML integers are 64 bits
VIRTIO_MMIO_HID = "LNRO0005"  # Linux drivers/virtio/virtio_mmio.c acpi_device_id
COM1_HID = "PNP0501"  # 16550A-compatible UART
COM1_PORT_COUNT = 8
CACHE_COHERENT = 1  # _CCA (§6.2.17): DMA is cache-coherent


@dataclass(frozen=True)
class VirtioMmioDevice:
    """A virtio-mmio device as the DSDT describes it: register window and GSI."""

    base: int
    size: int
    irq: int


@dataclass
class AcpiTables:
    """The built tables: where the RSDP is and each table's bytes at its address."""

    rsdp_addr: int
    blobs: list[tuple[int, bytes]]

    def write(self, memory) -> None:
        """Copy every table into guest memory (anything with `write(gpa, data)`)."""
        for addr, data in self.blobs:
            memory.write(addr, data)

    def table(self, signature: bytes) -> tuple[int, bytes]:
        """(address, bytes) of the table with this signature ("RSD PTR " for the RSDP)."""
        for addr, data in self.blobs:
            if data.startswith(signature):
                return addr, data
        raise KeyError(signature)


# --- helpers ---------------------------------------------------------------------------


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with this byte in place of a zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (§5.2.6), `body`, checksum set."""
    table = bytearray(
        SDT_HEADER.pack(
            signature,
            SDT_HEADER.size + len(body),
            revision,
            0,
            OEM_ID,
            OEM_TABLE_ID,
            OEM_REVISION,
            CREATOR_ID,
            CREATOR_REVISION,
        )
        + body
    )
    table[SDT_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def gas_io(port: int, bit_width: int = 8) -> bytes:
    """A Generic Address Structure for a System I/O register of `bit_width` bits."""
    return GAS.pack(GAS_SYSTEM_IO, bit_width, 0, GAS_ACCESS_BYTE, port)


# --- tables ----------------------------------------------------------------------------


def build_rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 (§5.2.5.3): both checksums, RsdtAddress 0, XsdtAddress set."""
    rsdp = bytearray(
        RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP.size, xsdt_addr, 0, b"\0" * 3)
    )
    rsdp[RSDP_CHECKSUM_OFFSET] = checksum(rsdp[:RSDP_V1_LENGTH])
    rsdp[RSDP_EXTENDED_CHECKSUM_OFFSET] = checksum(rsdp)
    return bytes(rsdp)


def build_xsdt(entries: Sequence[int]) -> bytes:
    """XSDT (§5.2.8): 64-bit addresses of the other description tables."""
    return sdt(b"XSDT", XSDT_REVISION, b"".join(XSDT_ENTRY.pack(e) for e in entries))


def build_fadt(dsdt_addr: int) -> bytes:
    """FADT revision 6.5 for a hardware-reduced platform (§5.2.9); see the module notes."""
    body = bytearray(FADT_LENGTH - SDT_HEADER.size)

    def put(fmt: str, offset: int, *values) -> None:
        struct.pack_into(fmt, body, offset - SDT_HEADER.size, *values)

    # The 32-bit DSDT field and X_DSDT agree, so a reader of either finds the same table.
    put("<I", FADT_DSDT_OFFSET, dsdt_addr)
    put("<B", FADT_PREFERRED_PM_PROFILE_OFFSET, PM_PROFILE_UNSPECIFIED)
    put("<H", FADT_SCI_INT_OFFSET, layout.ACPI_SCI_IRQ)
    put("<H", FADT_IAPC_BOOT_ARCH_OFFSET, IAPC_BOOT_ARCH)
    put("<I", FADT_FLAGS_OFFSET, FADT_FLAGS)
    put("<12s", FADT_RESET_REG_OFFSET, gas_io(layout.I8042_COMMAND_PORT))
    put("<B", FADT_RESET_VALUE_OFFSET, RESET_VALUE)
    put("<B", FADT_MINOR_VERSION_OFFSET, FADT_MINOR_VERSION)
    put("<Q", FADT_X_DSDT_OFFSET, dsdt_addr)
    put(
        "<12s",
        FADT_SLEEP_CONTROL_REG_OFFSET,
        gas_io(layout.ACPI_SLEEP_CONTROL_PORT, SLEEP_REG_BIT_WIDTH),
    )
    put(
        "<12s",
        FADT_SLEEP_STATUS_REG_OFFSET,
        gas_io(layout.ACPI_SLEEP_STATUS_PORT, SLEEP_REG_BIT_WIDTH),
    )
    put("<8s", FADT_HYPERVISOR_VENDOR_IDENTITY_OFFSET, HYPERVISOR_VENDOR_IDENTITY)
    return sdt(FADT_SIGNATURE, FADT_REVISION, bytes(body))


def build_madt(cpus: int, irq0_gsi: int = ISA_IRQ_PIT) -> bytes:
    """MADT (§5.2.12): one enabled Local APIC per vCPU, the IO APIC, overrides, NMI."""
    entries = [
        MADT_LOCAL_APIC.pack(
            MADT_TYPE_LOCAL_APIC, MADT_LOCAL_APIC.size, cpu, cpu, MADT_LOCAL_APIC_ENABLED
        )
        for cpu in range(cpus)
    ]
    # The IO APIC's ID follows the CPUs' APIC IDs, as MP-table firmware does; Linux on
    # x86_64 uses it only as a label.
    entries.append(
        MADT_IO_APIC.pack(MADT_TYPE_IO_APIC, MADT_IO_APIC.size, cpus, 0, layout.IOAPIC_ADDR, 0)
    )
    if irq0_gsi != ISA_IRQ_PIT:
        entries.append(
            MADT_INTERRUPT_OVERRIDE.pack(
                MADT_TYPE_INTERRUPT_OVERRIDE,
                MADT_INTERRUPT_OVERRIDE.size,
                MADT_ISA_BUS,
                ISA_IRQ_PIT,
                irq0_gsi,
                MPS_INTI_CONFORMS,
            )
        )
    entries.append(
        MADT_INTERRUPT_OVERRIDE.pack(
            MADT_TYPE_INTERRUPT_OVERRIDE,
            MADT_INTERRUPT_OVERRIDE.size,
            MADT_ISA_BUS,
            layout.ACPI_SCI_IRQ,
            layout.ACPI_SCI_IRQ,
            SCI_INTI_FLAGS,
        )
    )
    entries.append(
        MADT_LOCAL_APIC_NMI.pack(
            MADT_TYPE_LOCAL_APIC_NMI,
            MADT_LOCAL_APIC_NMI.size,
            MADT_ALL_PROCESSORS,
            MPS_INTI_CONFORMS,
            NMI_LINT,
        )
    )
    body = MADT_HEADER.pack(layout.LAPIC_ADDR, MADT_PCAT_COMPAT) + b"".join(entries)
    return sdt(MADT_SIGNATURE, MADT_REVISION, body)


def virtio_device_name(index: int) -> str:
    """The DSDT name of the index-th virtio-mmio device: VR00, VR01, ..."""
    return f"VR{index:02d}"


def dsdt_aml(virtio_devices: Sequence[VirtioMmioDevice]) -> bytes:
    """The DSDT's AML: \\_S5_, and under \\_SB_ the UART and the virtio-mmio devices."""
    com1 = aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id(COM1_HID)),
        aml.name("_UID", 1),  # COM1 is conventionally UID 1 (QEMU, SeaBIOS)
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.io_port(layout.SERIAL_COM1_PORT, COM1_PORT_COUNT),
                aml.irq_no_flags(layout.SERIAL_COM1_IRQ),
            ),
        ),
    )
    virtio = [
        aml.device(
            virtio_device_name(index),
            aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
            aml.name("_UID", index),
            aml.name("_CCA", CACHE_COHERENT),
            aml.name(
                "_CRS",
                aml.resource_template(
                    aml.memory32_fixed(dev.base, dev.size),
                    aml.extended_interrupt(dev.irq, edge=True, active_low=False, shared=False),
                ),
            ),
        )
        for index, dev in enumerate(virtio_devices)
    ]
    # \_S5_: SLP_TYPa, SLP_TYPb, two reserved zeros (§7.4.2). Only SLP_TYPa reaches the
    # hardware-reduced sleep control register.
    s5 = aml.name("_S5_", aml.package(S5_SLP_TYP, S5_SLP_TYP, 0, 0))
    return s5 + aml.scope("\\_SB_", com1, *virtio)


def build_dsdt(virtio_devices: Sequence[VirtioMmioDevice]) -> bytes:
    return sdt(DSDT_SIGNATURE, DSDT_REVISION, dsdt_aml(virtio_devices))


# --- validation and assembly ---------------------------------------------------------


def _check_devices(virtio_devices: Sequence[VirtioMmioDevice]) -> None:
    used: dict[int, int] = {}
    windows: list[tuple[int, int]] = []
    for index, dev in enumerate(virtio_devices):
        if not 0 < dev.irq < IOAPIC_NUM_PINS:
            raise UsageError(
                f"virtio-mmio device {index}: IRQ {dev.irq} is not an IOAPIC pin "
                f"(1..{IOAPIC_NUM_PINS - 1})"
            )
        if dev.irq in RESERVED_IRQS:
            raise UsageError(
                f"virtio-mmio device {index}: IRQ {dev.irq} is taken by {RESERVED_IRQS[dev.irq]}"
            )
        if dev.irq in used:
            raise UsageError(f"virtio-mmio devices {used[dev.irq]} and {index} share IRQ {dev.irq}")
        used[dev.irq] = index
        if dev.size <= 0 or dev.base < 0 or dev.base + dev.size > 1 << 32:
            raise UsageError(
                f"virtio-mmio device {index}: window {dev.base:#x}+{dev.size:#x} "
                "is not a non-empty range below 4 GiB"
            )
        for other, (start, end) in enumerate(windows):
            if dev.base < end and start < dev.base + dev.size:
                raise UsageError(f"virtio-mmio devices {other} and {index} overlap")
        windows.append((dev.base, dev.base + dev.size))


def build_acpi_tables(
    cpus: int,
    virtio_devices: Sequence[VirtioMmioDevice] = (),
    base: int = layout.ACPI_ADDR,
    *,
    irq0_gsi: int = ISA_IRQ_PIT,
) -> AcpiTables:
    """Build RSDP, XSDT, FADT, MADT and DSDT laid out from `base` (the RSDP's address).

    `irq0_gsi` is the IOAPIC input the PIT's ISA IRQ 0 reaches: 0 under KVM's default
    GSI routing (no override entry), 2 if the VMM routed GSI 0 to pin 2.
    """
    if not 1 <= cpus <= MAX_CPUS:
        raise UsageError(f"the MADT describes 1..{MAX_CPUS} vCPUs, not {cpus}")
    if irq0_gsi not in (ISA_IRQ_PIT, ISA_IRQ_CASCADE):
        raise ValueError(f"irq0_gsi must be {ISA_IRQ_PIT} or {ISA_IRQ_CASCADE}, not {irq0_gsi}")
    if base % RSDP_ALIGN or not layout.ACPI_ADDR <= base < layout.ACPI_END:
        raise ValueError(
            f"ACPI base {base:#x} must be {RSDP_ALIGN}-byte aligned and inside "
            f"[{layout.ACPI_ADDR:#x}, {layout.ACPI_END:#x})"
        )
    virtio_devices = tuple(virtio_devices)
    _check_devices(virtio_devices)

    cursor = _align(base + RSDP.size, TABLE_ALIGN)
    blobs: list[tuple[int, bytes]] = []

    def place(data: bytes) -> int:
        nonlocal cursor
        addr = cursor
        blobs.append((addr, data))
        cursor = _align(addr + len(data), TABLE_ALIGN)
        return addr

    dsdt_addr = place(build_dsdt(virtio_devices))
    fadt_addr = place(build_fadt(dsdt_addr))
    madt_addr = place(build_madt(cpus, irq0_gsi))
    xsdt_addr = place(build_xsdt([fadt_addr, madt_addr]))
    blobs.insert(0, (base, build_rsdp(xsdt_addr)))

    last_addr, last = blobs[-1]
    if last_addr + len(last) > layout.ACPI_END:
        raise UsageError(
            f"ACPI tables end at {last_addr + len(last):#x}, past {layout.ACPI_END:#x}"
        )
    return AcpiTables(rsdp_addr=base, blobs=blobs)
