"""VM configuration: what the user asked for, validated before anything is built.

Every check here turns bad input into a one-line `UsageError` (exit status 2).
"""

from __future__ import annotations

import math
import os
import re
import stat

from ._records import dataclass, field, named_tuple
from .errors import UsageError
from .layout import MIN_MEM, MiB

MAX_CPUS = 255
MAX_NICS = 4  # virtio-mmio windows left after the disk (layout.VIRTIO_MMIO_*)  # one xAPIC ID per vCPU, and the IOAPIC takes the next one
MAX_MEM = 1 << 40
NET_FALLBACKS = ("slirp", "fail")
NET_ISOLATIONS = ("process", "none")
ACCELS = ("auto", "kvm", "qemu")

DEFAULT_CMDLINE = (
    "console=ttyS0 reboot=k panic=-1 pci=off nomodeset "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": MiB, "K": 1 << 10, "M": MiB, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a memory size: "512M", "2G", "1024K"; a bare number means MiB (as QEMU's -m)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"invalid size {text!r}: use a number with an optional K, M, G or T suffix")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def _existing_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path!r} does not exist") from None
    except OSError as e:  # EACCES on a directory on the way, ENOTDIR, ELOOP, ...
        raise UsageError(f"{what} {path!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path!r} is not readable")
    return path


def _check_type(name: str, value, types, none: bool = False) -> None:
    """UsageError unless value is one of types (a bool is never taken for a number)."""
    if value is None and none:
        return
    bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                          else (types,))
    if bad_bool or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise UsageError(f"{name} must be {wanted}{' or None' if none else ''}, "
                         f"got {type(value).__name__}")


@named_tuple
class DiskSpec:
    """A virtio-blk disk: a raw image file."""

    path: str
    readonly: bool


@named_tuple
class NicSpec:
    """A virtio-net card: its backend ("slirp", "tap" or "vhost-user"), the TAP's name or
    the vhost-user socket's path, its MAC, and its index."""

    backend: str
    tap: str | None  # tap: the TAP's name; vhost-user: the backend's socket path
    mac: bytes
    index: int


