"""`voidbox image build`: the default guest, built from Debian packages without root.

Steps (each reported through `progress` and skipped when its output is already there):
1. `apt-get download` Debian's cloud kernel and busybox-static, `dpkg-deb -x` them.
2. Extract the uncompressed ELF vmlinux from the kernel's bzImage (booted through PVH).
3. Write the initramfs (cpio newc, in Python): busybox, the virtio modules, /init.
4. Make the ext4 root image with `mkfs.ext4 -d`.

Every output is written under a temporary name and renamed into place, and `guest.json` is
written last, so an interrupted build never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from voidbox.errors import VoidboxError
from voidbox.image import debian, initramfs, rootfs, vmlinux
from voidbox.image.cpio import CPIO_NEWC_MAGIC
from voidbox.image.modules import ModuleTree, decompress_module

MANIFEST = "guest.json"
MANIFEST_FORMAT = 1
LOCK_FILE = ".lock"
DEBS_DIR = "debs"
ROOTFS_NAME = "rootfs.ext4"
GZIP_MAGIC = b"\x1f\x8b"
EXT4_SUPER_MAGIC = 0xEF53  # s_magic, at byte 56 of the superblock that starts at byte 1024
EXT4_MAGIC_OFFSET = 1024 + 56


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    bzimage: Path  # vmlinuz from the package
    vmlinux: Path  # the uncompressed ELF extracted from it (the default kernel: entered through PVH)
    initrd: Path  # initramfs written by voidbox in Python (cpio newc, uncompressed)
    rootfs: Path  # ext4 root image made with mkfs.ext4 -d
    kernel_version: str


def cache_dir() -> Path:
    """$VOIDBOX_GUEST_DIR, else $XDG_CACHE_HOME/voidbox/guest, else ~/.cache/voidbox/guest."""
    override = os.environ.get("VOIDBOX_GUEST_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "voidbox" / "guest"


def _paths(directory: Path, version: str) -> GuestImage:
    return GuestImage(
        directory=directory,
        bzimage=directory / f"vmlinuz-{version}",
        vmlinux=directory / f"vmlinux-{version}",
        initrd=directory / f"initrd-{version}.img",
        rootfs=directory / ROOTFS_NAME,
        kernel_version=version,
    )


def _starts_with(path: Path, magic: bytes, offset: int = 0) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _valid_bzimage(path: Path) -> bool:
    return _starts_with(path, vmlinux.HEADER_MAGIC, vmlinux.HEADER_MAGIC_OFFSET)


def _valid_vmlinux(path: Path) -> bool:
    return _starts_with(path, vmlinux.ELF_MAGIC)


def _valid_initrd(path: Path) -> bool:
    return _starts_with(path, CPIO_NEWC_MAGIC) or _starts_with(path, GZIP_MAGIC)


def _valid_rootfs(path: Path) -> bool:
    return _starts_with(path, struct.pack("<H", EXT4_SUPER_MAGIC), EXT4_MAGIC_OFFSET)


def default_guest() -> GuestImage | None:
    """The built default guest if it is complete, else None. Builds nothing."""
    directory = cache_dir()
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            return None
        guest = _paths(directory, str(manifest["kernel_version"]))
        sizes = manifest["sizes"]
        for field in ("bzimage", "vmlinux", "initrd", "rootfs"):
            path = getattr(guest, field)
            if path.stat().st_size != sizes[field]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (_valid_bzimage(guest.bzimage) and _valid_vmlinux(guest.vmlinux)
            and _valid_initrd(guest.initrd) and _valid_rootfs(guest.rootfs)):
        return None
    return guest


def scratch_copy(source: Path, target: Path) -> Path:
    """Copy a (sparse) disk image to `target`, only its data extents: the default guest's
    256 MiB root image holds about 10 MiB, so a fresh disk for each boot costs a few ms."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past offset
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), end - start, start, start)
                if copied == 0:
                    raise OSError(f"{source} shrank while being copied")
                start += copied
            offset = end
    return target


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One build at a time per cache directory (parallel test runs share it)."""
    with open(directory / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path`, renamed onto it only if the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    with _atomic(path) as tmp:
        tmp.write_bytes(data)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def build_default_guest(progress: Callable[[str], None] = print,
                        force: bool = False) -> GuestImage:
    """Build (or reuse) the default guest in cache_dir(); see the module docstring.

    Without `force`, a complete guest is returned as is, with no apt look-up, so a newer kernel
    in the archive is picked up only by `force`.
    """
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VoidboxError(f"cannot create the guest cache {directory}: {exc.strerror}") from None
    with _locked(directory):
        if not force:
            built = default_guest()
            if built is not None:
                progress(f"guest already built in {directory} (kernel {built.kernel_version})")
                return built
        return _build(directory, progress, force)


def _build(directory: Path, progress: Callable[[str], None], force: bool) -> GuestImage:
    started = time.monotonic()
    debian.require_tools()
    package, version = debian.kernel_package()
    progress(f"kernel: {package} (via {debian.KERNEL_META_PACKAGE})")
    guest = _paths(directory, version)
    debs = directory / DEBS_DIR
    if force:
        (directory / MANIFEST).unlink(missing_ok=True)
        for path in (guest.bzimage, guest.vmlinux, guest.initrd, guest.rootfs):
            path.unlink(missing_ok=True)
        shutil.rmtree(debs, ignore_errors=True)

    need_kernel = not (_valid_bzimage(guest.bzimage) and _valid_initrd(guest.initrd))
    need_busybox = not (_valid_initrd(guest.initrd) and _valid_rootfs(guest.rootfs))
    with tempfile.TemporaryDirectory(prefix=".build-", dir=directory) as tmp:
        work = Path(tmp)
        kernel_tree = work / "kernel"
        busybox = work / "busybox" / "bin" / "busybox"
        if need_kernel:
            _fetch_and_extract(package, debs, kernel_tree, progress)
        if need_busybox:
            _fetch_and_extract(debian.BUSYBOX_PACKAGE, debs, work / "busybox", progress)
            if not busybox.is_file():
                raise VoidboxError(f"{debian.BUSYBOX_PACKAGE} has no /bin/busybox")

        if _valid_bzimage(guest.bzimage):
            progress(f"bzImage: {guest.bzimage.name} present, skipped")
        else:
            source = kernel_tree / "boot" / f"vmlinuz-{version}"
            if not source.is_file():
                raise VoidboxError(f"{package} has no /boot/vmlinuz-{version}")
            with _atomic(guest.bzimage) as out:
                shutil.copyfile(source, out)
            progress(f"bzImage: {guest.bzimage.name} ({_mb(guest.bzimage.stat().st_size)})")

        if _valid_vmlinux(guest.vmlinux):
            progress(f"vmlinux: {guest.vmlinux.name} present, skipped")
        else:
            t0 = time.monotonic()
            elf = vmlinux.extract_vmlinux(guest.bzimage.read_bytes())
            entry = vmlinux.pvh_entry(elf)
            _write_atomic(guest.vmlinux, elf)
            note = f"PVH entry {entry:#x}" if entry is not None else "no PVH note"
            progress(f"vmlinux: {guest.vmlinux.name} ({_mb(len(elf))} ELF, {note}, "
                     f"{time.monotonic() - t0:.1f} s)")

        if _valid_initrd(guest.initrd):
            progress(f"initramfs: {guest.initrd.name} present, skipped")
        else:
            modules = _initramfs_modules(kernel_tree, version)
            data = initramfs.build_initramfs(busybox.read_bytes(), modules)
            _write_atomic(guest.initrd, data)
            progress(f"initramfs: {guest.initrd.name} ({_mb(len(data))}, modules: "
                     f"{' '.join(m.name for m in modules) or 'none needed'})")

        if _valid_rootfs(guest.rootfs):
            progress(f"root image: {guest.rootfs.name} present, skipped")
        else:
            with _atomic(guest.rootfs) as out:
                rootfs.build_rootfs(busybox, out, work)
            progress(f"root image: {guest.rootfs.name} (ext4, {rootfs.ROOTFS_SIZE}, "
                     f"{_mb(guest.rootfs.stat().st_blocks * 512)} used on disk)")

    manifest = {
        "format": MANIFEST_FORMAT,
        "kernel_version": version,
        "kernel_package": package,
        "sizes": {field: getattr(guest, field).stat().st_size
                  for field in ("bzimage", "vmlinux", "initrd", "rootfs")},
    }
    _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")
    _remove_stale(directory, guest, package)
    progress(f"guest ready in {directory} ({time.monotonic() - started:.1f} s)")
    return guest


def _fetch_and_extract(package: str, debs: Path, dest: Path,
                       progress: Callable[[str], None]) -> None:
    deb = debian.cached_deb(package, debs)
    if deb is not None:
        progress(f"using cached {deb.name}")
        dest.mkdir(parents=True)
        try:
            debian.extract(deb, dest)
            return
        except VoidboxError as exc:
            # Damaged after it was cached (downloads are renamed in whole): fetch it again.
            progress(f"cached {deb.name} is unusable ({exc}); downloading it again")
            deb.unlink()
            shutil.rmtree(dest)
    t0 = time.monotonic()
    deb = debian.download(package, debs)
    progress(f"downloaded {deb.name} ({_mb(deb.stat().st_size)}, {time.monotonic() - t0:.1f} s)")
    dest.mkdir(parents=True)
    debian.extract(deb, dest)


def _initramfs_modules(kernel_tree: Path, version: str) -> list[initramfs.InitramfsModule]:
    root = kernel_tree / "lib" / "modules" / version
    if not root.is_dir():
        raise VoidboxError(f"the kernel package has no lib/modules/{version}")
    tree = ModuleTree(root)
    return [
        initramfs.InitramfsModule(
            module.name,
            initramfs.guest_module_path(version, module.path.relative_to(root).as_posix()),
            decompress_module(module.path),
        )
        for module in tree.guest_modules()
    ]


def _remove_stale(directory: Path, guest: GuestImage, package: str) -> None:
    """Outputs of other kernel versions and leftovers of interrupted builds."""
    keep = {guest.bzimage, guest.vmlinux, guest.initrd}
    for pattern in ("vmlinuz-*", "vmlinux-*", "initrd-*.img", ".*.tmp"):
        for path in directory.glob(pattern):
            if path not in keep and path.is_file():
                path.unlink(missing_ok=True)
    for path in (directory / DEBS_DIR).glob("linux-image-*.deb"):
        if not path.name.startswith(f"{package}_"):
            path.unlink(missing_ok=True)
