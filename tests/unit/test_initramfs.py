"""The default guest's pieces: module order, the initramfs archive, /init, the root image."""

import lzma
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.requires import missing, requires
from voidbox.errors import VoidboxError
from voidbox.image import debian, initramfs, rootfs
from voidbox.image.modules import (
    EXT4_MODULES,
    VIRTIO_MODULES,
    ModuleTree,
    decompress_module,
    modinfo,
    module_name,
)

VERSION = "6.1.0-99-cloud-amd64"
BUSYBOX = shutil.which("busybox")


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev), parsed straight from buffer-format.rst."""
    members = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        start = pos + 110 + namesize
        start += -start % 4
        pos = start + size + (-(start + size) % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, data[start:start + size], rdev)


def module_elf(name: str, depends: str) -> bytes:
    """A minimal ELF64 relocatable with .modinfo and .shstrtab sections, as modpost emits."""
    info = f"license=GPL\0depends={depends}\0name={name}\0vermagic={VERSION} SMP\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    strtab_off = info_off + len(info)
    shoff = strtab_off + len(shstrtab)
    shoff += -shoff % 8
    ehdr = bytearray(64)
    ehdr[0:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<QQ", ehdr, 0x20, 0, shoff)
    struct.pack_into("<HHHHH", ehdr, 0x36, 0, 0, 64, 3, 2)  # phentsize phnum shentsize shnum shstrndx
    sections = bytes(64)  # SHN_UNDEF
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, info_off, len(info), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, strtab_off, len(shstrtab), 0, 0, 1, 0)
    body = bytes(ehdr) + info + shstrtab
    return body + bytes(shoff - len(body)) + sections


# What Debian 12's cloud kernel ships (modinfo depends=), plus ext4's helpers as modules.
DEPENDS = {
    "drivers/virtio/virtio_ring": "",
    "drivers/virtio/virtio": "virtio_ring",
    "drivers/virtio/virtio_mmio": "virtio,virtio_ring",
    "drivers/block/virtio_blk": "virtio,virtio_ring",
    "net/core/failover": "",
    "drivers/net/net_failover": "failover",
    "drivers/net/virtio_net": "net_failover,virtio,virtio_ring",
    "lib/crc16": "",
    "fs/mbcache": "",
    "fs/jbd2/jbd2": "",
    "crypto/crc32c_generic": "",
    "fs/ext4/ext4": "mbcache,jbd2,crc16",
    "drivers/net/dummy": "",
}


def make_tree(tmp_path, *, builtin=("ext4", "jbd2", "mbcache", "crc16"), modules_dep=False,
              compress=()):
    root = tmp_path / "lib" / "modules" / VERSION
    for stem, deps in DEPENDS.items():
        name = stem.rsplit("/", 1)[-1]
        if name in builtin:
            continue
        path = root / "kernel" / f"{stem}.ko"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = module_elf(name, deps)
        if name in compress:
            path = path.with_name(path.name + ".xz")
            data = lzma.compress(data)
        path.write_bytes(data)
    (root / "modules.builtin").write_text(
        "".join(f"kernel/{s}.ko\n" for s in DEPENDS if s.rsplit("/", 1)[-1] in builtin)
    )
    if modules_dep:
        lines = []
        for stem, deps in DEPENDS.items():
            if stem.rsplit("/", 1)[-1] in builtin:
                continue
            by_name = {s.rsplit("/", 1)[-1]: s for s in DEPENDS}
            dep_paths = " ".join(f"kernel/{by_name[d]}.ko" for d in deps.split(",") if d)
            lines.append(f"kernel/{stem}.ko: {dep_paths}".rstrip())
        (root / "modules.dep").write_text("\n".join(lines) + "\n")
    return ModuleTree(root)


def assert_dependency_order(names):
    for stem, deps in DEPENDS.items():
        name = stem.rsplit("/", 1)[-1]
        if name in names:
            for dep in filter(None, deps.split(",")):
                if dep in names:
                    assert names.index(dep) < names.index(name), f"{dep} after {name}"


# -- kernel modules ----------------------------------------------------------------------


def test_module_name_normalisation():
    assert module_name("kernel/arch/x86/crypto/crc32c-intel.ko.xz") == "crc32c_intel"
    assert module_name("kernel/drivers/net/virtio_net.ko") == "virtio_net"
    assert module_name("kernel/fs/ext4/ext4.ko.zst") == "ext4"


def test_modinfo_reads_depends():
    info = modinfo(module_elf("virtio_net", "net_failover,virtio,virtio_ring"))
    assert info["depends"] == ["net_failover,virtio,virtio_ring"]
    assert info["name"] == ["virtio_net"]


def test_modinfo_rejects_garbage():
    with pytest.raises(VoidboxError):
        modinfo(b"\x7fELF\x02" + bytes(10))
    bad = bytearray(module_elf("x", ""))
    struct.pack_into("<Q", bad, 0x28, 1 << 40)  # e_shoff far past the end
    with pytest.raises(VoidboxError, match="malformed"):
        modinfo(bytes(bad))


@pytest.mark.parametrize("modules_dep", [False, True], ids=["modinfo", "modules.dep"])
def test_virtio_order_ext4_builtin(tmp_path, modules_dep):
    tree = make_tree(tmp_path, modules_dep=modules_dep)
    names = [m.name for m in tree.guest_modules()]
    assert names == list(VIRTIO_MODULES)  # the order DESIGN.md gives, and nothing more
    assert_dependency_order(names)


@pytest.mark.parametrize("modules_dep", [False, True], ids=["modinfo", "modules.dep"])
def test_ext4_as_module_brings_its_dependencies(tmp_path, modules_dep):
    tree = make_tree(tmp_path, builtin=(), modules_dep=modules_dep)
    names = [m.name for m in tree.guest_modules()]
    assert set(names) == set(VIRTIO_MODULES) | set(EXT4_MODULES) | {"jbd2", "mbcache", "crc16"}
    assert "dummy" not in names
    assert_dependency_order(names)


def test_extra_dependency_in_modules_dep_is_included(tmp_path):
    tree = make_tree(tmp_path, modules_dep=True)
    dep = tree.root / "modules.dep"
    dep.write_text(dep.read_text().replace(
        "kernel/drivers/block/virtio_blk.ko:", "kernel/drivers/block/virtio_blk.ko: kernel/drivers/net/dummy.ko"
    ))
    names = [m.name for m in ModuleTree(tree.root).guest_modules()]
    assert names.index("dummy") < names.index("virtio_blk")


def test_compressed_modules_are_found_and_decompressed(tmp_path):
    tree = make_tree(tmp_path, compress=("virtio_net", "virtio_ring"))
    modules = {m.name: m for m in tree.guest_modules()}
    assert modules["virtio_net"].path.name == "virtio_net.ko.xz"
    assert decompress_module(modules["virtio_net"].path).startswith(b"\x7fELF")
    assert initramfs.guest_module_path(VERSION, "kernel/drivers/net/virtio_net.ko.xz") == (
        f"lib/modules/{VERSION}/kernel/drivers/net/virtio_net.ko"
    )


def test_missing_module_is_an_error(tmp_path):
    tree = make_tree(tmp_path)
    (tree.root / "kernel/drivers/net/virtio_net.ko").unlink()
    with pytest.raises(VoidboxError, match="virtio_net is neither built in"):
        ModuleTree(tree.root).guest_modules()


def test_dependency_loop_is_an_error(tmp_path):
    tree = make_tree(tmp_path, modules_dep=True)
    dep = tree.root / "modules.dep"
    dep.write_text(dep.read_text().replace(
        "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko", 1
    ))
    with pytest.raises(VoidboxError, match="loop"):
        ModuleTree(tree.root).guest_modules()


# -- initramfs -----------------------------------------------------------------------------


def sample_modules(tmp_path):
    tree = make_tree(tmp_path)
    return [
        initramfs.InitramfsModule(
            m.name,
            initramfs.guest_module_path(VERSION, m.path.relative_to(tree.root).as_posix()),
            decompress_module(m.path),
        )
        for m in tree.guest_modules()
    ]


def test_init_script_loads_in_order_and_has_markers(tmp_path):
    modules = sample_modules(tmp_path)
    script = initramfs.init_script(modules)
    assert script.startswith("#!/bin/sh\n")
    positions = [script.index(f"load /{m.archive_path} {m.name}\n") for m in modules]
    assert positions == sorted(positions)
    assert script.index("load /") < script.index(initramfs.MARKER_MODULES_LOADED)
    for text in (initramfs.MARKER_SWITCHING_ROOT, initramfs.MARKER_NO_ROOT_SHELL,
                 "voidbox.shell=1", "voidbox.poweroff=1", "exec switch_root /newroot /sbin/init",
                 "mount -t devtmpfs", "setsid cttyhack sh", "poweroff -f"):
        assert text in script
    assert "@" not in script  # every placeholder filled


def test_init_script_refuses_odd_paths():
    with pytest.raises(ValueError):
        initramfs.init_script([initramfs.InitramfsModule("x", "lib/modules/$(reboot).ko", b"")])


@pytest.mark.parametrize("compress", [False, True])
def test_archive_contents(tmp_path, compress):
    modules = sample_modules(tmp_path)
    data = initramfs.build_initramfs(b"\x7fELFbusybox", modules, compress=compress)
    if compress:
        import gzip
        assert data[:2] == b"\x1f\x8b"
        data = gzip.decompress(data)
    members = read_newc(data)
    mode, body, _ = members["init"]
    assert stat.S_ISREG(mode) and mode & 0o111
    assert body.decode() == initramfs.init_script(modules)
    mode, _, rdev = members["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    assert members["bin/busybox"][1] == b"\x7fELFbusybox"
    for applet in initramfs.INIT_APPLETS:
        mode, target, _ = members[f"bin/{applet}"]
        assert stat.S_ISLNK(mode) and target == b"busybox"
    for module in modules:
        assert members[module.archive_path][1] == module.data
    names = list(members)
    for name in names:  # each parent directory precedes its children
        parent = name.rpartition("/")[0]
        assert not parent or names.index(parent) < names.index(name)


@requires(BUSYBOX is not None, "needs busybox to check the scripts")
def test_scripts_parse_and_applets_exist():
    applets = set(subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split())
    assert set(initramfs.INIT_APPLETS) <= applets
    assert set(rootfs.SCRIPT_APPLETS) <= applets
    for script in (initramfs.init_script([]), rootfs.sbin_init(), rootfs.UDHCPC_SCRIPT):
        result = subprocess.run([BUSYBOX, "sh", "-n"], input=script, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr


@requires(BUSYBOX is not None, "needs busybox to run the udhcpc hook")
def test_udhcpc_script_writes_resolv_conf(tmp_path):
    """Run the hook with `ip` stubbed out, as udhcpc would call it on a lease."""
    # A shell function, since busybox sh may prefer its own applets to anything on PATH.
    stub = f'ip() {{ echo "$@" >> {tmp_path}/ip.log; }}\n'
    script = stub + rootfs.UDHCPC_SCRIPT.replace("/etc/resolv.conf", str(tmp_path / "resolv.conf"))
    env = {"PATH": "/usr/bin:/bin", "interface": "eth0", "ip": "10.0.2.15",
           "mask": "24", "router": "10.0.2.2", "dns": "10.0.2.3", "domain": "example"}
    # In a network namespace of its own: if the stub ever stopped shadowing `ip`, the hook
    # would reconfigure this host's interface (it once did).
    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) to isolate the hook from the host network")
    subprocess.run(["unshare", "--net", "--map-root-user", BUSYBOX, "sh", "-c", script,
                    "udhcpc.script", "bound"], env=env, check=True, timeout=30)
    assert (tmp_path / "resolv.conf").read_text() == "search example\nnameserver 10.0.2.3\n"
    log = (tmp_path / "ip.log").read_text()
    assert "addr add 10.0.2.15/24 dev eth0" in log
    assert "route add default via 10.0.2.2 dev eth0" in log


# -- root image ----------------------------------------------------------------------------


@requires(BUSYBOX is not None
          and (shutil.which("debugfs") is not None or Path("/usr/sbin/debugfs").exists()),
          "needs busybox and e2fsprogs (mkfs.ext4, debugfs)")
def test_root_image(tmp_path):
    image = tmp_path / "root.ext4"
    rootfs.build_rootfs(Path(BUSYBOX), image, tmp_path)
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"

    def ask(request):
        return subprocess.run([debugfs, "-R", request, str(image)], capture_output=True,
                              text=True, check=True).stdout

    assert rootfs.MARKER_ROOT_UP in ask("cat /sbin/init")
    assert "Device major/minor number: 05:01" in ask("stat /dev/console")
    assert "Type: character special" in ask("stat /dev/console")
    assert "root:x:0:0:" in ask("cat /etc/passwd")
    assert "Fast link dest: \"/bin/busybox\"" in ask("stat /sbin/udhcpc")
    for path in ("/bin/busybox", "/sbin/init", "/etc/passwd", "/"):
        assert "User:     0   Group:     0" in ask(f"stat {path}"), path
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


# -- Debian packages -------------------------------------------------------------------------


def test_parse_kernel_depends():
    text = ("linux-image-cloud-amd64\n  Depends: <linux-image-virtual>\n"
            "  Depends: linux-image-6.1.0-57-cloud-amd64\n")
    assert debian.parse_kernel_depends(text) == ("linux-image-6.1.0-57-cloud-amd64",
                                                 "6.1.0-57-cloud-amd64")
    unsigned = "x\n |Depends: linux-image-6.1.0-57-cloud-amd64-unsigned\n"
    assert debian.parse_kernel_depends(unsigned) == (
        "linux-image-6.1.0-57-cloud-amd64-unsigned", "6.1.0-57-cloud-amd64"
    )
    with pytest.raises(VoidboxError, match="depends on no"):
        debian.parse_kernel_depends("linux-image-cloud-amd64\n  Depends: linux-base\n")


# -- the whole build, offline: fake apt tools serving synthetic packages ----------------------


def fake_debs(tmp_path) -> Path:
    """A kernel .deb (synthetic bzImage and modules) and a busybox-static .deb (host busybox)."""
    from tests.unit.test_vmlinux import bzimage, fake_elf, lz4_legacy

    debs = tmp_path / "archive"
    debs.mkdir()
    kernel = tmp_path / "kernel-tree"
    make_tree(kernel)
    elf = fake_elf()
    (kernel / "boot").mkdir()
    (kernel / "boot" / f"vmlinuz-{VERSION}").write_bytes(bzimage(lz4_legacy(elf), len(elf)))
    box = tmp_path / "busybox-tree"
    (box / "bin").mkdir(parents=True)
    shutil.copyfile(BUSYBOX, box / "bin" / "busybox")
    (box / "bin" / "busybox").chmod(0o755)
    for tree, package, version in ((kernel, f"linux-image-{VERSION}", "6.1.999-1"),
                                   (box, "busybox-static", "1:1.35.0-4")):
        (tree / "DEBIAN").mkdir()
        (tree / "DEBIAN" / "control").write_text(
            f"Package: {package}\nVersion: {version}\nArchitecture: amd64\n"
            "Maintainer: test <test@example.invalid>\nDescription: test package\n"
        )
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(tree),
                        str(debs / f"{package}_{version.replace(':', '%3a')}_amd64.deb")],
                       capture_output=True, check=True)
    return debs


def fake_apt(tmp_path, debs: Path, *, lists: bool = True) -> Path:
    """apt-cache and apt-get stand-ins on a private PATH; apt-get logs each download."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    depends = f"  Depends: linux-image-{VERSION}" if lists else ""
    (bindir / "apt-cache").write_text(
        "#!/bin/sh\n"
        + (f'echo "$2"\necho "{depends}"\n' if lists else 'echo "E: No packages found" >&2\n')
    )
    (bindir / "apt-get").write_text(
        "#!/bin/sh\n"
        f'echo "$3" >> {tmp_path}/downloads.log\n'
        + (f'cp {debs}/"$3"_*.deb . || exit 100\n' if lists else
           'echo "E: Unable to locate package $3" >&2; exit 100\n')
    )
    for tool in ("apt-cache", "apt-get"):
        (bindir / tool).chmod(0o755)
    return bindir


