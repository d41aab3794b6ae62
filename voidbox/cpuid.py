"""The CPUID table each vCPU gets: KVM's supported CPUID plus identity and topology.

`filter_cpuid` is a pure function over `CpuidEntry` lists (voidbox.kvm_types), so it is
tested without /dev/kvm. It starts from KVM_GET_SUPPORTED_CPUID (api.rst §4.46), which
already hides what KVM cannot virtualise, and adds what only the VMM knows:

- leaf 1: the hypervisor bit (ECX[31]), the initial APIC ID (EBX[31:24]), the count of
  addressable logical processors (EBX[23:16]) and HTT (EDX[28]) when there is more than
  one vCPU (Intel SDM vol. 2A, CPUID, Table 3-8);
- leaves 0xB and 0x1F (extended topology): one thread per core, `vcpu_count` cores in
  one package, EDX = x2APIC ID (SDM vol. 2A, Tables 3-8 "Leaf 0BH" and "Leaf 1FH");
- leaf 4 and AMD leaf 0x8000001D (cache parameters): cores per package, and caches
  above L2 shared by every vCPU;
- AMD leaves 0x80000008 ECX (NC, ApicIdSize) and 0x8000001E (extended APIC ID)
  (AMD APM vol. 3, Appendix E.4);
- the KVM paravirt leaves 0x40000000 ("KVMKVMKVM\\0\\0\\0") and 0x40000001 are kept as
  KVM reports them, and added with no features if the input lacks them
  (Documentation/virt/kvm/x86/cpuid.rst).

Features are not hidden by default: KVM's list is what the vCPU can run. On this
project's software-only KVM (kvm_pvm) every instruction of a non-PVM guest is emulated
and the emulator lacks some (Linux died on `cmpxchg16b`, then `xrstor`); with
`software_only=True` the function also clears CX16 and XSAVE and every feature that
needs XSAVE-managed state (AVX and its family), and drops leaf 0xD (XSAVE state
enumeration), so a guest takes its non-XSAVE, non-CX16 paths. It cannot make the
emulator handle instructions every x86_64 guest needs (`int3` failed too).
"""

from __future__ import annotations

from ._records import replace
from .errors import UsageError
from .kvm_types import CpuidEntry

# struct kvm_cpuid_entry2.flags: the entry depends on ECX (linux/kvm.h; sic).
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

CPUID_LEAF_VENDOR = 0x0
CPUID_LEAF_FEATURES = 0x1
CPUID_LEAF_CACHE_PARAMS = 0x4
CPUID_LEAF_EXT_FEATURES = 0x7
CPUID_LEAF_TOPOLOGY = 0xB
CPUID_LEAF_XSAVE = 0xD
CPUID_LEAF_TOPOLOGY_V2 = 0x1F
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
CPUID_LEAF_AMD_EXT_FEATURES = 0x80000001
CPUID_LEAF_AMD_SIZE_IDS = 0x80000008
CPUID_LEAF_AMD_CACHE_TOPOLOGY = 0x8000001D
CPUID_LEAF_AMD_EXT_APIC_ID = 0x8000001E

# "KVMKVMKVM\0\0\0" in EBX, ECX, EDX (little-endian words)
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_SIGNATURE_REGS = tuple(int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8))

# Leaf 1
CPUID_1_ECX_FMA = 1 << 12
CPUID_1_ECX_CX16 = 1 << 13
CPUID_1_ECX_XSAVE = 1 << 26
CPUID_1_ECX_OSXSAVE = 1 << 27
CPUID_1_ECX_AVX = 1 << 28
CPUID_1_ECX_F16C = 1 << 29
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28
CPUID_1_EBX_APIC_ID_SHIFT = 24
CPUID_1_EBX_LOGICAL_COUNT_SHIFT = 16
CPUID_1_EBX_LOGICAL_COUNT_MASK = 0xFF << CPUID_1_EBX_LOGICAL_COUNT_SHIFT
CPUID_1_EBX_APIC_ID_MASK = 0xFF << CPUID_1_EBX_APIC_ID_SHIFT

