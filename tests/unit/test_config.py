import os

import pytest

from voidbox.config import DEFAULT_CMDLINE, VmConfig, parse_size
from voidbox.errors import UsageError
from voidbox.layout import MiB


@pytest.mark.parametrize(
    "text,expected",
    [("512", 512 * MiB), ("512M", 512 * MiB), ("2G", 2 << 30), ("1024K", MiB), ("1g", 1 << 30), ("64MiB", 64 * MiB)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-5M", "1.5G", "12X"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return str(path)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mem": "8M"}, "at least"),
        ({"mem": "3M"}, "at least"),
        ({"mem": "2049M"}, "multiple of 2M"),
        ({"cpus": 0}, "--cpus"),
        ({"cpus": 1000}, "--cpus"),
        ({"timeout": 0}, "--timeout"),
        ({"timeout": float("nan")}, "--timeout"),
        ({"timeout": float("inf")}, "--timeout"),
        ({"timeout": float("-inf")}, "--timeout"),
        ({"initrd": "/nonexistent/initrd"}, "does not exist"),
        ({"image": "/"}, "not a regular file"),
    ],
)
def test_bad_values_are_one_line_usage_errors(kernel, kwargs, message):
    with pytest.raises(UsageError) as info:
        VmConfig(kernel=kernel, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_kernel(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        VmConfig(kernel=str(tmp_path / "nope"))


def test_command_line_composition(kernel):
    config = VmConfig(kernel=kernel, append="earlyprintk=serial")
    assert config.command_line() == DEFAULT_CMDLINE + " earlyprintk=serial"
    config = VmConfig(kernel=kernel, cmdline="console=ttyS0", append="quiet")
    assert config.command_line("virtio_mmio.device=4K@0xd0000000:5") == (
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 quiet"
    )


def test_devices_come_from_the_configuration_in_window_order(tmp_path):
    from voidbox.config import DiskSpec, NicSpec

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(512))
    config = VmConfig(kernel=str(kernel), image=str(disk), readonly=True,
                      net=["slirp", "slirp"], mac="02:00:00:00:00:10")
    assert config.devices == [
        DiskSpec(str(disk), True),
        NicSpec("slirp", None, bytes.fromhex("020000000010"), 0),
        NicSpec("slirp", None, bytes.fromhex("020000000011"), 1),
    ]
    assert VmConfig(kernel=str(kernel), net=["none"]).devices == []
    # The default MAC is locally administered, unicast, and the same for the same image.
    mac = VmConfig(kernel=str(kernel), image=str(disk)).devices[1].mac
    assert mac[0] & 0b11 == 0b10 and mac == VmConfig(kernel=str(kernel), image=str(disk)).devices[1].mac


@pytest.mark.parametrize("kwargs, message", [
    ({"mem": 5.5e8}, "mem must be int or str, got float"),
    ({"mem": None}, "mem must be int or str, got NoneType"),
    ({"cpus": True}, "cpus must be int, got bool"),
    ({"cpus": "2"}, "cpus must be int, got str"),
    ({"timeout": "3"}, "timeout must be int or float or None, got str"),
    ({"net": "slirp"}, "net must be a list of card specs, got str"),
    ({"net": [1]}, "each net entry must be str, got int"),
    ({"image": b"disk.img"}, "image must be a path, got bytes"),
    ({"initrd": ["x"]}, "initrd must be a path, got list"),
    ({"mac": 5}, "mac must be str or None, got int"),
    ({"cmdline": b"console=ttyS0"}, "cmdline must be str or None, got bytes"),
    ({"append": None}, "append must be str, got NoneType"),
    ({"serial_log_limit": "x"}, "serial_log_limit must be int, got str"),
    ({"serial_log_limit": -1}, "serial_log_limit must be at least 0, got -1"),
    ({"readonly": "no"}, "readonly must be bool, got str"),
])
def test_wrong_types_from_python_are_usage_errors_naming_the_field(kernel, kwargs, message):
    """VmConfig from Python: a value of the wrong type is the same one-line UsageError a
    bad flag gives, not a TypeError from deep inside the VMM (or, for cpus=True, a VM)."""
    with pytest.raises(UsageError) as info:
        VmConfig(kernel=kernel, **kwargs)
    assert str(info.value) == message


def test_paths_may_be_pathlike(kernel):
    import pathlib
    assert VmConfig(kernel=pathlib.Path(kernel)).kernel == str(kernel)


def test_an_unreadable_directory_on_the_way_is_not_a_missing_file(kernel, monkeypatch):
    """stat's EACCES (a directory on the way the user cannot enter) is said as such: the
    file may well exist. (Root passes every permission check, so stat is made to fail.)"""
    from voidbox import config
    real_stat = os.stat

    def stat_denied(path, *args, **kwargs):
        if os.fspath(path) == str(kernel):
            raise PermissionError(13, "Permission denied", path)
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(config.os, "stat", stat_denied)
    with pytest.raises(UsageError) as info:
        VmConfig(kernel=str(kernel))
    assert str(info.value) == f"kernel {str(kernel)!r}: Permission denied"
