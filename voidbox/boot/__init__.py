"""Booting a guest: kernel and initrd loading, boot_params, e820, PVH start info, entry state.

    >>> from voidbox.boot import load_kernel
    >>> plan = load_kernel(memory, "vmlinux", "console=ttyS0")
    >>> vcpu0.set_regs(plan.regs); vcpu0.set_sregs(plan.sregs_update(vcpu0.get_sregs()))

One file per structure: elf.py and bzimage.py parse kernels, bootparams.py the zero
page, e820.py the memory map, pvh.py hvm_start_info, cpu_state.py the vCPU's entry
registers and page tables, loader.py ties them together. ACPI tables are in acpi.py.
"""

from .loader import BootPlan, load_kernel

__all__ = ["BootPlan", "load_kernel"]
