"""The `voidbox` command: a thin click layer over voidbox.Vm and friends.

Exit statuses are those of voidbox.errors.ExitStatus; every error is one line on stderr.
"""

from __future__ import annotations

import math
import sys

import click

from .errors import ExitStatus, VoidboxError
from .launch import BOOT_OPTIONS, boot_command, fail


def main(argv=None) -> None:
    """The click CLI (launch.main is the entry point): every error, click's usage errors
    included, is one line on stderr."""
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
        fail(error)
    except (KeyboardInterrupt, click.Abort):
        click.echo("voidbox: interrupted", err=True)
        sys.exit(int(ExitStatus.SIGINT))
    sys.exit(status if isinstance(status, int) else 0)


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


def _boot_options(command):
    """Click options from the one table the fast path in launch.py parses too."""
    for option in reversed(BOOT_OPTIONS):
        if option.kind is bool:
            command = click.option(option.flag, is_flag=True, help=option.help)(command)
        else:
            command = click.option(
                option.flag, type=FiniteFloat() if option.kind is float else option.kind,
                default=option.default,
                show_default=option.default not in (None, ""), help=option.help,
            )(command)
    return command


@cli.command()
@click.argument("image", required=False)
@_boot_options
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
    """Report what this host can do: KVM, TAP, QEMU and the default guest."""
    from .doctor import report

    for line in report():
        click.echo(line)


@cli.group()
def net() -> None:
    """User-mode networking without a VM."""


# Everything from the first word that is not one of voidbox's options on is COMMAND's, as
# with env, sudo and unshare: `voidbox net run ls -h` lists, and does not print this help.
# An unknown option before that word (or before --) is a usage error, not a command.
@net.command("run", context_settings={"allow_interspersed_args": False}, epilog=(
    "Egress rules (--allow, --deny): CIDR[:PORTS], PORTS a list of ports and ranges, e.g. "
    "10.0.0.0/8:80,443,8000-8100. A rule matches either the address the guest sees "
    "(10.0.2.2 = the gateway, 10.0.2.3 = DNS, other addresses as they are) or the translated "
    "host destination (10.0.2.2 -> 127.0.0.1); the most specific rule matching either wins "
    "(longest prefix, then a rule with ports, then deny). So --deny 10.0.2.2 keeps the "
    "command off the host's loopback, and --deny 0.0.0.0/0 --allow 127.0.0.1 allows only "
    "it. 169.254.0.0/16 is denied unless allowed. DNS at 10.0.2.3:53 is the NAT's own "
    "service and is always served."))
# Numbers are taken as text and parsed strictly by config_from_options: click's int type is
# Python's int(), which takes '1_500', '+80' and ' 80'.
@click.option("--mtu", metavar="N", help="MTU of the namespace's interface (576-65520; default 1500).")
@click.option("--forward", "forwards", multiple=True, metavar="PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT",
              help="Forward a host port into the namespace (repeatable).")
@click.option("--allow", multiple=True, metavar="CIDR[:PORTS]",
              help="Allow egress (repeatable; see egress rules below).")
@click.option("--deny", multiple=True, metavar="CIDR[:PORTS]",
              help="Deny egress (repeatable; see egress rules below).")
@click.option("--dns-upstream", "dns_upstreams", multiple=True, metavar="IP[:PORT]",
              help="Relay 10.0.2.3 to this resolver instead of /etc/resolv.conf's.")
@click.option("--dhcp", is_flag=True, help="Leave addressing to a DHCP client in the namespace.")
@click.option("--offload/--no-offload", default=True, show_default=True,
              help="Checksum and TCP segmentation offload on the namespace's interface.")
@click.option("--max-flows", metavar="N", help="Most flows open at once (default 65536).")
@click.option("--max-conn-rate", metavar="RATE",
              help="New connections per second, e.g. 10 or 2.5 (default unlimited).")
@click.option("--pcap", metavar="FILE",
              help="Write every frame crossing the namespace's interface, both ways, to FILE "
                   "(pcap, mode 0600; replaced if it exists). Captures slow bulk TCP: host "
                   "data then takes the Python path.")
@click.option("--pcap-max-bytes", metavar="N",
              help="Stop capturing, with a note, before FILE grows past N bytes (default "
                   "67108864, 64 MiB).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def net_run(mtu, forwards, allow, deny, dns_upstreams, dhcp, offload, max_flows, max_conn_rate,
            pcap, pcap_max_bytes, command) -> None:
    """Run COMMAND in a network namespace whose only interface is served by the NAT.

    Example: voidbox net run -- curl http://10.0.2.2:8000/ (10.0.2.2 is the host's loopback).
    """
    from .net.run import config_from_options, pcap_from_options, run_in_netns

    config, policy = config_from_options(mtu, forwards, allow, deny, dns_upstreams,
                                         max_flows, max_conn_rate)
    capture = pcap_from_options(pcap, pcap_max_bytes)
    sys.exit(run_in_netns(list(command), config, dhcp=dhcp, policy=policy, offload=offload,
                          pcap=capture))
