"""vCPU set-up and exit handling.

`handle_exit` is a pure function of an exit record and the two buses: it performs the
bus access and says what the vCPU loop should do next. Tests drive it with synthetic
exits (voidbox.exits) and fake buses, no /dev/kvm needed.
"""

from __future__ import annotations

import enum

from ._records import dataclass
from .exits import (
    KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
)

# Model-specific registers the boot vCPU starts with (Intel SDM vol. 4). Zeroed syscall
# MSRs and a write-back default memory type: Linux expects cacheable RAM from the start.
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_DEF_TYPE_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

BOOT_MSRS = (
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLE | MTRR_TYPE_WRBACK),
)


class Action(enum.Enum):
    CONTINUE = "continue"
    POWEROFF = "poweroff"
    RESET = "reset"
    TRIPLE_FAULT = "triple-fault"
    INTERNAL_ERROR = "internal-error"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the run loop does after one exit."""

    action: Action
    # For IN and MMIO reads: the bytes to hand back to KVM before the next KVM_RUN.
    reply: bytes | None = None
    detail: str = ""


CONTINUE = Outcome(Action.CONTINUE)


def handle_exit(exit, pio, mmio) -> Outcome:
    """Serve one vCPU exit against the port-I/O and MMIO buses."""
    kind = type(exit)
    if kind is IoExit:
        size = exit.size
        if exit.is_write:
            data = exit.data
            for i in range(exit.count):
                pio.write(exit.port, size, int.from_bytes(data[i * size : (i + 1) * size], "little"))
            return CONTINUE
        reply = b"".join(pio.read(exit.port, size).to_bytes(size, "little") for _ in range(exit.count))
        return Outcome(Action.CONTINUE, reply)
    if kind is MmioExit:
        if exit.is_write:
            mmio.write(exit.addr, exit.size, int.from_bytes(exit.data[: exit.size], "little"))
            return CONTINUE
        return Outcome(Action.CONTINUE, mmio.read(exit.addr, exit.size).to_bytes(exit.size, "little"))
    if kind is InterruptedExit:
        return CONTINUE
    if kind is ShutdownExit:
        return Outcome(Action.TRIPLE_FAULT, detail="the guest triple-faulted (KVM_EXIT_SHUTDOWN)")
    if kind is SystemEventExit:
        if exit.type == KVM_SYSTEM_EVENT_SHUTDOWN:
            return Outcome(Action.POWEROFF)
        if exit.type == KVM_SYSTEM_EVENT_RESET:
            return Outcome(Action.RESET)
        return Outcome(Action.INTERNAL_ERROR, detail=f"guest crash (system event {exit.type})")
    if kind is HltExit:
        # With the in-kernel irqchip KVM handles HLT itself; an HLT exit means the vCPU
        # can never be woken again.
        return Outcome(Action.POWEROFF, detail="the guest halted with no interrupt source")
    if kind is InternalErrorExit:
        return Outcome(
            Action.INTERNAL_ERROR,
            detail=f"KVM internal error (suberror {exit.suberror}: "
            f"{_SUBERRORS.get(exit.suberror, 'unknown')})",
        )
    if kind is FailEntryExit:
        return Outcome(
            Action.INTERNAL_ERROR,
            detail=f"KVM could not enter the guest (hardware entry failure {exit.reason:#x})",
        )
    return Outcome(Action.INTERNAL_ERROR, detail=f"unhandled vCPU exit {exit!r}")


_SUBERRORS = {
    KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "delivery event",
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}


def configure_vcpu(vcpu, supported_cpuid, index: int, count: int, software_only: bool = False) -> None:
    """CPUID, MSRs, FPU and LAPIC for one vCPU, as every voidbox vCPU starts.

    On software-only KVM the features its instruction emulator cannot run (CX16, XSAVE
    and what depends on it) are hidden, so a guest takes its fallback paths instead of
    dying with an emulation failure.
    """
    from .cpuid import filter_cpuid

    vcpu.set_cpuid(filter_cpuid(supported_cpuid, index, count, software_only=software_only))
    vcpu.set_msrs(list(BOOT_MSRS))
    vcpu.set_fpu()
    vcpu.setup_lapic()
