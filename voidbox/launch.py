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
    multiple: bool = False  # repeatable: the values in order, as a tuple
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


# The user-mode NAT's options, shared by `boot` and `net run` so the two never drift.
# Numbers stay text here: voidbox.net.options.config_from_options parses them strictly
# (int() and click's int type take '1_500', '+80' and ' 80').
NAT_OPTIONS = (
    Option("--mtu", str, None, "MTU of the guest's interface (576-65520; default 1500).",
           metavar="N"),
    Option("--forward", str, (), "Forward a host port to the guest (repeatable).", True,
           "PROTO:[HOSTADDR:]HOSTPORT:GUESTPORT"),
    Option("--allow", str, (), "Allow egress (repeatable; see egress rules below).", True,
           "CIDR[:PORTS]"),
    Option("--deny", str, (), "Deny egress (repeatable; see egress rules below).", True,
           "CIDR[:PORTS]"),
    Option("--dns-upstream", str, (), "Relay 10.0.2.3 to this resolver instead of "
           "/etc/resolv.conf's (repeatable).", True, "IP[:PORT]"),
    Option("--max-flows", str, None, "Most flows open at once (default 65536).", metavar="N"),
    Option("--max-conn-rate", str, None, "New connections per second, e.g. 10 or 2.5 "
           "(default unlimited).", metavar="RATE"),
    Option("--pcap", str, None, "Write every frame crossing the guest's interface, both "
           "ways, to FILE (pcap, mode 0600; replaced if it exists). Captures slow bulk TCP: "
           "host data then takes the Python path.", metavar="FILE"),
    Option("--pcap-max-bytes", str, None, "Stop capturing, with a note, before FILE grows "
           "past N bytes (default 67108864, 64 MiB).", metavar="N"),
)
NAT_EPILOG = (
    "Egress rules (--allow, --deny): CIDR[:PORTS], PORTS a list of ports and ranges, e.g. "
    "10.0.0.0/8:80,443,8000-8100. A rule matches either the address the guest sees "
    "(10.0.2.2 = the gateway, 10.0.2.3 = DNS, other addresses as they are) or the translated "
    "host destination (10.0.2.2 -> 127.0.0.1); the most specific rule matching either wins "
    "(longest prefix, then a rule with ports, then deny). So --deny 10.0.2.2 keeps the "
    "command off the host's loopback, and --deny 0.0.0.0/0 --allow 127.0.0.1 allows only "
    "it. 169.254.0.0/16 is denied unless allowed. DNS at 10.0.2.3:53 is the NAT's own "
    "service and is always served.")