@dataclass
class VmConfig:
    """Everything needed to build a VM. `validate()` runs on construction."""

    kernel: str | None = None
    initrd: str | None = None
    image: str | None = None  # root disk (virtio-blk, once that device lands)
    cmdline: str | None = None  # replaces the default command line entirely
    append: str = ""  # added to the command line
    mem: int = 512 * MiB
    cpus: int = 1
    timeout: float | None = None
    readonly: bool = False
    # Console: serial output goes to `console_output` (a binary file object or a path);
    # None keeps it only in the VM's in-memory log. Input comes from `console_input`
    # (a file descriptor) when `interactive` is set.
    console_output: object = None
    interactive: bool = False
    serial_log_limit: int = 4 * MiB
    # Network cards, one per entry: "slirp" (the user-mode NAT), "tap:NAME" or "none".
    net: list[str] = field(default_factory=lambda: ["slirp"])
    # When a tap:NAME card's TAP cannot be used: "slirp" serves it with the NAT (one line
    # on stderr says so), "fail" stops the VM with that line.
    net_fallback: str = "slirp"
    mac: str | None = None  # the first NIC's MAC; default: stable per kernel/image path
    nat: object = None  # voidbox.net.config.NatConfig for slirp NICs (default layout)
    policy: object = None  # voidbox.net.policy.Policy for slirp NICs (default rules)
    pcap: object = None  # voidbox.net.pcap.PcapSpec: capture the first NIC's frames
    # Who runs the guest's CPUs: "kvm" (voidbox's own VMM), "qemu" (QEMU, with voidbox's
    # devices over vhost-user) or "auto" (kvm where it runs an unmodified guest, else
    # qemu: voidbox.host.choose_accel). voidbox.new_vm() honours it.
    accel: str = "auto"
    # A vhost-user card whose backend went away retries its socket and comes back up.
    net_reconnect: bool = False
    # Where a slirp or tap card's backend runs: "process" (a child `voidbox net serve`
    # over vhost-user, voidbox.vhost_user.child) or "none" (inside the VMM's process).
    net_isolation: str = "process"
    # That process enters voidbox.sandbox before it reads a frame (--no-sandbox: not).
    net_sandbox: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self._check_types()
        self.mem = parse_size(self.mem)
        if self.mem < MIN_MEM:
            got = f"{self.mem // MiB}M" if self.mem >= MiB else f"{self.mem} bytes"
            raise UsageError(f"--mem must be at least {MIN_MEM // MiB}M, got {got}")
        if self.mem > MAX_MEM:
            raise UsageError(f"--mem {self.mem >> 30}G is larger than voidbox supports (1T)")
        if self.mem % (2 * MiB):
            raise UsageError("--mem must be a multiple of 2M")
        if not isinstance(self.cpus, int) or not 1 <= self.cpus <= MAX_CPUS:
            raise UsageError(f"--cpus must be between 1 and {MAX_CPUS}, got {self.cpus}")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise UsageError(f"--timeout must be a positive, finite number of seconds, got {self.timeout}")
        if self.kernel is None:
            raise UsageError("no kernel: pass --kernel PATH or build the default guest")
        _existing_file(self.kernel, "kernel")
        _existing_file(self.initrd, "initrd")
        _existing_file(self.image, "disk image")
        if self.accel not in ACCELS:
            raise UsageError(f"bad --accel {self.accel!r}: expected auto, kvm or qemu")
        if self.net_isolation not in NET_ISOLATIONS:
            raise UsageError(f"bad --net-isolation {self.net_isolation!r}: expected process or none")
        if self.net_fallback not in NET_FALLBACKS:
            raise UsageError(f"bad --net-fallback {self.net_fallback!r}: expected slirp or fail")
        self.nics = self._parse_nics()

    def _check_types(self) -> None:
        """From Python a field can hold anything: the wrong type is a UsageError naming
        the field, as a bad flag is, not a TypeError from deep inside the VMM."""
        for name in ("kernel", "initrd", "image"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    raise UsageError(f"{name} must be a path, got {type(value).__name__}")
                value = os.fspath(value)
                if not isinstance(value, str):
                    raise UsageError(f"{name} must be a str path, got {type(value).__name__}")
                setattr(self, name, value)
        _check_type("cmdline", self.cmdline, str, none=True)
        _check_type("append", self.append, str)
        _check_type("mem", self.mem, (int, str))
        _check_type("cpus", self.cpus, int)
        _check_type("timeout", self.timeout, (int, float), none=True)
        _check_type("readonly", self.readonly, bool)
        _check_type("interactive", self.interactive, bool)
        _check_type("serial_log_limit", self.serial_log_limit, int)
        if self.serial_log_limit < 0:
            raise UsageError(f"serial_log_limit must be at least 0, got {self.serial_log_limit}")
        _check_type("mac", self.mac, str, none=True)
        for name in ("accel", "net_fallback", "net_isolation"):
            _check_type(name, getattr(self, name), str)
        if self.net is not None:
            if isinstance(self.net, str) or not isinstance(self.net, (list, tuple)):
                raise UsageError(f"net must be a list of card specs, got {type(self.net).__name__}")
            for spec in self.net:
                _check_type("each net entry", spec, str)

    @property
    def devices(self) -> list[DiskSpec | NicSpec]:
        """The virtio devices, in the order they take MMIO windows: the disk first (the
        guest's vda), then the network cards in --net order."""
        disks = [DiskSpec(self.image, self.readonly)] if self.image is not None else []
        return [*disks, *(NicSpec(kind, name, mac, index)
                          for index, (kind, name, mac) in enumerate(self.nics))]

    def _parse_nics(self) -> list[tuple[str, str | None, bytes]]:
        """(kind, tap name, MAC) per NIC that exists (`none` adds no card)."""
        specs = [parse_net_spec(spec) for spec in (self.net or ["none"])]
        if ("none", None) in specs and len(specs) > 1:
            raise UsageError("--net none cannot be combined with other --net values")
        nics = [spec for spec in specs if spec[0] != "none"]
        if len(nics) > MAX_NICS:
            raise UsageError(f"at most {MAX_NICS} network cards, got {len(nics)}")
        base = parse_mac_address(self.mac) if self.mac else default_mac(self.image or self.kernel)
        return [(kind, name, base[:5] + bytes([(base[5] + i) & 0xFF]))
                for i, (kind, name) in enumerate(nics)]

    def command_line(self, extra_devices: str = "") -> str:
        base = self.cmdline if self.cmdline is not None else DEFAULT_CMDLINE
        parts = [base.strip(), extra_devices.strip(), self.append.strip()]
        return " ".join(p for p in parts if p)


def parse_mac_address(text: str) -> bytes:
    """'02:00:00:ab:cd:ef' -> 6 bytes: a unicast address (the group bit is clear)."""
    parts = text.split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
        raise UsageError(f"bad --mac {text!r}: expected six hex pairs such as 02:00:00:12:34:56")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise UsageError(f"bad --mac {text!r}: a multicast address cannot be a NIC's")
    return mac


def default_mac(seed: str | None) -> bytes:
    """A locally administered unicast MAC (IEEE 802: bit 1 of the first octet set, bit 0
    clear), the same for the same image or kernel path, so DHCP leases and neighbour
    caches see one machine across boots."""
    try:  # the interpreter's own SHA-256: hashlib loads OpenSSL, ~3 ms of every boot
        from _sha256 import sha256  # Python 3.11
    except ImportError:
        from hashlib import sha256

    digest = sha256(os.path.abspath(seed or "voidbox").encode()).digest()
    return bytes([0x02, *digest[:4], digest[4] & 0xF0])


def parse_net_spec(spec: str) -> tuple[str, str | None]:
    """'slirp' | 'none' | 'tap:NAME' | 'vhost-user:SOCKET' -> (kind, TAP name or socket path
    or None); UsageError otherwise."""
    kind, sep, name = spec.partition(":")
    if kind in ("slirp", "none") and not sep:
        return kind, None
    # IFNAMSIZ is 16 with the NUL; a name is one path component of /sys/class/net.
    if kind == "tap" and sep and 0 < len(name) < 16 and "/" not in name and name.isprintable():
        return kind, name
    if kind == "vhost-user" and sep and name:
        import stat

        try:
            mode = os.stat(name).st_mode
        except OSError as error:
            raise UsageError(f"--net {spec}: {error.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"--net {spec}: not a unix socket")
        return kind, name
    raise UsageError(f"bad --net {spec!r}: expected slirp, none, tap:NAME or vhost-user:SOCKET")
