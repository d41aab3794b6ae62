"""The CLI's contract for bad input: one line on stderr, exit status 2, no traceback."""

import subprocess
import sys

import pytest

from tests.kvm_facts import kvm_opens


def voidbox(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "voidbox", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["boot", "--kernel", "/nonexistent/vmlinux"], "does not exist"),
        (["boot", "--kernel", "/", "--mem", "1G"], "not a regular file"),
        (["boot", "--kernel", sys.executable, "--mem", "lots"], "invalid size"),
        (["boot", "--kernel", sys.executable, "--cpus", "0"], "--cpus"),
        (["boot", "--kernel", sys.executable, "--cpus", "many"], "cpus"),
        (["boot", "--kernel", sys.executable, "--timeout", "-1"], "--timeout"),
        (["boot", "--kernel", sys.executable, "--timeout", "nan"], "not a finite number"),
        (["boot", "--kernel", sys.executable, "--timeout=inf"], "not a finite number"),
        (["boot", "--kernel", sys.executable, "--timeout", "-Infinity"], "not a finite number"),
        (["boot", "--no-such-flag"], "no such option"),
        (["net", "run", "--mtu", "65521", "--", "true"], "--mtu"),
        (["net", "run", "--forward", "tcp:nonsense", "--", "true"], "forward"),
        (["net", "run", "--deny", "10.0.0.0/33", "--", "true"], "10.0.0.0/33"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, needle):
    result = voidbox(*args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr.lower()
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_that_is_not_a_kernel_is_a_usage_error(tmp_path):
    bogus = tmp_path / "notakernel"
    bogus.write_bytes(b"this is not a kernel" * 100)
    result = voidbox("boot", "--kernel", str(bogus), "--timeout", "5")
    # Without a usable /dev/kvm voidbox stops before loading, with exit 1.
    usable = kvm_opens()
    assert result.returncode == (2 if usable else 1), result.stderr
    if usable:
        assert "not a bzImage or x86-64 ELF kernel" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_help_lists_the_commands():
    result = voidbox("--help")
    assert result.returncode == 0
    for command in ("boot", "image", "doctor"):
        assert command in result.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["doctor"], ["net", "run", "--help"]])
def test_output_into_a_full_disk_is_one_line(args):
    """stdout on /dev/full: exit 1 and one line, not the traceback of click's echo."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "voidbox", *args], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr == "voidbox: error: cannot write to standard output: " \
                            "No space left on device\n"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["doctor"]])
def test_output_into_a_closed_pipe_is_quiet(args):
    """voidbox doctor | head -1: the reader leaving is no error worth a line, and the
    status is the one a tool SIGPIPE stopped has (128 + 13), whatever the timing."""
    proc = subprocess.Popen([sys.executable, "-m", "voidbox", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == 141
    assert stderr == b""


@pytest.mark.parametrize("mem, got", [("0", "got 0 bytes"), ("1K", "got 1024 bytes"),
                                      ("15M", "got 15M")])
def test_too_little_memory_says_how_much_was_asked(mem, got):
    result = voidbox("boot", "--mem", mem, "--timeout", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"voidbox: error: --mem must be at least 16M, {got}\n"
