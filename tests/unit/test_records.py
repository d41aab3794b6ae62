"""voidbox._records.dataclass makes the same classes as dataclasses.dataclass, for the
subset the boot path uses, and the boot path's modules no longer import dataclasses
(nor, with _records.named_tuple, typing).

Each shape below is declared twice, once with each decorator, and the two must behave
alike: construction, defaults and factories, repr, equality, hashing, frozen assignment,
slots, inheritance, __post_init__, pattern matching, pickling, and the dataclasses
functions (fields, replace, asdict, is_dataclass) on the result.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import typing

import pytest

from voidbox import _records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shapes(dc, field):
    """The same classes, made by the decorator `dc` with its `field`."""

    @dc(frozen=True, slots=True)
    class Exit:
        """A frozen slotted value, as the vCPU exits are."""

        port: int
        data: bytes

    @dc(frozen=True, slots=True)
    class Empty:
        """No fields at all."""

    @dc(frozen=True, slots=True)
    class Unknown:
        reason: int

    @dc(frozen=True, slots=True)
    class Malformed(Unknown):
        detail: str

    @dc
    class Config:
        kernel: str
        mem: str = "512M"
        net: list[str] = field(default_factory=lambda: ["slirp"])
        notes: list[str] = field(default_factory=list)
        cpus: int = field(default=1)

        def __post_init__(self):
            if self.cpus < 1:
                raise ValueError("cpus")

    @dc(frozen=True)
    class Rule:
        network: str
        ports: tuple | None
        allow: bool

    @dc
    class Regs:
        rax: int = 0
        rip: int = 0

    return {"Exit": Exit, "Empty": Empty, "Unknown": Unknown, "Malformed": Malformed,
            "Config": Config, "Rule": Rule, "Regs": Regs}


REAL = shapes(dataclasses.dataclass, dataclasses.field)
OURS = shapes(_records.dataclass, _records.field)

CASES = [
    ("Exit", (0x3F8, b"x"), {}),
    ("Empty", (), {}),
    ("Unknown", (7,), {}),
    ("Malformed", (7, "bad size"), {}),
    ("Config", ("vmlinux",), {}),
    ("Config", ("vmlinux", "64M"), {"net": ["none"], "cpus": 2}),
    ("Rule", ("10.0.0.0/8", ((80, 80),), True), {}),
    ("Regs", (), {"rip": 0x100000}),
]


def both(name, args, kwargs):
    return REAL[name](*args, **kwargs), OURS[name](*args, **kwargs)


def norm(text: str) -> str:
    return text.replace("shapes.<locals>.", "")


@pytest.mark.parametrize(("name", "args", "kwargs"), CASES)
def test_values_behave_alike(name, args, kwargs):
    real, ours = both(name, args, kwargs)
    assert norm(repr(ours)) == norm(repr(real))
    again = OURS[name](*args, **kwargs)
    assert ours == again and not (ours != again)
    assert ours != real  # another class: never equal, as between two dataclasses
    real_hash = type(real).__hash__ is not None
    assert (type(ours).__hash__ is not None) == real_hash
    if real_hash:
        assert hash(ours) == hash(again)
    assert dataclasses.is_dataclass(ours) and dataclasses.is_dataclass(type(ours))
    assert [(f.name, f.type) for f in dataclasses.fields(ours)] == \
        [(f.name, f.type) for f in dataclasses.fields(real)]
    assert dataclasses.asdict(ours) == dataclasses.asdict(real)
    assert dataclasses.astuple(ours) == dataclasses.astuple(real)
    assert type(ours).__match_args__ == type(real).__match_args__
    assert hasattr(ours, "__dict__") == hasattr(real, "__dict__")
    assert getattr(type(ours), "__slots__", None) == getattr(type(real), "__slots__", None)


@pytest.mark.parametrize("name", ["Exit", "Malformed", "Rule"])
def test_frozen_values_refuse_assignment_alike(name):
    args = next(a for n, a, _ in CASES if n == name)
    for value in both(name, args, {}):
        field = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, 1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(value, field)
        if hasattr(value, "__dict__"):
            with pytest.raises(dataclasses.FrozenInstanceError):
                value.other = 1
        else:  # refused; Python 3.11's dataclasses raise TypeError here, from super()
            with pytest.raises((AttributeError, TypeError)):
                value.other = 1


def test_replace_defaults_factories_and_post_init():
    real, ours = both("Config", ("vmlinux",), {})
    assert ours.net == ["slirp"] and ours.notes == [] and ours.cpus == 1
    assert ours.net is not OURS["Config"]("k").net  # a fresh list from the factory each time
    assert norm(repr(dataclasses.replace(ours, mem="1G"))) == \
        norm(repr(dataclasses.replace(real, mem="1G")))
    with pytest.raises(ValueError, match="cpus"):
        OURS["Config"]("k", cpus=0)
    with pytest.raises(ValueError, match="cpus"):
        dataclasses.replace(ours, cpus=0)
    assert OURS["Config"].mem == REAL["Config"].mem == "512M"
    assert not hasattr(OURS["Config"], "net") and not hasattr(REAL["Config"], "net")
    assert OURS["Config"].cpus == REAL["Config"].cpus == 1
    assert repr(_records.replace(ours, mem="1G")) == repr(dataclasses.replace(ours, mem="1G"))
    with pytest.raises(TypeError):
        _records.replace(ours, nonsense=1)
    with pytest.raises(TypeError):
        OURS["Config"]()
    with pytest.raises(TypeError):
        OURS["Exit"](1, b"", 3)


def test_match_and_inheritance():
    Unknown, Exit = OURS["Unknown"], OURS["Exit"]
    value = OURS["Malformed"](7, "bad")
    assert isinstance(value, Unknown)
    match value:
        case Unknown(reason):
            assert reason == 7
        case _:
            pytest.fail("no match")
    match Exit(0x3F8, b"x"):
        case Exit(port=0x3F8, data=data):
            assert data == b"x"
        case _:
            pytest.fail("no match")


def test_frozen_slotted_values_pickle():
    # Local classes cannot be pickled by reference; the exits module's can.
    from voidbox.exits import IoExit, MalformedExit

    for value in (IoExit(0x3F8, 1, True, 1, b"x"), MalformedExit(2, "bad size")):
        assert pickle.loads(pickle.dumps(value)) == value


def test_bad_declarations_are_refused_alike():
    for dc, fld in ((dataclasses.dataclass, dataclasses.field), (_records.dataclass, _records.field)):
        with pytest.raises(TypeError):
            @dc
            class Order:
                a: int = 0
                b: int

        with pytest.raises(ValueError):
            @dc
            class Mutable:
                a: list = []  # noqa: RUF012

        with pytest.raises(ValueError):
            fld(default=1, default_factory=list)


def test_the_boot_path_imports_neither_dataclasses_nor_inspect_nor_logging():
    # What `voidbox boot` imports before its first KVM_RUN (launch.py's fast path).
    code = (
        "import sys\n"
        "import voidbox.launch, voidbox.net.options, voidbox.config, voidbox.host, voidbox.vm\n"
        "import voidbox.exits, voidbox.vcpu, voidbox.kvm_types, voidbox.boot.loader\n"
        "import voidbox.boot.acpi, voidbox.memory, voidbox.net.backend, voidbox.net.engine\n"
        "import voidbox.net.pcap, voidbox.net.policy, voidbox.eventloop, voidbox.cpuid\n"
        "print(sorted(m for m in ('dataclasses', 'inspect', 'logging') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@_records.named_tuple
class Plain:
    """A named tuple made without typing."""

    flag: str
    default: object = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-")


class Typed(typing.NamedTuple):
    """A named tuple made without typing."""

    flag: str
    default: object = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-")


def test_named_tuple_makes_what_typing_named_tuple_makes():
    a, b = Plain("--x"), Typed("--x")
    assert (a, a.dest, repr(a)[5:], a._fields, a._field_defaults) == (
        b, b.dest, repr(b)[5:], b._fields, b._field_defaults)
    assert a._replace(default=1) == ("--x", 1) and hash(a) == hash(b)
    assert Plain.__doc__ == Typed.__doc__ and Plain.__qualname__ == "Plain"
    assert pickle.loads(pickle.dumps(Plain("--y", 2))) == Plain("--y", 2)
    with pytest.raises(TypeError):
        Plain()
    with pytest.raises(TypeError, match="without a default follows"):
        @_records.named_tuple
        class Bad:
            a: int = 0
            b: int


def test_the_default_boot_path_does_not_import_typing():
    # `voidbox boot` with its card's NAT in a child process (the default): typing costs
    # ~3 ms of its start-up (~6 ms with the re and contextlib it brings).
    code = (
        "import sys\n"
        "import voidbox.launch, voidbox.commands, voidbox.options, voidbox.net.options\n"
        "import voidbox.net.policy, voidbox.config, voidbox.host, voidbox.vm, voidbox._kvm\n"
        "import voidbox.boot.loader, voidbox.boot.acpi, voidbox.memory, voidbox.console\n"
        "import voidbox.devices.serial, voidbox.devices.i8042, voidbox.devices.acpi_pm\n"
        "import voidbox.vhost_user.child, voidbox.vhost_user.frontend, voidbox.virtio.mmio\n"
        "import voidbox.cards, voidbox.eventloop, voidbox.ring, voidbox.cpuid, voidbox.vcpu\n"
        "print('typing' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": ROOT})
    assert out.stdout.strip() == "False"


def test_init_is_compiled_by_the_first_instance_and_behaves_the_same():
    # __init__ is compiled when the first instance is made (start-up imports many classes
    # and makes few); a bad first call fails as any call would, and leaves it working.
    @_records.dataclass(frozen=True)
    class Point:
        x: int
        y: int = 0

    with pytest.raises(TypeError, match="missing 1 required positional argument: 'x'") as first:
        Point()
    with pytest.raises(TypeError) as again:
        Point()
    assert str(first.value) == str(again.value)
    assert Point(1) == Point(x=1, y=0) and Point.__init__.__qualname__.endswith("Point.__init__")


def test_the_card_s_backend_process_does_not_import_typing():
    # `voidbox net serve --vmm-fd` (the default card's NAT) starts beside every boot: its
    # start-up takes CPU from the VM's own on a busy host.
    code = (
        "import sys\n"
        "import voidbox.vhost_user.child, voidbox.cards, voidbox.net.backend, voidbox.net.engine\n"
        "import voidbox.net.tcp_nat, voidbox.vhost_user.backend, voidbox.vhost_user.serve\n"
        "import voidbox.sandbox, voidbox.net.netns, voidbox.eventloop, voidbox.net.policy\n"
        "print('typing' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": ROOT})
    assert out.stdout.strip() == "False"
