"""ACPI tables: parsed back at the spec's offsets, then checked by iasl and acpiexec.

Offsets below are written from ACPI 6.5 (§5.2.5.3 RSDP, §5.2.6 header, §5.2.9 FADT
Table 5.9, §5.2.12 MADT), not taken from voidbox.boot.acpi, so a wrong constant there
shows up here.
"""

import re
import shutil
import struct
import subprocess

import pytest

from tests.default_guest import require_default_guest
from tests.requires import requires
from voidbox import layout
from voidbox.boot import acpi
from voidbox.boot.acpi import VirtioMmioDevice, build_acpi_tables
from voidbox.errors import UsageError
from voidbox.memory import GuestMemory

needs_iasl = requires(
    shutil.which("iasl") is not None, "needs iasl (acpica-tools) to disassemble the tables"
)
needs_acpiexec = requires(
    shutil.which("acpiexec") is not None, "needs acpiexec (acpica-tools) to run the DSDT"
)

CPU_COUNTS = [1, 2, 8]
DEVICE_COUNTS = [0, 1, 3]


def devices(n: int) -> list[VirtioMmioDevice]:
    return [
        VirtioMmioDevice(
            layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE,
            layout.VIRTIO_MMIO_SIZE,
            acpi.VIRTIO_MMIO_IRQS[i],
        )
        for i in range(n)
    ]


@pytest.fixture(
    params=[(c, d) for c in CPU_COUNTS for d in DEVICE_COUNTS],
    ids=lambda p: f"cpus{p[0]}-dev{p[1]}",
)
def config(request):
    cpus, ndev = request.param
    devs = devices(ndev)
    return cpus, devs, build_acpi_tables(cpus, devs)


def header(table: bytes) -> dict:
    sig, length, rev, csum, oem, oem_table, oem_rev, creator, creator_rev = struct.unpack_from(
        "<4sIBB6s8sI4sI", table
    )
    return dict(signature=sig, length=length, revision=rev, oem_id=oem, oem_table_id=oem_table)


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    """(type, bytes) of each interrupt controller structure, walk bounded by the length."""
    entries = []
    offset = 44
    length = struct.unpack_from("<I", madt, 4)[0]
    while offset < length:
        etype, elen = madt[offset], madt[offset + 1]
        assert elen >= 2 and offset + elen <= length, f"bad MADT entry at {offset}"
        entries.append((etype, madt[offset : offset + elen]))
        offset += elen
    assert offset == length
    return entries


# --- layout and checksums ----------------------------------------------------------------


def test_every_table_sums_to_zero(config):
    _, _, tables = config
    for addr, data in tables.blobs:
        if data.startswith(b"RSD PTR "):
            assert sum(data[:20]) % 256 == 0, "RSDP checksum (first 20 bytes)"
            assert sum(data) % 256 == 0, "RSDP extended checksum (36 bytes)"
        else:
            assert sum(data) % 256 == 0, f"{data[:4]!r} at {addr:#x}"
            assert header(data)["length"] == len(data)


def test_tables_fit_the_acpi_window_without_overlap(config):
    _, _, tables = config
    spans = sorted((addr, addr + len(data)) for addr, data in tables.blobs)
    for start, end in spans:
        assert layout.ACPI_ADDR <= start < end <= layout.ACPI_END
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start
    assert [data[:4] for _, data in tables.blobs].count(b"DSDT") == 1


def test_rsdp_fields(config):
    _, _, tables = config
    addr, rsdp = tables.table(b"RSD PTR ")
    assert addr == tables.rsdp_addr == layout.ACPI_ADDR
    assert addr % 16 == 0 and 0xE0000 <= addr <= 0xFFFFF - 36  # Linux's legacy scan range
    sig, _, oem, rev, rsdt, length, xsdt, _, reserved = struct.unpack("<8sB6sBIIQB3s", rsdp)
    assert (sig, oem, rev, rsdt, length, reserved) == (b"RSD PTR ", b"VOIDBX", 2, 0, 36, b"\0\0\0")
    assert tables.table(b"XSDT")[0] == xsdt


def test_xsdt_lists_facp_and_apic(config):
    _, _, tables = config
    _, xsdt = tables.table(b"XSDT")
    h = header(xsdt)
    assert (h["revision"], h["oem_id"], h["oem_table_id"]) == (1, b"VOIDBX", b"VOIDBOX ")
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert entries == (tables.table(b"FACP")[0], tables.table(b"APIC")[0])


