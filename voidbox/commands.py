"""The body of `voidbox boot`: build the configuration, pick who runs the CPUs, run the
VM with the console here and exit with its status. Both ways into it (launch.py's fast
path and cli.py's click command) call boot_command with the same parameters.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

from .errors import ExitStatus, UsageError, VoidboxError


def fail(error: VoidboxError) -> None:
    sys.stderr.write(f"voidbox: error: {error}\n")
    sys.exit(int(error.exit_status))


def boot_command(image, kernel, initrd, cmdline, append, mem, cpus, timeout, readonly,
                 accel="auto", net=("slirp",), net_fallback="slirp", net_reconnect=False,
                 net_isolation="process", no_sandbox=False, stats=False, mac=None, mtu=None,
                 forward=(), allow=(), deny=(), host_loopback=False, dns_upstream=(), max_flows=None,
                 max_conn_rate=None, pcap=None, pcap_max_bytes=None, ipv6=True) -> None:
    """`voidbox boot`: build the VM, run it with the console here, exit with its status."""

    nat = policy = capture = None
    if "slirp" in net:
        from .net.options import config_from_options, pcap_from_options

        nat, policy = config_from_options(mtu, forward, allow, deny, dns_upstream, max_flows,
                                          max_conn_rate, host_loopback, ipv6)
        capture = pcap_from_options(pcap, pcap_max_bytes)
    elif host_loopback or any(v not in (None, ()) for v in (
            mtu, forward, allow, deny, dns_upstream, max_flows, max_conn_rate, pcap,
            pcap_max_bytes)) or not ipv6:
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
              net_fallback, net_reconnect, net_isolation, not no_sandbox, stats, mac, nat, policy,
              capture)
    finally:
        if scratch is not None:
            _remove_tree(scratch)


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _boot(image, kernel, initrd, cmdline, append, mem, cpus, timeout, readonly, accel, net,
          net_fallback, net_reconnect, net_isolation, net_sandbox, stats, mac, nat, policy,
          capture) -> None:
    from . import host
    from .config import VmConfig

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    config = VmConfig(
        kernel=kernel, initrd=initrd, image=image, cmdline=cmdline, append=append, mem=mem,
        cpus=cpus, timeout=timeout, readonly=readonly, console_output=sys.stdout,
        interactive=interactive, net=list(net), net_fallback=net_fallback,
        net_reconnect=net_reconnect, net_isolation=net_isolation, net_sandbox=net_sandbox,
        mac=mac, nat=nat,
        policy=policy, pcap=capture, accel=accel,
    )
    if net_isolation == "none" and any(n[0] in ("slirp", "tap") for n in config.nics):
        sys.stderr.write("voidbox: --net-isolation none: the network backend runs inside the "
                         "VMM, with its rights and memory\n")
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
        if not gc.isenabled():
            # launch.py stopped the collector for the start-up: what the start-up made
            # lives as long as the VM, so it is set aside (never scanned again) and
            # collection resumes.
            gc.freeze()
            gc.enable()
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
