"""voidbox: a KVM micro-VM monitor with user-mode networking.

    >>> from voidbox import Vm, VmConfig
    >>> vm = Vm(VmConfig(kernel="vmlinux", timeout=10))
    >>> status = vm.run()            # or vm.start(); vm.wait(); vm.stop()

Heavy modules (numpy, click, the KVM extension) are imported only when used.
"""

__version__ = "0.1.0"
__all__ = ["Vm", "VmConfig", "StopReason"]


def __getattr__(name):
    if name in ("Vm", "StopReason"):
        from . import vm

        return getattr(vm, name)
    if name == "VmConfig":
        from .config import VmConfig

        return VmConfig
    raise AttributeError(name)
