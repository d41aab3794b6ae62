"""Plain-Python mirrors of the KVM register structures (api.rst, struct kvm_regs/kvm_sregs).

The control plane builds and inspects vCPU state with these; `_kvm` converts them to
and from the C structures.
"""

from ._records import dataclass, field

GENERAL_REGISTERS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)


@dataclass
class Regs:
    """struct kvm_regs."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2  # bit 1 is reserved and always set


@dataclass
class Segment:
    """struct kvm_segment."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the field's name in struct kvm_segment
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass
class DTable:
    """struct kvm_dtable (GDTR/IDTR)."""

    base: int = 0
    limit: int = 0


SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass
class Sregs:
    """struct kvm_sregs (interrupt_bitmap is kept opaque)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: bytes = bytes(32)


@dataclass
class CpuidEntry:
    """struct kvm_cpuid_entry2."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
