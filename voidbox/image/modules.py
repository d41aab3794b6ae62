"""Pick the kernel modules the guest needs and the order to load them in.

Debian's kernel package ships ``lib/modules/<ver>/kernel/**.ko`` and ``modules.builtin`` but not
``modules.dep`` (depmod runs in its postinst, which we never run). So dependencies come from
``modules.dep`` when it is there, else from each module's own ``.modinfo`` section, the
``depends=`` string depmod itself reads (Linux `scripts/mod/modpost.c` writes it).
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from voidbox.errors import VoidboxError

# Load order the guest needs, dependencies first (DESIGN.md "Booting a stock distro kernel").
VIRTIO_MODULES = (
    "virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net",
)
# ext4 asks for crc32c through the crypto API ("softdep=pre: crc32c" in its modinfo), which no
# `depends=` records; crc32c_generic is the implementation that works on any CPU.
EXT4_MODULES = ("crc32c_generic", "ext4")
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
MAX_DEPTH = 64  # real dependency chains are a handful deep; deeper means a loop in bad metadata
MAX_MODULE_SIZE = 64 << 20

ELF_MAGIC = b"\x7fELF"
ELF64_EHDR_SIZE = 64
ELF64_SHDR_SIZE = 64
ELFCLASS64 = 2


def module_name(path: str) -> str:
    """`kernel/arch/x86/crypto/crc32c-intel.ko.xz` -> `crc32c_intel` (kmod's normalisation)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def decompress_module(path: Path) -> bytes:
    """The plain ELF of a module; busybox insmod does not undo module compression."""
    name = path.name
    if name.endswith(".ko.xz"):
        data = lzma.decompress(path.read_bytes())
    elif name.endswith(".ko.gz"):
        data = gzip.decompress(path.read_bytes())
    elif name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise VoidboxError(f"{name} is zstd-compressed and the `zstd` command is not installed")
        data = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=True).stdout
    else:
        data = path.read_bytes()
    if not data.startswith(ELF_MAGIC):
        raise VoidboxError(f"kernel module {path} is not an ELF file")
    if len(data) > MAX_MODULE_SIZE:
        raise VoidboxError(f"kernel module {path} is implausibly large ({len(data)} bytes)")
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's `.modinfo` section (ELF64 section headers)."""
    if len(elf) < ELF64_EHDR_SIZE or not elf.startswith(ELF_MAGIC) or elf[4] != ELFCLASS64:
        raise VoidboxError("kernel module is not an ELF64 file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shentsize < ELF64_SHDR_SIZE or shstrndx >= shnum or shoff + shnum * shentsize > len(elf):
        raise VoidboxError("kernel module has a malformed section header table")

    def section(index: int) -> tuple[int, bytes]:
        base = shoff + index * shentsize
        sh_name, _type = struct.unpack_from("<II", elf, base)
        sh_offset, sh_size = struct.unpack_from("<QQ", elf, base + 0x18)
        if sh_offset + sh_size > len(elf):
            raise VoidboxError("kernel module section runs past the end of the file")
        return sh_name, elf[sh_offset:sh_offset + sh_size]

    _, names = section(shstrndx)
    info: dict[str, list[str]] = {}
    for index in range(shnum):
        sh_name, body = section(index)
        if names[sh_name:names.find(b"\0", sh_name)] != b".modinfo":
            continue
        for entry in body.split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


@dataclass(frozen=True)
class KernelModule:
    name: str
    path: Path  # in the extracted package


class ModuleTree:
    """The modules of one extracted kernel: `<root>` is `.../lib/modules/<version>`."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict[str, str] = {}  # name -> path relative to root
        kernel = root / "kernel"
        if kernel.is_dir():
            for path in sorted(kernel.rglob("*.ko*")):
                rel = path.relative_to(root).as_posix()
                if rel.endswith(MODULE_SUFFIXES):
                    self.paths.setdefault(module_name(rel), rel)
        self.builtin = self._read_names(root / "modules.builtin")
        self._deps = self._read_modules_dep(root / "modules.dep")

    @staticmethod
    def _read_names(path: Path) -> set[str]:
        if not path.exists():
            return set()
        return {module_name(line.strip()) for line in path.read_text().splitlines() if line.strip()}

    def _read_modules_dep(self, path: Path) -> dict[str, list[str]] | None:
        """modules.dep lines: `kernel/a.ko: kernel/b.ko kernel/c.ko` (depmod(8))."""
        if not path.exists():
            return None
        deps: dict[str, list[str]] = {}
        for line in path.read_text().splitlines():
            module, sep, rest = line.partition(":")
            if not sep:
                continue
            name = module_name(module.strip())
            self.paths.setdefault(name, module.strip())
            deps[name] = [module_name(dep) for dep in rest.split()]
        return deps

    def depends(self, name: str) -> list[str]:
        if self._deps is not None:
            return self._deps.get(name, [])
        info = modinfo(decompress_module(self.root / self.paths[name]))
        return [dep for value in info.get("depends", []) for dep in value.split(",") if dep]

    def is_module(self, name: str) -> bool:
        return name in self.paths

    def load_order(self, wanted: tuple[str, ...] | list[str]) -> list[KernelModule]:
        """Modules to insmod, each after everything it depends on.

        Built-in modules are left out; a wanted module that is neither built in nor shipped is an
        error, since the guest could not reach its disk or network without it.
        """
        order: list[str] = []
        done: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in done or name in self.builtin:
                return
            if name in chain:
                raise VoidboxError(f"kernel module dependency loop: {' -> '.join(chain + (name,))}")
            if len(chain) > MAX_DEPTH:
                raise VoidboxError(f"kernel module dependencies nest too deep at {name}")
            if name not in self.paths:
                raise VoidboxError(
                    f"kernel module {name} is neither built in nor in {self.root}"
                )
            for dep in self.depends(name):
                visit(dep, chain + (name,))
            done.add(name)
            order.append(name)

        for name in wanted:
            visit(name, ())
        return [KernelModule(name, self.root / self.paths[name]) for name in order]

    def guest_modules(self) -> list[KernelModule]:
        """virtio (block, net) and, when ext4 is not built in, ext4 and its helpers."""
        wanted = list(VIRTIO_MODULES)
        if "ext4" not in self.builtin:
            wanted += [name for name in EXT4_MODULES if name == "ext4" or self.is_module(name)]
        return self.load_order(wanted)