# Leaf 4 / 0x8000001D EAX
CACHE_TYPE_MASK = 0x1F  # EAX[4:0], 0 = no more caches
CACHE_LEVEL_SHIFT = 5  # EAX[7:5]
CACHE_LEVEL_MASK = 0x7
CACHE_SHARING_SHIFT = 14  # EAX[25:14]: logical processors sharing this cache - 1
CACHE_SHARING_MASK = 0xFFF << CACHE_SHARING_SHIFT
CACHE_CORES_SHIFT = 26  # leaf 4 EAX[31:26]: cores per package - 1
CACHE_CORES_MASK = 0x3F << CACHE_CORES_SHIFT
CACHE_CORES_MAX = 0x3F + 1
CACHE_SHARING_MAX = 0xFFF + 1
CACHE_LEVEL_PRIVATE_MAX = 2  # L1 and L2 belong to one core here; L3 to the package

# Leaves 0xB / 0x1F
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2
TOPOLOGY_LEVEL_TYPE_SHIFT = 8  # ECX[15:8]
TOPOLOGY_SUBLEAVES = 3  # SMT, core, then the terminating "invalid" level

# AMD 0x80000008 ECX
AMD_NC_MASK = 0xFF  # ECX[7:0]: cores per package - 1
AMD_APIC_ID_SIZE_SHIFT = 12  # ECX[15:12]: APIC ID bits that number the cores
AMD_APIC_ID_SIZE_MASK = 0xF << AMD_APIC_ID_SIZE_SHIFT

# software_only: features that need XSAVE-managed state (SDM vol. 1 §13.1) or CX16.
SOFTWARE_ONLY_CLEAR = {
    # (leaf, subleaf, register): mask of bits to clear
    (CPUID_LEAF_FEATURES, 0, "ecx"): (
        CPUID_1_ECX_CX16 | CPUID_1_ECX_XSAVE | CPUID_1_ECX_OSXSAVE | CPUID_1_ECX_AVX
        | CPUID_1_ECX_FMA | CPUID_1_ECX_F16C
    ),
    # AVX2, AVX512F, AVX512DQ, AVX512_IFMA, AVX512PF, AVX512ER, AVX512CD, AVX512BW, AVX512VL
    (CPUID_LEAF_EXT_FEATURES, 0, "ebx"): sum(1 << b for b in (5, 16, 17, 21, 26, 27, 28, 30, 31)),
    # AVX512_VBMI, AVX512_VBMI2, VAES, VPCLMULQDQ, AVX512_VNNI, AVX512_BITALG, AVX512_VPOPCNTDQ
    (CPUID_LEAF_EXT_FEATURES, 0, "ecx"): sum(1 << b for b in (1, 6, 9, 10, 11, 12, 14)),
    # AVX512_4VNNIW, AVX512_4FMAPS, AVX512_VP2INTERSECT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8
    (CPUID_LEAF_EXT_FEATURES, 0, "edx"): sum(1 << b for b in (2, 3, 8, 22, 23, 24, 25)),
    # AVX_VNNI, AVX512_BF16
    (CPUID_LEAF_EXT_FEATURES, 1, "eax"): sum(1 << b for b in (4, 5)),
    # XOP, FMA4 (AMD, VEX-encoded)
    (CPUID_LEAF_AMD_EXT_FEATURES, 0, "ecx"): sum(1 << b for b in (11, 16)),
}

MAX_VCPUS = 255  # the xAPIC ID in leaf 1 EBX[31:24] is 8 bits wide


def _bits_for(count: int) -> int:
    """Bits needed to number `count` items (SDM: "the number of bits to shift")."""
    return max(count - 1, 0).bit_length()


def _topology(leaf: int, vcpu_index: int, vcpu_count: int) -> list[CpuidEntry]:
    """Leaf 0xB/0x1F subleaves: 1 thread per core, vcpu_count cores per package."""
    flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        # SMT level: one logical processor; the next level's IDs start at bit 0.
        CpuidEntry(leaf, 0, flags, 0, 1, (TOPOLOGY_LEVEL_SMT << TOPOLOGY_LEVEL_TYPE_SHIFT) | 0,
                   vcpu_index),
        CpuidEntry(leaf, 1, flags, _bits_for(vcpu_count), vcpu_count,
                   (TOPOLOGY_LEVEL_CORE << TOPOLOGY_LEVEL_TYPE_SHIFT) | 1, vcpu_index),
        # Level type 0 ends the enumeration; ECX[7:0] still echoes the subleaf.
        CpuidEntry(leaf, 2, flags, 0, 0, 2, vcpu_index),
    ]


