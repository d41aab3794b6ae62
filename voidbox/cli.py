"""The `voidbox` command: a thin click layer over voidbox.Vm and friends.

Exit statuses are those of voidbox.errors.ExitStatus; every error is one line on stderr.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from .errors import ExitStatus, UsageError, VoidboxError


def _fail(error: VoidboxError) -> None:
    click.echo(f"voidbox: error: {error}", err=True)
    sys.exit(int(error.exit_status))


def main(argv=None) -> None:
    """Entry point: every error, click's usage errors included, is one line on stderr."""
    try:
        status = cli.main(args=argv, prog_name="voidbox", standalone_mode=False)
    except click.UsageError as error:
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx else ""
        click.echo(f"voidbox: error: {error.format_message()}{hint}", err=True)
        sys.exit(int(ExitStatus.USAGE))
    except click.ClickException as error:
        click.echo(f"voidbox: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except VoidboxError as error:
        _fail(error)
    except (KeyboardInterrupt, click.Abort):
        click.echo("voidbox: interrupted", err=True)
        sys.exit(int(ExitStatus.SIGINT))
    sys.exit(status if isinstance(status, int) else 0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="voidbox")
def cli() -> None:
    """voidbox: disposable KVM micro-VMs with user-mode networking."""


@cli.command()
@click.argument("image", required=False)
@click.option("--kernel", help="Kernel (bzImage or ELF vmlinux).")
@click.option("--initrd", help="Initial ramdisk.")
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
    sys.exit(int(_run_vm(config, info.software_only)))


def _run_vm(config, software_only: bool = False) -> ExitStatus:
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


@cli.group()
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


@cli.command()
def doctor() -> None:
    """Report what this host can do: KVM, TAP, QEMU and the default guest."""
    from .doctor import report

    for line in report():
        click.echo(line)


@cli.group()
def net() -> None:
    """User-mode networking without a VM."""


@net.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--mtu", type=int, help="MTU of the namespace's interface (576-65520; default 1500).")
@click.option("--forward", "forwards", multiple=True, metavar="PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT",
              help="Forward a host port into the namespace (repeatable).")
@click.option("--allow", multiple=True, metavar="CIDR[:PORTS]", help="Allow egress (repeatable).")
@click.option("--deny", multiple=True, metavar="CIDR[:PORTS]", help="Deny egress (repeatable).")
@click.option("--dns-upstream", "dns_upstreams", multiple=True, metavar="IP[:PORT]",
              help="Relay 10.0.2.3 to this resolver instead of /etc/resolv.conf's.")
@click.option("--dhcp", is_flag=True, help="Leave addressing to a DHCP client in the namespace.")
@click.option("--max-flows", type=click.IntRange(1), default=65536, show_default=True)
@click.option("--max-conn-rate", type=click.FloatRange(min=0, min_open=True),
              help="New connections per second (default unlimited).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def net_run(mtu, forwards, allow, deny, dns_upstreams, dhcp, max_flows, max_conn_rate, command) -> None:
    """Run COMMAND in a network namespace whose only interface is served by the NAT.

    Example: voidbox net run -- curl http://10.0.2.2:8000/ (10.0.2.2 is the host's loopback).
    """
    from .net.run import config_from_options, run_in_netns

    config, policy = config_from_options(mtu, forwards, allow, deny, dns_upstreams)
    config.max_flows = max_flows
    config.max_conn_rate = max_conn_rate
    sys.exit(run_in_netns(list(command), config, dhcp=dhcp, policy=policy))
