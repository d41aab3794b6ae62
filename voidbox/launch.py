"""The `voidbox` entry point and the `boot` command's body, without click.

Start-up is a feature: users boot many short-lived VMs. Importing click costs about 38 ms
here, as much as QEMU's whole run, so a plain `voidbox boot --opt value ...` is parsed
from BOOT_OPTIONS directly and never imports it. Anything else (other commands, --help,
short or unknown flags, a value that looks like a flag, a number that does not parse)
goes to the click CLI in cli.py, which builds its `boot` command from the same table and
owns every message about bad usage.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from typing import NamedTuple

from .errors import ExitStatus, UsageError, VoidboxError


class Option(NamedTuple):
    flag: str
    kind: type  # str, int, float (finite only: nan and inf are refused), or bool for a flag
    default: object
    help: str

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


BOOT_OPTIONS = (
    Option("--kernel", str, None, "Kernel (bzImage or ELF vmlinux)."),
    Option("--initrd", str, None, "Initial ramdisk."),
    Option("--cmdline", str, None, "Replace the default kernel command line."),
    Option("--append", str, "", "Add to the kernel command line."),
    Option("--mem", str, "512M", "Guest memory (K, M, G suffixes)."),
    Option("--cpus", int, 1, "Number of vCPUs."),
    Option("--timeout", float, None, "Stop the VM after this many seconds (exit 3)."),
    Option("--readonly", bool, False, "Attach the disk image read-only."),
)
_BY_FLAG = {option.flag: option for option in BOOT_OPTIONS}


def parse_boot_fast(args: list[str]) -> dict | None:
    """`boot`'s parameters from a plain argument list, or None to let click parse it.

    Plain means: known long options (`--opt value` or `--opt=value`, each at most once),
    values that do not start with "-", numbers that parse (floats finite), and at most one
    IMAGE.
    """
    params = {option.dest: option.default for option in BOOT_OPTIONS}
    params["image"] = None
    seen = set()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-"):
            if params["image"] is not None:
                return None
            params["image"] = arg
            continue
        flag, eq, value = arg.partition("=")
        option = _BY_FLAG.get(flag)
        if option is None or flag in seen:
            return None
        seen.add(flag)
        if option.kind is bool:
            if eq:
                return None
            params[option.dest] = True
            continue
        if not eq:
            if i >= len(args):
                return None
            value = args[i]
            i += 1
        if value.startswith("-"):
            return None
        try:
            params[option.dest] = option.kind(value)
        except ValueError:
            return None
        if option.kind is float and not math.isfinite(params[option.dest]):
            return None  # click's FiniteFloat owns the message
    return params


def fail(error: VoidboxError) -> None:
    sys.stderr.write(f"voidbox: error: {error}\n")
    sys.exit(int(error.exit_status))


def main(argv: list[str] | None = None) -> None:
    """The `voidbox` command."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["boot"]:
        params = parse_boot_fast(args[1:])
        if params is not None:
            try:
                boot_command(**params)
            except VoidboxError as error:
                fail(error)
    from .cli import main as click_main

    click_main(args)


def boot_command(image, kernel, initrd, cmdline, append, mem, cpus, timeout, readonly) -> None:
    """`voidbox boot`: build the VM, run it with the console here, exit with its status."""
    from . import host
    from .config import VmConfig

    if kernel is None:
        from .image import default_guest

        guest = default_guest()
        if guest is None:
            raise UsageError("no kernel given and no default guest: run `voidbox image build` or pass --kernel")
        kernel = str(guest.vmlinux)
        if initrd is None:
            initrd = str(guest.initrd)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    config = VmConfig(
        kernel=kernel, initrd=initrd, image=image, cmdline=cmdline, append=append, mem=mem,
        cpus=cpus, timeout=timeout, readonly=readonly, console_output=sys.stdout,
        interactive=interactive,
    )
    info = host.kvm_info()
    if not info.usable:
        raise VoidboxError(f"KVM is not available: {info.reason}")
    if info.software_only:
        sys.stderr.write(f"voidbox: note: {host.SOFTWARE_KVM_NOTE}\n")
    sys.exit(int(run_vm(config, info.software_only)))


def run_vm(config, software_only: bool = False) -> ExitStatus:
    from .vm import StopReason, Vm, stderr_line

    vm = Vm(config)

    def on_signal(signum, _frame):
        vm.stop(StopReason.SIGINT if signum == signal.SIGINT else StopReason.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        vm.start()
        console = None
        if config.interactive:
            from .console import Console

            console = Console(on_input=vm.serial.enqueue_input, on_quit=lambda: vm.stop(StopReason.QUIT))
            console.start()
        try:
            vm.wait()
        finally:
            if console is not None:
                console.stop()
    finally:
        vm.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    message = vm.stop_message()
    if software_only and vm.stop_reason is StopReason.TIMEOUT:
        message += " (software-only KVM: the guest runs emulated and cannot finish booting here)"
    stderr_line(message)
    if os.environ.get("VOIDBOX_TRACE_STARTUP") and vm.first_run_at is not None:
        stderr_line(f"trace: first-kvm-run {vm.first_run_at:.6f}")
    return vm.stop_reason.exit_status