def _cache(entry: CpuidEntry, vcpu_count: int, set_cores: bool) -> CpuidEntry:
    if not entry.eax & CACHE_TYPE_MASK:
        return entry
    level = (entry.eax >> CACHE_LEVEL_SHIFT) & CACHE_LEVEL_MASK
    sharing = 1 if level <= CACHE_LEVEL_PRIVATE_MAX else min(vcpu_count, CACHE_SHARING_MAX)
    eax = (entry.eax & ~CACHE_SHARING_MASK) | ((sharing - 1) << CACHE_SHARING_SHIFT)
    if set_cores:
        eax = (eax & ~CACHE_CORES_MASK) | ((min(vcpu_count, CACHE_CORES_MAX) - 1) << CACHE_CORES_SHIFT)
    return replace(entry, eax=eax)


def filter_cpuid(
    entries, vcpu_index: int, vcpu_count: int, *, software_only: bool = False
) -> list[CpuidEntry]:
    """The CPUID table for vCPU `vcpu_index` of `vcpu_count`; `entries` is not modified."""
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise UsageError(f"vCPU count must be 1 to {MAX_VCPUS}, got {vcpu_count}")
    if not 0 <= vcpu_index < vcpu_count:
        raise UsageError(f"vCPU index {vcpu_index} is outside 0..{vcpu_count - 1}")
    clear = SOFTWARE_ONLY_CLEAR if software_only else {}
    present = {entry.function for entry in entries}
    topology_done: set[int] = set()
    out: list[CpuidEntry] = []
    for entry in entries:
        leaf = entry.function
        if leaf in (CPUID_LEAF_TOPOLOGY, CPUID_LEAF_TOPOLOGY_V2):
            if leaf not in topology_done:  # all subleaves are replaced, once
                topology_done.add(leaf)
                out.extend(_topology(leaf, vcpu_index, vcpu_count))
            continue
        if leaf == CPUID_LEAF_XSAVE and software_only:
            continue
        if leaf == CPUID_LEAF_FEATURES:
            ebx = entry.ebx & ~(CPUID_1_EBX_APIC_ID_MASK | CPUID_1_EBX_LOGICAL_COUNT_MASK)
            ebx |= (vcpu_index << CPUID_1_EBX_APIC_ID_SHIFT)
            ebx |= (vcpu_count << CPUID_1_EBX_LOGICAL_COUNT_SHIFT)
            edx = entry.edx | CPUID_1_EDX_HTT if vcpu_count > 1 else entry.edx & ~CPUID_1_EDX_HTT
            entry = replace(entry, ebx=ebx, ecx=entry.ecx | CPUID_1_ECX_HYPERVISOR, edx=edx)
        elif leaf == CPUID_LEAF_CACHE_PARAMS:
            entry = _cache(entry, vcpu_count, set_cores=True)
        elif leaf == CPUID_LEAF_AMD_CACHE_TOPOLOGY:
            entry = _cache(entry, vcpu_count, set_cores=False)
        elif leaf == CPUID_LEAF_AMD_SIZE_IDS:
            ecx = entry.ecx & ~(AMD_NC_MASK | AMD_APIC_ID_SIZE_MASK)
            ecx |= (vcpu_count - 1) | (_bits_for(vcpu_count) << AMD_APIC_ID_SIZE_SHIFT)
            entry = replace(entry, ecx=ecx)
        elif leaf == CPUID_LEAF_AMD_EXT_APIC_ID:
            # EAX extended APIC ID; EBX[7:0] compute unit ID (one thread per unit);
            # ECX node 0 of 1.
            entry = replace(entry, eax=vcpu_index, ebx=vcpu_index, ecx=0)
        for (c_leaf, c_index, register), mask in clear.items():
            if leaf == c_leaf and entry.index == c_index:
                entry = replace(entry, **{register: getattr(entry, register) & ~mask})
        out.append(entry)
    if KVM_CPUID_SIGNATURE not in present:
        out.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, *KVM_SIGNATURE_REGS))
    if KVM_CPUID_FEATURES not in present:
        out.append(CpuidEntry(KVM_CPUID_FEATURES))
    return out