def test_fadt_fields(config):
    _, _, tables = config
    _, fadt = tables.table(b"FACP")
    h = header(fadt)
    assert (h["length"], h["revision"], fadt[131]) == (276, 6, 5)  # FADT 6.5
    dsdt_addr = tables.table(b"DSDT")[0]
    assert struct.unpack_from("<I", fadt, 40)[0] == dsdt_addr  # DSDT
    assert struct.unpack_from("<Q", fadt, 140)[0] == dsdt_addr  # X_DSDT
    assert struct.unpack_from("<I", fadt, 36)[0] == 0  # no FACS (hardware-reduced)
    assert struct.unpack_from("<H", fadt, 46)[0] == layout.ACPI_SCI_IRQ
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert flags & (1 << 10), "RESET_REG_SUP"
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert not boot_arch & (1 << 1), "8042 must be absent: the i8042 only resets"
    assert boot_arch & (1 << 2), "VGA Not Present"
    # Generic Address Structures: space 1 (System I/O), 8 bits, offset 0, byte access.
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, layout.I8042_COMMAND_PORT)
    assert fadt[128] == 0xFE  # RESET_VALUE
    assert struct.unpack_from("<BBBBQ", fadt, 244) == (1, 8, 0, 1, layout.ACPI_SLEEP_CONTROL_PORT)
    assert struct.unpack_from("<BBBBQ", fadt, 256) == (1, 8, 0, 1, layout.ACPI_SLEEP_STATUS_PORT)
    assert fadt[268:276] == b"VOIDBOX "  # Hypervisor Vendor Identity
    # Hardware-reduced: every PM1/GPE/PM timer block, legacy and extended, is absent.
    assert fadt[56:88] == bytes(32)
    assert fadt[148:244] == bytes(96)


def test_madt_entries(config):
    cpus, _, tables = config
    _, madt = tables.table(b"APIC")
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 1)  # PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for t, e in entries if t == 0]
    assert [(uid, apic_id, flags) for _, length, uid, apic_id, flags in lapics] == [
        (cpu, cpu, 1) for cpu in range(cpus)
    ]
    assert all(length == 8 for _, length, *_ in lapics)
    ioapics = [struct.unpack("<BBBBII", e) for t, e in entries if t == 1]
    assert ioapics == [(1, 12, cpus, 0, layout.IOAPIC_ADDR, 0)]
    overrides = {
        src: (gsi, flags)
        for _, _, bus, src, gsi, flags in (
            struct.unpack("<BBBBIH", e) for t, e in entries if t == 2
        )
        if bus == 0
    }
    # SCI: level-triggered (0b11 << 2), active-high (0b01). No IRQ0 override by default:
    # KVM's default routing puts the PIT's GSI 0 on IOAPIC pin 0.
    assert overrides == {layout.ACPI_SCI_IRQ: (layout.ACPI_SCI_IRQ, 0x0D)}
    nmis = [struct.unpack("<BBBHB", e) for t, e in entries if t == 4]
    assert nmis == [(4, 6, 0xFF, 0, 1)]  # all processors, LINT1


def test_madt_irq0_override_when_gsi0_is_routed_to_pin2():
    tables = build_acpi_tables(2, devices(1), irq0_gsi=2)
    _, madt = tables.table(b"APIC")
    overrides = [struct.unpack("<BBBBIH", e) for t, e in madt_entries(madt) if t == 2]
    assert (2, 10, 0, 0, 2, 0) in overrides  # ISA IRQ 0 -> GSI 2, conforming
    assert sum(madt) % 256 == 0


def test_s5_package_and_sleep_value():
    _, dsdt = build_acpi_tables(1).table(b"DSDT")
    # Name(_S5_, Package(4) {5, 5, 0, 0}) is the first term of the DSDT.
    at = dsdt.index(b"\x08_S5_\x12")
    assert dsdt[at + 6 :][:8] == bytes.fromhex("08040a050a050000")
    slp_typ = dsdt[at + 9]  # after NameOp, NameSeg, PackageOp, PkgLength, NumElements, BytePrefix
    assert acpi.SLEEP_CONTROL_S5_VALUE == (slp_typ << 2) | (1 << 5) == 0x34