BOOT_OPTIONS = (
    Option("--kernel", str, None, "Kernel (bzImage or ELF vmlinux)."),
    Option("--initrd", str, None, "Initial ramdisk."),
    Option("--cmdline", str, None, "Replace the default kernel command line."),
    Option("--append", str, "", "Add to the kernel command line."),
    Option("--mem", str, "512M", "Guest memory (K, M, G suffixes)."),
    Option("--cpus", int, 1, "Number of vCPUs."),
    Option("--timeout", float, None, "Stop the VM after this many seconds (exit 3)."),
    Option("--readonly", bool, False, "Attach the disk image read-only."),
    Option("--accel", str, "auto", "Who runs the guest's CPUs: kvm (voidbox's own VMM), "
           "qemu (QEMU's TCG, or its KVM where usable, with voidbox's disk and network "
           "devices over vhost-user) or auto: kvm where /dev/kvm runs an unmodified guest, "
           "else qemu. `voidbox doctor` shows what auto picks.", metavar="auto|kvm|qemu"),
    Option("--net", str, ("slirp",), "A network card and its backend: slirp (the user-mode "
           "NAT, no root needed), tap:NAME (a TAP the user owns, e.g. made by `ip tuntap add "
           "mode tap user USER`, or a new one with CAP_NET_ADMIN) or none (repeatable: one "
           "card each; default one slirp).", True, "slirp|tap:NAME|none"),
    Option("--net-fallback", str, "slirp", "When a tap:NAME cannot be used: slirp serves "
           "the card with the NAT (a line on stderr says why), fail exits 1.",
           metavar="slirp|fail"),
    Option("--stats", bool, False, "Print each network card's counters when the VM stops."),
    Option("--mac", str, None, "The first card's MAC (default: locally administered, stable "
           "for the image or kernel path).", metavar="MAC"),
    *NAT_OPTIONS,
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
        if option is None or (flag in seen and not option.multiple):
            return None
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
            parsed = option.kind(value)
        except ValueError:
            return None
        if option.multiple:
            # The first value replaces the default (click's multiple=True does the same).
            previous = params[option.dest] if flag in seen else ()
            params[option.dest] = (*previous, parsed)
        else:
            params[option.dest] = parsed
        seen.add(flag)
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


def boot_command(image, kernel, initrd, cmdline, append, mem, cpus, timeout, readonly,
                 accel="auto", net=("slirp",), net_fallback="slirp", stats=False, mac=None, mtu=None,
                 forward=(), allow=(), deny=(), dns_upstream=(), max_flows=None,
                 max_conn_rate=None, pcap=None, pcap_max_bytes=None) -> None:
    """`voidbox boot`: build the VM, run it with the console here, exit with its status."""

    nat = policy = capture = None
    if "slirp" in net:
        from .net.options import config_from_options, pcap_from_options

        nat, policy = config_from_options(mtu, forward, allow, deny, dns_upstream, max_flows,
                                          max_conn_rate)
        capture = pcap_from_options(pcap, pcap_max_bytes)
    elif any(v not in (None, ()) for v in (mtu, forward, allow, deny, dns_upstream, max_flows,
                                          max_conn_rate, pcap, pcap_max_bytes)):
        raise UsageError("NAT options (--forward, --allow, --pcap, ...) need a --net slirp card")

    scratch = None
    if kernel is None:
        from .image import default_guest

        guest = default_guest()
        if guest is None:
            raise UsageError("no kernel given and no default guest: run `voidbox image build` or pass --kernel")
        kernel = str(guest.vmlinux)
        if initrd is None:
            initrd = str(guest.initrd)
        if image is None:
            # The default guest's root disk, fresh for each boot: nothing the guest writes
            # outlives it (pass IMAGE to keep a disk), and boots never share a disk.
            import tempfile
            from pathlib import Path

            from .image import scratch_copy

            scratch = tempfile.mkdtemp(prefix="voidbox-root-")
            try:
                image = str(scratch_copy(guest.rootfs, Path(scratch) / "root.ext4"))
            except OSError as error:
                _remove_tree(scratch)
                raise VoidboxError(f"cannot copy the default guest's root disk: {error}") from None
    try:
        _boot(image, kernel, initrd, cmdline, append, mem, cpus, timeout, readonly, accel, net,
              net_fallback, stats, mac, nat, policy, capture)
    finally:
        if scratch is not None:
            _remove_tree(scratch)


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _boot(image, kernel, initrd, cmdline, append, mem, cpus, timeout, readonly, accel, net,
          net_fallback, stats, mac, nat, policy, capture) -> None:
    from . import host
    from .config import VmConfig

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    config = VmConfig(
        kernel=kernel, initrd=initrd, image=image, cmdline=cmdline, append=append, mem=mem,
        cpus=cpus, timeout=timeout, readonly=readonly, console_output=sys.stdout,
        interactive=interactive, net=list(net), net_fallback=net_fallback, mac=mac, nat=nat,
        policy=policy, pcap=capture, accel=accel,
    )
    info = host.kvm_info()
    chosen = host.choose_accel(config.accel, info)
    if config.accel == "auto":
        sys.stderr.write(f"voidbox: accel {chosen.name}: {chosen.reason}\n")
    software_only = chosen.name == "kvm" and info.software_only
    if software_only:
        sys.stderr.write(f"voidbox: note: {host.SOFTWARE_KVM_NOTE}\n")
    sys.exit(int(run_vm(config, software_only, stats, chosen)))


def run_vm(config, software_only: bool = False, stats: bool = False, accel=None) -> ExitStatus:
    from .vm import StopReason, Vm, stderr_line

    if accel is not None and accel.name == "qemu":
        from .qemu import QemuVm

        vm = QemuVm(config, use_kvm=accel.qemu_kvm)
    else:
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
    if stats:
        for card in vm.network_counters():
            name, backend = card.pop("card"), card.pop("backend")
            stderr_line(f"{name} ({backend}): "
                        + " ".join(f"{key}={value}" for key, value in sorted(card.items())))
    if os.environ.get("VOIDBOX_TRACE_STARTUP") and vm.first_run_at is not None:
        stderr_line(f"trace: first-kvm-run {vm.first_run_at:.6f}")
    return vm.stop_reason.exit_status
