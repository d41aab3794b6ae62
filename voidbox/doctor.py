"""`voidbox doctor`: what this host can do, in a few lines a user can act on."""

from __future__ import annotations

import os
import subprocess

from . import host


def _kvm_lines() -> list[str]:
    info = host.kvm_info()
    if not info.present:
        return [f"kvm:     missing ({info.reason}); voidbox cannot run VMs on this host"]
    if not info.usable:
        return [f"kvm:     present but unusable: {info.reason}"]
    try:
        from ._kvm import Kvm

        kvm = Kvm()
        api = f"API {kvm.api_version}"
        kvm.close()
    except Exception as error:  # noqa: BLE001 - doctor reports, never crashes
        return [f"kvm:     {host.KVM_DEVICE} cannot be opened: {error}"]
    if info.software_only:
        return [
            f"kvm:     software-only ({info.module}, {api}): every guest instruction is emulated",
            "         with --accel kvm an unmodified Linux guest gets through its early boot only",
            "         (tiny guests and the KVM plumbing work); --accel qemu boots it fully",
        ]
    return [f"kvm:     hardware-assisted ({info.module}, {api})"]


def _tap_lines() -> list[str]:
    tun = os.path.exists("/dev/net/tun")
    if not tun:
        return ["tap:     /dev/net/tun is missing: TAP networking unavailable (slirp still works)"]
    if host.can_create_tap():
        return ["tap:     can create TAP devices (CAP_NET_ADMIN)"]
    return ["tap:     no CAP_NET_ADMIN: TAP needs root or a pre-created device; slirp works"]


def _qemu_lines() -> list[str]:
    qemu = host.qemu_binary()
    if qemu is None:
        return [f"qemu:    not found (--accel qemu needs it: install {host.QEMU_PACKAGE})"]
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10)
        version = out.stdout.splitlines()[0] if out.stdout else "unknown version"
    except (OSError, subprocess.TimeoutExpired):
        version = "version unknown"
    return [f"qemu:    {qemu} ({version})"]


def _guest_lines() -> list[str]:
    from .image import cache_dir, default_guest

    guest = default_guest()
    if guest is None:
        return [f"guest:   not built (run `voidbox image build`; cache {cache_dir()})"]
    return [f"guest:   {guest.directory} (kernel {guest.kernel_version})"]


def _accel_lines() -> list[str]:
    """What `voidbox boot --accel auto` would pick here, and why."""
    from .errors import VoidboxError

    try:
        accel = host.choose_accel("auto")
    except VoidboxError as error:
        return [f"accel:   auto cannot boot an unmodified guest here: {error}"]
    return [f"accel:   auto picks {accel.name}: {accel.reason}"]


def _sandbox_lines() -> list[str]:
    """What the backend sandbox (voidbox.sandbox) gets here: each piece the host offers,
    then what a throwaway child actually applied when it entered the sandbox."""
    from . import sandbox

    lines = []
    for piece in sandbox.support():
        lines.append(f"         {piece.name}: {'yes' if piece.ok else 'NO'}, {piece.detail}")
    result = sandbox.trial()
    if isinstance(result, str):
        head = f"sandbox: cannot be entered here: {result} (net run needs --no-sandbox)"
    elif result.missing:
        head = (f"sandbox: partial, this host lacks {', '.join(result.missing)}; "
                f"a trial applied: {_trial_summary(result)}")
    else:
        head = f"sandbox: complete; a trial applied: {_trial_summary(result)}"
    return [head, *lines]


def _trial_summary(applied) -> str:
    # The trial's pid and rlimits are its own: what a backend gets is the rest.
    ns = ",".join(applied.namespaces) or "none"
    return (f"namespaces {ns}, {'an empty root' if applied.empty_root else 'the host root'}, "
            f"{'no capabilities' if applied.capabilities_dropped else 'capabilities kept'}, "
            f"{'no_new_privs' if applied.no_new_privs else 'no no_new_privs'}, "
            f"seccomp {applied.seccomp or 'none'} ({applied.syscalls} system calls allowed)")


def report() -> list[str]:
    return (_kvm_lines() + _tap_lines() + _qemu_lines() + _accel_lines() + _sandbox_lines()
            + _guest_lines())