def test_write_lets_a_guest_find_everything_by_scanning():
    """Find the RSDP as Linux's legacy scan does, then follow the pointers in memory."""
    tables = build_acpi_tables(2, devices(2))
    memory = GuestMemory(layout.MIN_MEM)
    try:
        tables.write(memory)
        area = memory.read(0xE0000, 0x20000)
        hits = [
            off
            for off in range(0, len(area) - 36, 16)
            if area[off : off + 8] == b"RSD PTR " and sum(area[off : off + 20]) % 256 == 0
        ]
        assert [0xE0000 + h for h in hits] == [tables.rsdp_addr]
        xsdt_addr = struct.unpack_from("<Q", memory.read(tables.rsdp_addr, 36), 24)[0]
        xsdt_len = struct.unpack_from("<I", memory.read(xsdt_addr, 8), 4)[0]
        xsdt = memory.read(xsdt_addr, xsdt_len)
        sigs = {}
        for entry in struct.unpack_from("<2Q", xsdt, 36):
            length = struct.unpack_from("<I", memory.read(entry, 8), 4)[0]
            sigs[memory.read(entry, 4)] = memory.read(entry, length)
        assert set(sigs) == {b"FACP", b"APIC"}
        dsdt_addr = struct.unpack_from("<Q", sigs[b"FACP"], 140)[0]
        assert memory.read(dsdt_addr, 4) == b"DSDT"
        assert memory.read(dsdt_addr, len(tables.table(b"DSDT")[1])) == tables.table(b"DSDT")[1]
    finally:
        memory.close()


def test_max_cpus_fits():
    tables = build_acpi_tables(acpi.MAX_CPUS, devices(3))
    _, madt = tables.table(b"APIC")
    assert sum(1 for t, _ in madt_entries(madt) if t == 0) == acpi.MAX_CPUS


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("cpus", [0, -1, acpi.MAX_CPUS + 1])
def test_rejects_bad_cpu_counts(cpus):
    with pytest.raises(UsageError):
        build_acpi_tables(cpus)


@pytest.mark.parametrize(
    "devs",
    [
        [VirtioMmioDevice(0xD000_0000, 0x1000, 0)],  # the PIT
        [VirtioMmioDevice(0xD000_0000, 0x1000, 2)],  # cascade / routed PIT
        [VirtioMmioDevice(0xD000_0000, 0x1000, layout.SERIAL_COM1_IRQ)],
        [VirtioMmioDevice(0xD000_0000, 0x1000, layout.ACPI_SCI_IRQ)],
        [VirtioMmioDevice(0xD000_0000, 0x1000, 24)],  # past the IOAPIC's pins
        [VirtioMmioDevice(0xD000_0000, 0x1000, 5), VirtioMmioDevice(0xD000_1000, 0x1000, 5)],
        [VirtioMmioDevice(0xD000_0000, 0x2000, 5), VirtioMmioDevice(0xD000_1000, 0x1000, 6)],
        [VirtioMmioDevice(0xFFFF_F000, 0x2000, 5)],  # crosses 4 GiB
        [VirtioMmioDevice(0xD000_0000, 0, 5)],
    ],
)
def test_rejects_bad_devices(devs):
    with pytest.raises(UsageError):
        build_acpi_tables(1, devs)


def test_rejects_bad_base_and_irq0_gsi():
    with pytest.raises(ValueError):
        build_acpi_tables(1, base=layout.ACPI_ADDR + 8)
    with pytest.raises(ValueError):
        build_acpi_tables(1, base=0x1000)
    with pytest.raises(ValueError):
        build_acpi_tables(1, irq0_gsi=5)


def test_other_base_moves_everything():
    tables = build_acpi_tables(1, base=0xF0000)
    assert tables.rsdp_addr == 0xF0000
    assert all(0xF0000 <= addr < layout.ACPI_END for addr, _ in tables.blobs)


# --- iasl and acpiexec --------------------------------------------------------------------


