"""The `voidbox` command: a thin click layer over voidbox.Vm and friends.

Exit statuses are those of voidbox.errors.ExitStatus; every error is one line on stderr.
"""

from __future__ import annotations

import signal
import sys

import click

from .errors import ExitStatus, UsageError, VoidboxError


def _fail(error: VoidboxError) -> None:
    click.echo(f"voidbox: error: {error}", err=True)
    sys.exit(int(error.exit_status))


class _Group(click.Group):
    """Turns voidbox errors raised anywhere below into one line and their exit status."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VoidboxError as error:
            _fail(error)
        except KeyboardInterrupt:
            click.echo("voidbox: interrupted", err=True)
            sys.exit(int(ExitStatus.SIGINT))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="voidbox")
def main() -> None:
    """voidbox: disposable KVM micro-VMs with user-mode networking."""


@main.command()
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@click.option("--kernel", type=click.Path(dir_okay=False), help="Kernel (bzImage or ELF vmlinux).")
@click.option("--initrd", type=click.Path(dir_okay=False), help="Initial ramdisk.")
@click.option("--cmdline", help="Replace the default kernel command line.")
@click.option("--append", default="", help="Add to the kernel command line.")
@click.option("--mem", default="512M", show_default=True, help="Guest memory (K, M, G suffixes).")
@click.option("--cpus", default=1, show_default=True, type=int, help="Number of vCPUs.")
@click.option("--timeout", type=float, help="Stop the VM after this many seconds (exit 3).")
@click.option("--readonly", is_flag=True, help="Attach the disk image read-only.")
def boot(image, kernel, initrd, cmdline, append, mem, cpus, timeout, readonly) -> None:
    """Boot a Linux guest with its console on this terminal.

    Without --kernel, the default guest (see `voidbox image build`) is used.
    """
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
    if image is not None:
        raise UsageError(
            f"cannot attach {image!r}: root disks need virtio-blk, which this build does not have yet"
        )
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
        click.echo(f"voidbox: note: {host.SOFTWARE_KVM_NOTE}", err=True)
    sys.exit(int(_run_vm(config)))


def _run_vm(config) -> ExitStatus:
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
    stderr_line(vm.stop_message())
    return vm.stop_reason.exit_status


@main.group()
def image() -> None:
    """Build and inspect the default guest."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the guest is already built.")
def image_build(force: bool) -> None:
    """Build the default guest from Debian packages (no root needed)."""
    from .image import build_default_guest

    guest = build_default_guest(progress=lambda line: click.echo(f"voidbox: {line}", err=True), force=force)
    click.echo(f"kernel  {guest.vmlinux}")
    click.echo(f"initrd  {guest.initrd}")
    click.echo(f"rootfs  {guest.rootfs}")


@main.command()
def doctor() -> None:
    """Report what this host can do: KVM, TAP, QEMU and the default guest."""
    from .doctor import report

    for line in report():
        click.echo(line)
