"""The `voidbox` command: a thin click layer over voidbox.Vm and friends.

Exit statuses are those of voidbox.errors.ExitStatus; every error is one line on stderr.
"""

from __future__ import annotations

import math
import sys

import click

from .commands import boot_command, fail
from .errors import ExitStatus, VoidboxError
from .options import BOOT_OPTIONS, NAT_EPILOG, NAT_OPTIONS, SANDBOX_OPTIONS


def main(argv=None) -> None:
    """The click CLI (launch.main is the entry point): every error, click's usage errors
    included, is one line on stderr."""
    try:
        try:
            status = cli.main(args=argv, prog_name="voidbox", standalone_mode=False)
        except SystemExit as done:
            # click ends a write into a pipe whose reader left (EPIPE) with status 1.
            if done.code == 1 and _stdout_reader_gone():
                sys.exit(int(ExitStatus.SIGPIPE))
            raise
    except click.UsageError as error:
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx else ""
        click.echo(f"voidbox: error: {error.format_message()}{hint}", err=True)
        sys.exit(int(ExitStatus.USAGE))
    except click.ClickException as error:
        click.echo(f"voidbox: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except VoidboxError as error:
        fail(error)
    except (KeyboardInterrupt, click.Abort):
        click.echo("voidbox: interrupted", err=True)
        sys.exit(int(ExitStatus.SIGINT))
    except OSError as error:
        if not _written_by_echo(error):
            raise
        # --help, --version or doctor into a full disk or /dev/full: one line, not the
        # traceback of click's echo. A pipe whose reader left stays quiet, with the status
        # a shell shows for a tool SIGPIPE stopped (Python ignores SIGPIPE itself).
        _stdout_to_devnull()
        if isinstance(error, BrokenPipeError):
            sys.exit(int(ExitStatus.SIGPIPE))
        click.echo(f"voidbox: error: cannot write to standard output: "
                   f"{error.strerror or error}", err=True)
        sys.exit(int(ExitStatus.ERROR))
    sys.exit(status if isinstance(status, int) else 0)


def _written_by_echo(error: OSError) -> bool:
    """Whether the error is click.echo's write failing (output, not the command's work)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (tb is not None and tb.tb_frame.f_code.co_name == "echo"
            and tb.tb_frame.f_globals.get("__name__") == "click.utils")


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe or socket nobody reads any more (poll(2) reports
    POLLERR on a pipe's write end once its read end is closed, POLLHUP on a socket whose
    peer has gone)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP)
                   for _fd, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _stdout_to_devnull() -> None:
    """Point standard output at /dev/null, so the interpreter's exit does not fail again
    on whatever is still buffered for it (Python's advice for SIGPIPE)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    finally:
        os.close(devnull)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="voidbox")
def cli() -> None:
    """voidbox: disposable KVM micro-VMs with user-mode networking."""


class FiniteFloat(click.types.FloatParamType):
    """A float option value; nan and inf (which float() accepts) are usage errors."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _options(table):
    """Click options from one of options.py's tables (the fast path parses the same)."""

    def decorate(command):
        for option in reversed(table):
            if option.switch is not None:
                command = click.option(option.flag, default=option.default,
                                       help=option.help)(command)
                continue
            if option.kind is bool:
                command = click.option(option.flag, is_flag=True, help=option.help)(command)
                continue
            command = click.option(
                option.flag, type=FiniteFloat() if option.kind is float else option.kind,
                default=option.default, multiple=option.multiple, metavar=option.metavar,
                show_default=option.default not in (None, "", ()), help=option.help,
            )(command)
        return command

    return decorate


@cli.command(epilog=NAT_EPILOG)
@click.argument("image", required=False)
@_options(BOOT_OPTIONS)
def boot(**params) -> None:
    """Boot a Linux guest with its console on this terminal.

    Without --kernel, the default guest (see `voidbox image build`) is used.
    """
    boot_command(**params)


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
    """Report what this host can do: KVM, TAP, QEMU, the backend sandbox and the default
    guest."""
    from .doctor import report

    for line in report():
        click.echo(line)


@cli.group()
def net() -> None:
    """User-mode networking without a VM."""


@net.command("serve", epilog=NAT_EPILOG)
@click.option("--vhost-user", "socket_path", metavar="SOCKET",
              help="Serve the card as a vhost-user backend on this unix socket (mode 0600).")
# voidbox boot's own: the card's backend as a child process (voidbox.vhost_user.child).
@click.option("--vmm-fd", type=click.IntRange(0), hidden=True)
@click.option("--backend", default="slirp", show_default=True, metavar="slirp|tap:NAME",
              help="What carries the card's frames: the user-mode NAT, or a TAP the user owns "
              "(or a new one, with CAP_NET_ADMIN).")
@click.option("--net-fallback", default="slirp", show_default=True,
              type=click.Choice(["slirp", "fail"]),
              help="When the TAP cannot be used: serve the card with the NAT (one line says "
              "why) or exit 1.")
@_options(NAT_OPTIONS)
@_options(SANDBOX_OPTIONS)
def net_serve(socket_path, vmm_fd, backend, net_fallback, mtu, forward, allow, deny, host_loopback,
              dns_upstream, max_flows, max_conn_rate, pcap, pcap_max_bytes, ipv6,
              no_sandbox) -> None:
    """Serve a virtio-net card to one vhost-user frontend at a time (e.g. QEMU).

    Runs until SIGINT or SIGTERM. Example: voidbox net serve --vhost-user /tmp/net.sock
    """
    if vmm_fd is not None:
        from .vhost_user.child import main as serve_for_vmm

        serve_for_vmm(vmm_fd)
    if socket_path is None:
        raise click.UsageError("Missing option '--vhost-user'.")
    from .net.options import config_from_options, pcap_from_options
    from .vhost_user.serve import serve_net

    config, policy = config_from_options(mtu, forward, allow, deny, dns_upstream,
                                         max_flows, max_conn_rate, host_loopback, ipv6)
    sys.exit(serve_net(socket_path, config, policy, pcap_from_options(pcap, pcap_max_bytes),
                       backend=backend, fallback=net_fallback, sandbox=not no_sandbox))


@cli.group()
def blk() -> None:
    """Disks without a VM."""


@blk.command("serve")
@click.option("--vhost-user", "socket_path", required=True, metavar="SOCKET",
              help="Serve the disk as a vhost-user backend on this unix socket (mode 0600).")
@click.option("--readonly", is_flag=True, help="Open the image read-only and offer VIRTIO_BLK_F_RO.")
@click.argument("image")
def blk_serve(socket_path, readonly, image) -> None:
    """Serve IMAGE (a raw disk image) as a virtio-blk disk to one vhost-user frontend at a
    time (e.g. QEMU's vhost-user-blk). The image is locked while served and synced at exit.

    Runs until SIGINT or SIGTERM. Example: voidbox blk serve --vhost-user /tmp/blk.sock disk.img
    """
    from .vhost_user.serve import serve_blk

    sys.exit(serve_blk(socket_path, image, readonly))


# Everything from the first word that is not one of voidbox's options on is COMMAND's, as
# with env, sudo and unshare: `voidbox net run ls -h` lists, and does not print this help.
# An unknown option before that word (or before --) is a usage error, not a command.
@net.command("run", context_settings={"allow_interspersed_args": False}, epilog=NAT_EPILOG)
@_options(NAT_OPTIONS)
@_options(SANDBOX_OPTIONS)
@click.option("--dhcp", is_flag=True, help="Leave addressing to a DHCP client in the namespace.")
@click.option("--offload/--no-offload", default=True, show_default=True,
              help="Checksum and TCP segmentation offload on the namespace's interface.")
@click.option("--stats", is_flag=True, help="Print the NAT's counters when COMMAND exits.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def net_run(mtu, forward, allow, deny, host_loopback, dns_upstream, dhcp, offload, stats,
            max_flows, max_conn_rate, pcap, pcap_max_bytes, ipv6, no_sandbox, command) -> None:
    """Run COMMAND in a network namespace whose only interface is served by the NAT.

    Example: voidbox net run --allow 10.0.2.2:8000 -- curl http://10.0.2.2:8000/ (10.0.2.2
    is the host's loopback, closed unless allowed or --host-loopback).
    """
    from .net.run import config_from_options, pcap_from_options, run_in_netns

    config, policy = config_from_options(mtu, forward, allow, deny, dns_upstream,
                                         max_flows, max_conn_rate, host_loopback, ipv6)
    capture = pcap_from_options(pcap, pcap_max_bytes)
    counters: dict | None = {} if stats else None
    status = run_in_netns(list(command), config, dhcp=dhcp, policy=policy, offload=offload,
                          pcap=capture, stats=counters, sandbox=not no_sandbox)
    if counters:
        line = " ".join(f"{k}={v}" for k, v in sorted(counters.get("counters", {}).items()))
        click.echo(f"voidbox: net run: {line}", err=True)
    sys.exit(status)