needs_build_tools = requires(
    BUSYBOX is not None and shutil.which("dpkg-deb") is not None
    and bool(shutil.which("mkfs.ext4") or Path("/usr/sbin/mkfs.ext4").exists()),
    "needs busybox, dpkg-deb and e2fsprogs",
)


@needs_build_tools
def test_build_offline_then_reuse_then_rebuild_one_step(tmp_path, monkeypatch):
    import voidbox.image as image

    bindir = fake_apt(tmp_path, fake_debs(tmp_path))
    monkeypatch.setenv("PATH", f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin")
    monkeypatch.setenv("VOIDBOX_GUEST_DIR", str(tmp_path / "guest"))
    assert image.cache_dir() == tmp_path / "guest"
    assert image.default_guest() is None

    messages = []
    guest = image.build_default_guest(progress=messages.append)
    assert guest.kernel_version == VERSION
    assert image.default_guest() == guest
    from tests.unit.test_vmlinux import fake_elf
    assert guest.vmlinux.read_bytes() == fake_elf()
    members = read_newc(guest.initrd.read_bytes())
    assert f"lib/modules/{VERSION}/kernel/drivers/net/virtio_net.ko" in members
    assert members["bin/busybox"][1] == Path(BUSYBOX).read_bytes()
    assert (tmp_path / "downloads.log").read_text().split() == [
        f"linux-image-{VERSION}", "busybox-static"
    ]
    assert not list(guest.directory.glob(".*.tmp")) and not list(guest.directory.glob(".build-*"))

    messages.clear()
    assert image.build_default_guest(progress=messages.append) == guest
    assert messages == [f"guest already built in {guest.directory} (kernel {VERSION})"]

    # A lost initramfs is rebuilt from the cached .deb; the other outputs are kept.
    guest.initrd.unlink()
    assert image.default_guest() is None
    vmlinux_inode = guest.vmlinux.stat().st_ino
    messages.clear()
    assert image.build_default_guest(progress=messages.append) == guest
    assert guest.vmlinux.stat().st_ino == vmlinux_inode
    assert any(m.startswith("vmlinux:") and "skipped" in m for m in messages)
    assert any(m.startswith("using cached linux-image-") for m in messages)
    assert len((tmp_path / "downloads.log").read_text().split()) == 2  # nothing fetched again
    assert image.default_guest() == guest


@needs_build_tools
def test_damaged_cached_deb_is_fetched_again(tmp_path, monkeypatch):
    import voidbox.image as image

    bindir = fake_apt(tmp_path, fake_debs(tmp_path))
    monkeypatch.setenv("PATH", f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin")
    monkeypatch.setenv("VOIDBOX_GUEST_DIR", str(tmp_path / "guest"))
    guest = image.build_default_guest(progress=lambda message: None)
    (deb,) = (guest.directory / "debs").glob("linux-image-*.deb")
    deb.write_bytes(deb.read_bytes()[:1000])
    guest.initrd.unlink()
    messages = []
    assert image.build_default_guest(progress=messages.append) == guest
    assert any("is unusable" in m for m in messages)
    assert (tmp_path / "downloads.log").read_text().split().count(f"linux-image-{VERSION}") == 2


@needs_build_tools
def test_build_without_package_lists_says_apt_get_update(tmp_path, monkeypatch):
    import voidbox.image as image

    bindir = fake_apt(tmp_path, tmp_path, lists=False)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin")
    monkeypatch.setenv("VOIDBOX_GUEST_DIR", str(tmp_path / "guest"))
    with pytest.raises(VoidboxError, match="apt-get update"):
        image.build_default_guest(progress=lambda message: None)


def test_build_without_apt_says_pass_kernel_and_initrd(tmp_path, monkeypatch):
    import voidbox.image as image

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing in it
    monkeypatch.setenv("VOIDBOX_GUEST_DIR", str(tmp_path / "guest"))
    with pytest.raises(VoidboxError, match="--kernel and --initrd"):
        image.build_default_guest(progress=lambda message: None)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    import voidbox.image as image

    monkeypatch.delenv("VOIDBOX_GUEST_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert image.cache_dir() == tmp_path / "xdg" / "voidbox" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert image.cache_dir() == tmp_path / "home" / ".cache" / "voidbox" / "guest"
    monkeypatch.setenv("VOIDBOX_GUEST_DIR", str(tmp_path / "mine"))
    assert image.cache_dir() == tmp_path / "mine"
