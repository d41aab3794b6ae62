"""vCPU exit cost: `.venv/bin/pytest bench/bench_exits.py --benchmark-only -q`.

- decoding one port-OUT kvm_run, C (`voidbox._kvm.decode_exit`) beside the pure-Python
  twin (`voidbox.exits.decode_exit`);
- a full exit round trip under /dev/kvm: a real-mode guest loops on `out 0x10, al`, and
  each benchmark round is one `Vcpu.run()` returning an IoExit (KVM_RUN, the kernel's
  exit path, the decode). On this host KVM emulates the guest's instructions, so the
  number includes that.
"""

import struct

import pytest

from voidbox import exits
from voidbox.host import kvm_info
from voidbox.kvm_types import Regs
from voidbox.layout import MiB
from voidbox.memory import GuestMemory

RUN_SIZE = 3 * 4096
PIO_DATA_OFFSET = 4096
TEST_PORT = 0x10
CODE_ADDR = 0x1000
# out 0x10, al; jmp back to the out (Intel SDM vol. 2: E6 ib, EB cb)
OUT_LOOP = b"\xe6" + bytes([TEST_PORT]) + b"\xeb\xfc"


def compiled():
    try:
        from voidbox import _kvm
    except ImportError:
        pytest.skip("voidbox._kvm is not built: VOIDBOX_ONLY=_kvm python setup.py build_ext --inplace")
    return _kvm


def out_run():
    run = bytearray(RUN_SIZE)
    struct.pack_into("<I", run, exits.KVM_RUN_EXIT_REASON, exits.KVM_EXIT_IO)
    struct.pack_into("<BBHIQ", run, exits.KVM_RUN_IO_DIRECTION, exits.KVM_EXIT_IO_OUT, 1,
                     TEST_PORT, 1, PIO_DATA_OFFSET)
    run[PIO_DATA_OFFSET] = 0x41
    return run


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_decode_io_out(benchmark, impl):
    decode = compiled().decode_exit if impl == "cython" else exits.decode_exit
    run = out_run()
    assert benchmark(decode, run) == exits.IoExit(TEST_PORT, 1, True, 1, b"A")


def test_exit_round_trip(benchmark):
    if not kvm_info().usable:
        pytest.skip("needs /dev/kvm")
    _kvm = compiled()
    with _kvm.Kvm() as kvm, kvm.create_vm() as vm, GuestMemory(16 * MiB) as memory:
        vm.set_tss_addr(0xFFFB_D000)
        vm.set_user_memory_region(0, 0, memory.size, memory.mmap)
        memory.write(CODE_ADDR, OUT_LOOP)
        with vm.create_vcpu(0) as vcpu:
            sregs = vcpu.get_sregs()
            sregs.cs.base = sregs.cs.selector = 0
            vcpu.set_sregs(sregs)
            vcpu.set_regs(Regs(rip=CODE_ADDR))
            exit = benchmark(vcpu.run)
            assert type(exit) is exits.IoExit and exit.port == TEST_PORT