def disassemble(tmp_path, name: str, data: bytes) -> str:
    (tmp_path / f"{name}.dat").write_bytes(data)
    proc = subprocess.run(
        ["iasl", "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for bad in ("Error", "Warning", "Incorrect checksum", "Invalid"):
        assert bad not in output, output
    dsl = (tmp_path / f"{name}.dsl").read_text()
    assert "Incorrect checksum" not in dsl, dsl
    return dsl


@needs_iasl
def test_iasl_dsdt(tmp_path, config):
    _, devs, tables = config
    dsl = disassemble(tmp_path, "dsdt", tables.table(b"DSDT")[1])
    assert re.search(
        r"Name \(_S5, Package \(0x04\)  // _S5_.*?\{\s*0x05,\s*0x05,\s*Zero,\s*Zero\s*\}", dsl, re.S
    ), dsl
    # COM1: the only way Linux learns IRQ 4 under hardware-reduced ACPI.
    com1 = re.search(r"Device \(COM1\)(.*?)\n        \}", dsl, re.S).group(1)
    assert 'EisaId ("PNP0501")' in com1
    assert (
        "0x03F8,             // Range Minimum" in com1 and "0x08,               // Length" in com1
    )
    assert re.search(r"IRQNoFlags \(\)\s*\{4\}", com1)
    blocks = re.findall(r"Device \((VR\d\d)\)(.*?)\n        \}", dsl, re.S)
    assert [name for name, _ in blocks] == [f"VR{i:02d}" for i in range(len(devs))]
    for i, ((_, body), dev) in enumerate(zip(blocks, devs, strict=True)):
        assert 'Name (_HID, "LNRO0005")' in body
        assert f"Name (_UID, {['Zero', 'One'][i] if i < 2 else f'0x{i:02X}'})" in body
        assert re.search(
            rf"Memory32Fixed \(ReadWrite,\s*0x{dev.base:08X},\s*// Address Base\s*"
            rf"0x{dev.size:08X},\s*// Address Length",
            body,
        ), body
        interrupt = r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)"
        assert re.search(rf"{interrupt}\s*\{{\s*0x{dev.irq:08X},\s*\}}", body), body


def test_virtio_irqs_avoid_reserved_lines():
    assert acpi.VIRTIO_MMIO_IRQS[:4] == (5, 6, 7, 8)
    assert acpi.VIRTIO_MMIO_IRQS[4:] == tuple(range(10, 24))
    tables = build_acpi_tables(1, devices(len(acpi.VIRTIO_MMIO_IRQS)))
    assert tables.table(b"DSDT")[1].count(b"LNRO0005") == len(acpi.VIRTIO_MMIO_IRQS)


@needs_iasl
def test_iasl_dsdt_with_every_virtio_irq(tmp_path):
    devs = devices(len(acpi.VIRTIO_MMIO_IRQS))
    dsl = disassemble(tmp_path, "dsdt", build_acpi_tables(1, devs).table(b"DSDT")[1])
    assert dsl.count('Name (_HID, "LNRO0005")') == len(devs)
    assert "Device (VR17)" in dsl and "0x00000017," in dsl  # the last pin, GSI 23


@needs_iasl
def test_iasl_fadt(tmp_path, config):
    _, _, tables = config
    dsl = disassemble(tmp_path, "facp", tables.table(b"FACP")[1])
    dsdt = tables.table(b"DSDT")[0]
    for needle in [
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "8042 Present on ports 60/64 (V2) : 0",
        "VGA Not Present (V4) : 1",
        "FADT Minor Revision : 05",
        f"DSDT Address : {dsdt:016X}",
        f"DSDT Address : {dsdt:08X}",
        f"SCI Interrupt : {layout.ACPI_SCI_IRQ:04X}",
        "Value to cause reset : FE",
        "Hypervisor ID : " + b"VOIDBOX "[::-1].hex().upper(),
    ]:
        assert needle in dsl, f"{needle!r} missing"
    for reg, port in [
        ("Sleep Control Register", layout.ACPI_SLEEP_CONTROL_PORT),
        ("Sleep Status Register", layout.ACPI_SLEEP_STATUS_PORT),
        ("Reset Register", layout.I8042_COMMAND_PORT),
    ]:
        assert re.search(
            rf"{reg} : \[Generic Address Structure\]\s*\n.*Space ID : 01 \[SystemIO\]\s*\n"
            rf".*Bit Width : 08\s*\n.*Bit Offset : 00\s*\n.*Encoded Access Width : 01 .*\n"
            rf".*Address : {port:016X}",
            dsl,
        ), reg


@needs_iasl
def test_iasl_madt(tmp_path, config):
    cpus, _, tables = config
    dsl = disassemble(tmp_path, "apic", tables.table(b"APIC")[1])
    assert dsl.count("[Processor Local APIC]") == cpus
    assert dsl.count("Processor Enabled : 1") == cpus
    assert dsl.count("[I/O APIC]") == 1
    assert f"I/O Apic ID : {cpus:02X}" in dsl
    assert "Address : FEC00000" in dsl and "Local Apic Address : FEE00000" in dsl
    assert "PC-AT Compatibility : 1" in dsl
    assert dsl.count("[Interrupt Source Override]") == 1
    assert "Source : 09" in dsl and "Trigger Mode : 3" in dsl
    assert "[Local APIC NMI]" in dsl and "Interrupt Input LINT : 01" in dsl


@needs_iasl
def test_iasl_xsdt(tmp_path, config):
    _, _, tables = config
    dsl = disassemble(tmp_path, "xsdt", tables.table(b"XSDT")[1])
    assert f"ACPI Table Address   0 : {tables.table(b'FACP')[0]:016X}" in dsl
    assert f"ACPI Table Address   1 : {tables.table(b'APIC')[0]:016X}" in dsl
    assert "ACPI Table Address   2" not in dsl


# ACPICA debug levels (acoutput.h): table/namespace init summary, register reads and writes.
ACPI_LV_INIT = 0x0000_0001
ACPI_LV_IO = 0x0400_0000
HW_WRITE = re.compile(r"Wrote: ([0-9A-F]{16}) width\s+(\d+)\s+to ([0-9A-F]{16}) \(SystemIO\)")


@needs_acpiexec
@pytest.mark.parametrize("ndev", DEVICE_COUNTS)
def test_acpiexec_powers_off_through_the_sleep_registers(tmp_path, ndev):
    """ACPICA (the interpreter Linux runs) loads our FADT, MADT and DSDT and enters S5."""
    tables = build_acpi_tables(2, devices(ndev))
    names = []
    for sig in (b"FACP", b"APIC", b"DSDT"):
        name = sig.decode().lower() + ".dat"
        (tmp_path / name).write_bytes(tables.table(sig)[1])
        names.append(name)
    proc = subprocess.run(
        ["acpiexec", "-x", hex(ACPI_LV_INIT | ACPI_LV_IO), "-b", "sleep 5", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Exception" not in output, output
    assert f"{ndev + 1} Devices" in output, output  # COM1 and the virtio-mmio devices
    assert "HwExtendedSleep" in output or "Sleep-A: 05" in output, output
    writes = [
        (int(value, 16), int(width), int(port, 16))
        for value, width, port in HW_WRITE.findall(output)
        if int(port, 16) in (layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_SLEEP_STATUS_PORT)
    ]
    # Clear WAK_STS (write 1 to bit 7 of the status register), then SLP_TYP=5 | SLP_EN.
    assert writes[:2] == [
        (0x80, 8, layout.ACPI_SLEEP_STATUS_PORT),
        (acpi.SLEEP_CONTROL_S5_VALUE, 8, layout.ACPI_SLEEP_CONTROL_PORT),
    ], output


# --- a real Linux reads the tables (QEMU TCG) ------------------------------------------

# QEMU microvm with acpi=off (so it builds no tables of its own) puts its virtio-mmio
# transports at 0xfeb00000 + 512 * n on GSI 5 + n (hw/i386/microvm.c).
QEMU_MICROVM_VIRTIO_BASE = 0xFEB0_0000
QEMU_MICROVM_VIRTIO_SIZE = 0x200
QEMU_MICROVM_VIRTIO_IRQ = 5
QEMU_TIMEOUT = 300  # a hang bound, not a performance assertion
DISK_SECTORS = 2048


def _isa_debug_exit_status(value: int) -> int:
    """QEMU's isa-debug-exit device exits with (value << 1) | 1 (hw/misc/debugexit.c)."""
    return (value << 1) | 1


def _default_guest():
    return require_default_guest()


def _run_qemu(tmp_path, tables, append: str, extra: list[str]) -> tuple[int, str]:
    """Boot the default guest under QEMU microvm (TCG) on `tables` alone; (status, log)."""
    guest = _default_guest()
    argv = [
        shutil.which("qemu-system-x86_64"),
        "-M", "microvm,acpi=off,auto-kernel-cmdline=off",
        "-accel", "tcg", "-smp", "2", "-m", "256M", "-no-reboot",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-kernel", str(guest.vmlinux), "-initrd", str(guest.initrd),
        # TCG reports no TSC frequency, and a hardware-reduced Linux has no PIT to measure
        # it against: without tsc_early_khz the LAPIC timer never calibrates.
        "-append", f"console=ttyS0 pci=off tsc_early_khz=2000000 {append}",
        *extra,
    ]  # fmt: skip
    for addr, data in tables.blobs:
        blob = tmp_path / f"acpi-{addr:x}.bin"
        blob.write_bytes(data)
        argv += ["-device", f"loader,file={blob},addr={addr:#x},force-raw=on"]
    proc = subprocess.run(argv, capture_output=True, timeout=QEMU_TIMEOUT)
    log = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    (tmp_path / "serial.log").write_text(log)  # kept by pytest for a failed run
    return proc.returncode, log


@pytest.mark.qemu
@pytest.mark.slow
def test_linux_under_qemu_uses_the_tables(tmp_path):
    """Debian's kernel boots on voidbox's tables alone, finds 2 CPUs, COM1 and two
    virtio-blk disks through the DSDT, then powers off by writing 0x34 to port 0x600."""
    virtio = [
        VirtioMmioDevice(
            QEMU_MICROVM_VIRTIO_BASE + n * QEMU_MICROVM_VIRTIO_SIZE,
            QEMU_MICROVM_VIRTIO_SIZE,
            QEMU_MICROVM_VIRTIO_IRQ + n,
        )
        for n in range(2)
    ]
    # The SLEEP_CONTROL_REG port: the guest's write ends QEMU with a status encoding it.
    extra = ["-device", f"isa-debug-exit,iobase={layout.ACPI_SLEEP_CONTROL_PORT:#x},iosize=1"]
    for n in range(len(virtio)):
        disk = tmp_path / f"disk{n}.img"
        disk.write_bytes(bytes(DISK_SECTORS * 512))
        extra += [
            "-drive", f"file={disk},if=none,id=d{n},format=raw",
            "-device", f"virtio-blk-device,drive=d{n},bus=virtio-mmio-bus.{n}",
        ]  # fmt: skip
    status, log = _run_qemu(
        tmp_path, build_acpi_tables(2, virtio), "voidbox.shell=1 voidbox.poweroff=1", extra
    )
    assert status == _isa_debug_exit_status(acpi.SLEEP_CONTROL_S5_VALUE), log
    for needle in [
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 VOIDBX)",
        "ACPI: FACP 0x",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)",
        "smp: Brought up 1 node, 2 CPUs",
        "ACPI: PM: (supports S0 S5)",
        "ttyS0 at I/O 0x3f8",
        "i8042: PNP: No PS/2 controller found.",
        f"[vda] {DISK_SECTORS} 512-byte logical blocks",
        f"[vdb] {DISK_SECTORS} 512-byte logical blocks",
        "ACPI: PM: Preparing to enter system sleep state S5",
    ]:
        assert needle in log, f"{needle!r} missing from the serial log:\n{log}"
    for bad in ("ACPI Error", "ACPI BIOS Error", "Firmware Bug", "ACPI Warning"):
        assert bad not in log, log


@pytest.mark.qemu
@pytest.mark.slow
def test_linux_under_qemu_resets_through_reset_reg(tmp_path):
    """With reboot=acpi, Linux writes RESET_VALUE straight to RESET_REG (the i8042 command
    port); the keyboard-controller fallback would poll the status port first."""
    trace = tmp_path / "trace.log"
    extra = [
        "-device", f"isa-debug-exit,iobase={layout.I8042_COMMAND_PORT:#x},iosize=1",
        "-trace", f"enable=memory_region_ops_read,file={trace}",
    ]  # fmt: skip
    status, log = _run_qemu(
        tmp_path, build_acpi_tables(1), "reboot=acpi rdinit=/bin/busybox -- reboot -f", extra
    )
    # The exit status keeps the low 8 bits of (0xFE << 1) | 1.
    assert status == _isa_debug_exit_status(acpi.RESET_VALUE) & 0xFF, log
    assert "reboot: Restarting system" in log, log
    status_reads = [
        line
        for line in trace.read_text().splitlines()
        if "name 'isa-debug-exit'" in line and f"addr {layout.I8042_COMMAND_PORT:#x} " in line
    ]
    assert status_reads == [], "the i8042 fallback ran: the ACPI reset register was not used"
