"""The start-up fast path parses `voidbox boot` exactly as click would, or leaves it to click,
and ends the process as an ordinary exit would."""

import os
import subprocess
import sys

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


def run_python(code):
    # Block-buffered streams, as a user's pipes or files are.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=env)


def test_exit_now_keeps_what_an_ordinary_exit_does():
    # Buffered output on both streams and the atexit handlers (the console restores the
    # terminal in one) survive the exit without the interpreter's teardown.
    result = run_python(
        "import atexit, sys\n"
        "from voidbox.launch import exit_now\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "sys.stdout.write('buffered out'); sys.stderr.write('buffered err')\n"
        "exit_now(4)\n")
    assert result.returncode == 4
    assert result.stdout == "buffered outatexit ran\n"
    assert result.stderr == "buffered err"


@pytest.mark.parametrize("code,status,stderr", [(None, 0, ""), ("a message", 1, "a message\n"),
                                                (256, 0, "")])
def test_exit_now_leaves_the_unusual_to_the_interpreter(code, status, stderr):
    # 256: SystemExit's own rule (the status byte) is the interpreter's to apply.
    result = run_python(f"from voidbox.launch import exit_now\nexit_now({code!r})\n")
    assert (result.returncode, result.stderr) == (status, stderr)


@pytest.mark.parametrize("exit_call", ["exit_now(0)", "raise SystemExit(0)"])
def test_exit_now_with_stdout_gone_takes_the_interpreter_s_way_out(exit_call):
    # Unflushed output and a closed stdout: the interpreter reports it, status 120.
    result = run_python("import os\nfrom voidbox.launch import exit_now\n"
                        f"print('x'); os.close(1)\n{exit_call}\n")
    assert result.returncode == 120
    assert "Exception ignored" in result.stderr


@pytest.mark.parametrize("args,status", [(["--kernel", "missing"], 2), (["--help"], 0),
                                         (["--kernel", "missing", "-x"], 2)])
def test_main_called_in_process_raises_system_exit_as_before(args, status):
    # Only the program (main() without argv) ends the process itself; a caller keeps it,
    # with its collector on (the fast path stops it for a boot's start-up).
    import gc

    from voidbox.launch import main

    with pytest.raises(SystemExit) as done:
        main(["boot", *args])
    assert done.value.code == status
    assert gc.isenabled()
