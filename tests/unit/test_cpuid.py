"""filter_cpuid over synthetic KVM_GET_SUPPORTED_CPUID tables (no /dev/kvm)."""

import copy

import pytest

from voidbox import cpuid
from voidbox.cpuid import filter_cpuid
from voidbox.errors import UsageError
from voidbox.kvm_types import CpuidEntry

SIG = cpuid.KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def cache_eax(cache_type, level, sharing_minus_1=0x3F, cores_minus_1=0x3F):
    return (cores_minus_1 << 26) | (sharing_minus_1 << 14) | (level << 5) | cache_type


def supported():
    """A table shaped like this host's KVM_GET_SUPPORTED_CPUID, plus Intel leaf 4 caches."""
    return [
        CpuidEntry(0x0, 0, 0, 0x1F, 0x68747541, 0x444D4163, 0x69746E65),
        CpuidEntry(0x1, 0, 0, 0xA00F11, 0x00FF0800, 0x05202000 | cpuid.CPUID_1_ECX_XSAVE
                   | cpuid.CPUID_1_ECX_AVX, 0x078BFBFF),
        CpuidEntry(0x4, 0, SIG, cache_eax(1, 1)),
        CpuidEntry(0x4, 1, SIG, cache_eax(2, 1)),
        CpuidEntry(0x4, 2, SIG, cache_eax(3, 2)),
        CpuidEntry(0x4, 3, SIG, cache_eax(3, 3)),
        CpuidEntry(0x4, 4, SIG, 0),
        CpuidEntry(0x7, 0, SIG, 0, 0x1800022, 0x4, 0x20000000),
        CpuidEntry(0xB, 0, SIG, 0x1, 0x2, 0x100, 0x7),
        CpuidEntry(0xB, 1, SIG, 0x4, 0x10, 0x201, 0x7),
        CpuidEntry(0xD, 0, SIG, 0x7, 0x340, 0x340, 0),
        CpuidEntry(0xD, 1, SIG, 0x1, 0, 0, 0),
        CpuidEntry(0x1F, 0, SIG),
        CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
        CpuidEntry(0x40000001, 0, 0, 0x01007EFB),
        CpuidEntry(0x80000001, 0, 0, 0xA00F11, 0x40000000, 0x400393 | (1 << 16), 0x23D3FBFF),
        CpuidEntry(0x80000008, 0, 0, 0x3030, 0x10000005, 0x7001, 0),
        CpuidEntry(0x8000001D, 0, SIG, 0x121, 0x1C0003F, 0x3F, 0),
        CpuidEntry(0x8000001D, 2, SIG, 0x143 | (7 << 14), 0x1C0003F, 0x3FF, 2),
        CpuidEntry(0x8000001D, 3, SIG, 0x163 | (7 << 14), 0x3C0003F, 0x7FFF, 1),
        CpuidEntry(0x8000001E, 0, 0, 5, 0x105, 0x701),
    ]


def leaf(entries, function, index=0):
    matches = [e for e in entries if e.function == function and e.index == index]
    assert len(matches) == 1, (hex(function), index, matches)
    return matches[0]


@pytest.mark.parametrize("index, count", [(0, 1), (1, 2), (3, 4), (7, 8), (254, 255)])
def test_leaf1_identity(index, count):
    out = filter_cpuid(supported(), index, count)
    entry = leaf(out, 0x1)
    assert entry.ecx & cpuid.CPUID_1_ECX_HYPERVISOR
    assert entry.ebx >> 24 == index
    assert (entry.ebx >> 16) & 0xFF == count
    assert entry.ebx & 0xFFFF == 0x0800  # CLFLUSH line size and brand index kept
    assert bool(entry.edx & cpuid.CPUID_1_EDX_HTT) == (count > 1)


@pytest.mark.parametrize("topology_leaf", [0xB, 0x1F])
@pytest.mark.parametrize("count, shift", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (64, 6)])
def test_extended_topology(topology_leaf, count, shift):
    index = count - 1
    out = filter_cpuid(supported(), index, count)
    smt, core, end = (leaf(out, topology_leaf, i) for i in range(3))
    assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, (smt.ecx >> 8) & 0xFF, smt.ecx & 0xFF) == (0, 1, 1, 0)
    assert (core.eax & 0x1F, core.ebx & 0xFFFF, (core.ecx >> 8) & 0xFF, core.ecx & 0xFF) == (
        shift, count, 2, 1)
    assert (end.eax, end.ebx, (end.ecx >> 8) & 0xFF, end.ecx & 0xFF) == (0, 0, 0, 2)
    assert smt.edx == core.edx == end.edx == index  # x2APIC ID
    assert all(e.flags & SIG for e in (smt, core, end))
    assert len([e for e in out if e.function == topology_leaf]) == 3


