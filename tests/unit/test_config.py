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
