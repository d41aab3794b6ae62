"""The start-up fast path parses `voidbox boot` exactly as click would, or leaves it to click."""

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voidbox.cli import cli
from voidbox.options import BOOT_OPTIONS, parse_boot_fast

boot = cli.commands["boot"]

values = st.one_of(
    st.sampled_from(["512M", "2", "1.5", "-1", "x", "", "0x10", "1_000", "nan", "NaN", "inf",
                     "Infinity", "1e999", "/tmp/k", "-", "--kernel"]),
    st.text(alphabet="abc-=./0123456789 ", max_size=6),
)
flags = st.sampled_from([o.flag for o in BOOT_OPTIONS] + ["--bogus", "-k", "--", "--help"])
tokens = st.one_of(
    flags,
    st.tuples(flags, values).map(lambda t: f"{t[0]}={t[1]}"),
    values,
)


def click_params(argv):
    try:
        return boot.make_context("boot", list(argv)).params
    except click.exceptions.Exit:  # --help
        return None
    except click.UsageError:
        return None


@settings(max_examples=400, deadline=None)
@given(st.lists(tokens, max_size=6))
def test_the_fast_path_never_disagrees_with_click(argv):
    fast = parse_boot_fast(argv)
    if fast is not None:
        assert fast == click_params(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--kernel", "k", "--mem", "64M", "--cpus", "2", "--timeout", "1.5", "--readonly", "disk.img"],
        ["--kernel=k", "--append=earlyprintk=serial", "--cmdline", "console=ttyS0"],
        [],
    ],
)
def test_common_command_lines_take_the_fast_path(argv):
    fast = parse_boot_fast(argv)
    assert fast is not None and fast == click_params(argv)


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["-h"], ["--cpus", "two"], ["--kernel"], ["--kernel", "a", "--kernel", "b"],
     ["a.img", "b.img"], ["--readonly=yes"], ["--append", "-x"], ["--no-such-flag"],
     ["--timeout", "nan"], ["--timeout=inf"], ["--timeout", "1e999"]],
)
def test_everything_else_goes_to_click(argv):
    assert parse_boot_fast(argv) is None


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "Infinity", "1e999"])
def test_click_refuses_a_non_finite_timeout(value):
    with pytest.raises(click.BadParameter, match="not a finite number"):
        boot.make_context("boot", ["--timeout", value])