def test_leaf4_caches():
    out = filter_cpuid(supported(), 2, 6)
    for subleaf in (0, 1, 2):  # L1d, L1i, L2: private to a core
        eax = leaf(out, 0x4, subleaf).eax
        assert (eax >> 14) & 0xFFF == 0
        assert eax >> 26 == 5
    l3 = leaf(out, 0x4, 3).eax
    assert (l3 >> 14) & 0xFFF == 5
    assert l3 >> 26 == 5
    assert l3 & 0x3FFF == cache_eax(3, 3) & 0x3FFF  # type, level and flags kept
    assert leaf(out, 0x4, 4).eax == 0  # "no more caches" stays as it was


def test_amd_topology_leaves():
    out = filter_cpuid(supported(), 3, 4)
    size_ids = leaf(out, 0x80000008)
    assert size_ids.ecx & 0xFF == 3
    assert (size_ids.ecx >> 12) & 0xF == 2
    assert size_ids.eax == 0x3030  # address sizes untouched
    assert (leaf(out, 0x8000001D, 0).eax >> 14) & 0xFFF == 0
    assert (leaf(out, 0x8000001D, 2).eax >> 14) & 0xFFF == 0
    assert (leaf(out, 0x8000001D, 3).eax >> 14) & 0xFFF == 3
    ext = leaf(out, 0x8000001E)
    assert (ext.eax, ext.ebx & 0xFF, ext.ecx) == (3, 3, 0)


def test_kvm_signature_kept_as_given():
    table = supported()
    table[13] = CpuidEntry(0x40000000, 0, 0, 0x40000010, 0x4B4D564B, 0x564B4D56, 0x4D)
    out = filter_cpuid(table, 0, 1)
    assert leaf(out, 0x40000000) == table[13]
    assert leaf(out, 0x40000001) == table[14]


def test_kvm_signature_added_when_missing():
    table = [e for e in supported() if not 0x40000000 <= e.function <= 0x400000FF]
    out = filter_cpuid(table, 0, 1)
    sig = leaf(out, 0x40000000)
    assert sig.eax == 0x40000001
    assert b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx)) == b"KVMKVMKVM\0\0\0"
    assert leaf(out, 0x40000001).eax == 0  # no paravirt features promised


def test_other_leaves_pass_through_and_input_is_untouched():
    table = supported()
    before = copy.deepcopy(table)
    out = filter_cpuid(table, 1, 2)
    assert table == before
    for function, index in ((0x0, 0), (0x7, 0), (0xD, 0), (0xD, 1), (0x40000001, 0), (0x80000001, 0)):
        assert leaf(out, function, index) == leaf(table, function, index)


def test_features_kept_by_default():
    out = filter_cpuid(supported(), 0, 1)
    ecx = leaf(out, 0x1).ecx
    assert ecx & cpuid.CPUID_1_ECX_CX16 and ecx & cpuid.CPUID_1_ECX_XSAVE and ecx & cpuid.CPUID_1_ECX_AVX


def test_software_only_hides_cx16_xsave_and_avx():
    out = filter_cpuid(supported(), 0, 1, software_only=True)
    ecx = leaf(out, 0x1).ecx
    for bit in (cpuid.CPUID_1_ECX_CX16, cpuid.CPUID_1_ECX_XSAVE, cpuid.CPUID_1_ECX_OSXSAVE,
                cpuid.CPUID_1_ECX_AVX, cpuid.CPUID_1_ECX_FMA, cpuid.CPUID_1_ECX_F16C):
        assert not ecx & bit
    assert ecx & cpuid.CPUID_1_ECX_HYPERVISOR
    assert ecx & (1 << 21)  # x2APIC, unrelated, stays
    assert not any(e.function == 0xD for e in out)
    leaf7 = leaf(out, 0x7)
    assert not leaf7.ebx & (1 << 5)  # AVX2
    assert leaf7.ebx & (1 << 1)  # TSC_ADJUST stays
    assert not leaf(out, 0x80000001).ecx & (1 << 16)  # FMA4


@pytest.mark.parametrize("index, count", [(0, 0), (1, 1), (-1, 2), (0, 256)])
def test_bad_topology_is_a_usage_error(index, count):
    with pytest.raises(UsageError):
        filter_cpuid(supported(), index, count)
