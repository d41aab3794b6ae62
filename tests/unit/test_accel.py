"""--accel auto|kvm|qemu: what voidbox.host.choose_accel picks for each kind of host, and
the one line `boot` prints about it."""

from __future__ import annotations

import os
import pathlib
import stat
import tempfile

import pytest

from tests.requires import requires
from voidbox import host
from voidbox.config import VmConfig
from voidbox.errors import UsageError, VoidboxError

HARDWARE = host.KvmInfo(True, True, False, "kvm_intel", "")
SOFTWARE = host.KvmInfo(True, True, True, "kvm_pvm", "")
MISSING = host.KvmInfo(False, False, False, "", "/dev/kvm does not exist")
LOCKED = host.KvmInfo(True, False, False, "kvm_amd", "/dev/kvm is not readable and writable by this user")


@pytest.fixture
def qemu(monkeypatch):
    """Set whether qemu-system-x86_64 is installed."""

    def installed(present: bool) -> None:
        monkeypatch.setattr(host, "qemu_binary", lambda: "/usr/bin/qemu-system-x86_64" if present else None)

    return installed


@pytest.mark.parametrize("info, want, qemu_kvm", [
    (HARDWARE, "kvm", False),
    (SOFTWARE, "qemu", False),
    (MISSING, "qemu", False),
    (LOCKED, "qemu", False),
])
def test_auto_takes_kvm_only_where_it_runs_an_unmodified_guest(qemu, info, want, qemu_kvm):
    qemu(True)
    accel = host.choose_accel("auto", info)
    assert (accel.name, accel.qemu_kvm) == (want, qemu_kvm)
    assert accel.reason  # the line boot prints says why


def test_qemu_uses_kvm_itself_where_kvm_is_hardware_assisted(qemu):
    qemu(True)
    assert host.choose_accel("qemu", HARDWARE).qemu_kvm
    assert not host.choose_accel("qemu", SOFTWARE).qemu_kvm


@pytest.mark.parametrize("requested", ["auto", "qemu"])
def test_missing_qemu_names_the_package(qemu, requested):
    qemu(False)
    with pytest.raises(VoidboxError, match=f"install the {host.QEMU_PACKAGE} package"):
        host.choose_accel(requested, SOFTWARE)


def test_kvm_where_there_is_none_is_an_error_with_the_reason(qemu):
    qemu(True)
    with pytest.raises(VoidboxError, match="does not exist"):
        host.choose_accel("kvm", MISSING)
    # Software-only KVM is taken when asked for (tiny guests and the KVM plumbing run there).
    assert host.choose_accel("kvm", SOFTWARE).name == "kvm"


def test_accel_is_validated_with_the_rest_of_the_configuration(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    with pytest.raises(UsageError, match="bad --accel 'tcg'"):
        VmConfig(kernel=str(kernel), accel="tcg")
    assert VmConfig(kernel=str(kernel)).accel == "auto"


# ---- --accel qemu's runtime directory ------------------------------------------------------

def _run_dir_with(monkeypatch, xdg):
    from voidbox import qemu
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    path = qemu._make_run_dir()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert len(os.fsencode(path / "console.sock")) <= qemu.SUN_PATH_MAX
        return path
    finally:
        path.rmdir()


def test_the_runtime_directory_is_made_in_xdg_runtime_dir(tmp_path, monkeypatch):
    assert _run_dir_with(monkeypatch, tmp_path).parent == tmp_path


@pytest.mark.parametrize("xdg", ["/proc", "/nonexistent", "LONG"])
def test_an_unusable_xdg_runtime_dir_falls_back_to_the_temporary_directory(tmp_path,
                                                                           monkeypatch, xdg):
    """/proc takes no directory (even from root), a missing one is skipped, and one whose
    socket paths would not fit sun_path is left: none ends in a traceback."""
    if xdg == "LONG":
        xdg = tmp_path / ("x" * 100)
        xdg.mkdir()
    path = _run_dir_with(monkeypatch, xdg)
    assert path.parent == pathlib.Path(tempfile.gettempdir())
    if isinstance(xdg, pathlib.Path):
        assert list(xdg.iterdir()) == []  # the too-long attempt was removed


def test_no_usable_runtime_directory_is_one_error(monkeypatch):
    from voidbox import qemu

    def refuse(prefix, dir=None):
        raise PermissionError(13, "Permission denied", dir or "/tmp")
    monkeypatch.setattr(qemu.tempfile, "mkdtemp", refuse)
    with pytest.raises(VoidboxError) as info:
        qemu._make_run_dir()
    assert str(info.value).startswith("cannot make a runtime directory for QEMU's sockets (")


def _not_used_as_xdg_runtime_dir(monkeypatch, shared: pathlib.Path) -> None:
    path = _run_dir_with(monkeypatch, shared)
    assert path.parent == pathlib.Path(tempfile.gettempdir())
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_an_xdg_runtime_dir_others_may_write_is_not_used(tmp_path, monkeypatch, mode):
    """Anyone who may rename entries there could swap the directory for one of theirs
    before QEMU connects: the temporary directory is used instead."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    _not_used_as_xdg_runtime_dir(monkeypatch, shared)


@requires(os.geteuid() == 0, "needs root to give a directory to another user")
def test_an_xdg_runtime_dir_another_user_owns_is_not_used(tmp_path, monkeypatch):
    shared = tmp_path / "theirs"
    shared.mkdir()
    shared.chmod(0o700)
    os.chown(shared, 65534, 65534)  # nobody
    _not_used_as_xdg_runtime_dir(monkeypatch, shared)
