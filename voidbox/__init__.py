"""voidbox: a KVM micro-VM monitor with user-mode networking.

    >>> from voidbox import VmConfig, new_vm
    >>> vm = new_vm(VmConfig(kernel="vmlinux", timeout=10))   # accel="auto"
    >>> status = vm.run()            # or vm.start(); vm.wait(); vm.stop()

`new_vm` picks who runs the guest's CPUs (VmConfig.accel): `Vm` is voidbox's own KVM VMM,
`voidbox.qemu.QemuVm` has QEMU run them with voidbox's devices. Both behave the same.

Heavy modules (numpy, click, the KVM extension) are imported only when used.
"""

__version__ = "0.1.0"
__all__ = ["Vm", "VmConfig", "StopReason", "new_vm"]


def new_vm(config):
    """The VM for `config`, on the accelerator config.accel resolves to on this host
    (voidbox.host.choose_accel: VoidboxError when that cannot run here)."""
    from .host import choose_accel

    accel = choose_accel(config.accel)
    if accel.name == "qemu":
        from .qemu import QemuVm

        return QemuVm(config, use_kvm=accel.qemu_kvm)
    from .vm import Vm

    return Vm(config)


def __getattr__(name):
    if name in ("Vm", "StopReason"):
        from . import vm

        return getattr(vm, name)
    if name == "VmConfig":
        from .config import VmConfig

        return VmConfig
    raise AttributeError(name)
