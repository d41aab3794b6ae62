"""Console: the escape parser, raw mode on a pty, input forwarding, output and EPIPE."""

import io
import os
import signal
import subprocess
import sys
import termios
import textwrap
import threading

import pytest

from tests.requires import missing
from voidbox.console import (
    CTRL_A,
    HELP_TEXT,
    Console,
    ConsoleOutput,
    EscapeParser,
    raw_attributes,
)

WAIT = 30  # seconds; a bound on a hang, never a measurement

A = bytes([CTRL_A])


# ----- EscapeParser -----

def test_plain_bytes_pass_through():
    p = EscapeParser()
    assert p.feed(b"ls -l\r\x03\x1a") == (b"ls -l\r\x03\x1a", False)


def test_ctrl_a_x_quits_and_drops_the_rest():
    p = EscapeParser()
    assert p.feed(b"ab" + A + b"xcd") == (b"ab", True)


def test_double_ctrl_a_sends_one():
    p = EscapeParser()
    assert p.feed(b"1" + A + A + b"2") == (b"1" + A + b"2", False)


def test_escape_split_across_reads():
    p = EscapeParser()
    assert p.feed(b"q" + A) == (b"q", False)
    assert p.feed(b"x") == (b"", True)
    p = EscapeParser()
    assert p.feed(A) == (b"", False)
    assert p.feed(A + b"z") == (A + b"z", False)


def test_help_and_unknown_escapes():
    calls = []
    p = EscapeParser(on_help=lambda: calls.append(1))
    assert p.feed(A + b"h" + A + b"?" + A + b"q!") == (b"!", False)
    assert calls == [1, 1]
    assert p.help_requests == 2
    assert p.ignored_escapes == 1


def test_x_without_escape_is_data():
    assert EscapeParser().feed(b"x" + A + A + b"x") == (b"x" + A + b"x", False)


# ----- raw mode -----

def test_raw_attributes_match_qemu_stdio():
    master, slave = os.openpty()
    try:
        attrs = raw_attributes(termios.tcgetattr(slave))
    finally:
        os.close(master)
        os.close(slave)
    iflag, oflag, cflag, lflag, _, _, cc = attrs
    for flag in (termios.ICANON, termios.ECHO, termios.ISIG, termios.IEXTEN):
        assert not lflag & flag
    assert not iflag & (termios.ICRNL | termios.IXON)
    assert oflag & termios.OPOST
    assert cflag & termios.CSIZE == termios.CS8
    assert cc[termios.VMIN] == 1 and cc[termios.VTIME] == 0


class Pty:
    def __init__(self):
        self.master, self.slave = os.openpty()
        self.got = bytearray()
        self.got_event = threading.Event()
        self.quit = threading.Event()

    def on_input(self, data):
        self.got += data
        self.got_event.set()

    def wait_for(self, data):
        while data not in self.got:
            assert self.got_event.wait(WAIT), f"never received {data!r}, got {bytes(self.got)!r}"
            self.got_event.clear()

    def close(self):
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty():
    p = Pty()
    yield p
    p.close()


def test_raw_mode_on_a_tty_and_restored(pty):
    before = termios.tcgetattr(pty.slave)
    assert before[3] & termios.ICANON
    with Console(pty.on_input, pty.quit.set, stdin=pty.slave) as console:
        assert console.is_tty and console.raw and console.forwarding
        during = termios.tcgetattr(pty.slave)
        assert not during[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
    assert termios.tcgetattr(pty.slave) == before
    assert not console.raw


def test_restored_when_the_body_raises(pty):
    before = termios.tcgetattr(pty.slave)
    with pytest.raises(RuntimeError), Console(pty.on_input, pty.quit.set, stdin=pty.slave):
        raise RuntimeError("boom")
    assert termios.tcgetattr(pty.slave) == before


def test_forwards_input_including_ctrl_c(pty):
    with Console(pty.on_input, pty.quit.set, stdin=pty.slave):
        os.write(pty.master, b"echo hi\r\x03")
        pty.wait_for(b"echo hi\r\x03")
    assert not pty.quit.is_set()


def test_ctrl_a_x_quits(pty):
    with Console(pty.on_input, pty.quit.set, stdin=pty.slave) as console:
        os.write(pty.master, b"a" + A + A + b"b" + A + b"x" + b"never")
        assert pty.quit.wait(WAIT)
        assert console.quit_requested
    assert bytes(pty.got) == b"a" + A + b"b"


def test_ctrl_a_h_prints_help(pty):
    help_out = io.StringIO()
    with Console(pty.on_input, pty.quit.set, stdin=pty.slave, help_stream=help_out):
        os.write(pty.master, A + b"h" + b"z")
        pty.wait_for(b"z")
    assert help_out.getvalue() == HELP_TEXT


@pytest.mark.timeout(WAIT)
def test_stop_is_prompt_without_input(pty):
    # The reader blocks in poll(); only the self-pipe can end it. A broken wake-up
    # would block stop() in join(), which the timeout turns into a failure.
    console = Console(pty.on_input, pty.quit.set, stdin=pty.slave)
    console.start()
    reader = console._thread
    assert reader is not None and reader.is_alive()
    console.stop()
    assert not reader.is_alive()
    assert console._thread is None and (console._wake_r, console._wake_w) == (-1, -1)
    console.stop()  # idempotent
    assert console._thread is None
    assert pty.got == bytearray() and not pty.quit.is_set()  # nothing typed, nothing sent


def test_signal_handlers_installed_and_restored(pty):
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        missing("SIGTERM already handled in this process")
    with Console(pty.on_input, pty.quit.set, stdin=pty.slave):
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_sigterm_restores_the_terminal_before_dying():
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        child = textwrap.dedent(f"""
            import sys, time
            from voidbox.console import Console
            c = Console(lambda d: None, lambda: None, stdin={slave})
            c.start()
            print("ready", flush=True)
            time.sleep({WAIT})
        """)
        proc = subprocess.Popen([sys.executable, "-c", child], pass_fds=(slave,),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout.readline() == b"ready\n"
            assert not termios.tcgetattr(slave)[3] & termios.ICANON
            proc.send_signal(signal.SIGTERM)
            proc.wait(WAIT)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            stderr = proc.stderr.read()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGTERM
        assert stderr == b""
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_pipe_stdin_not_forwarded_by_default():
    r, w = os.pipe()
    try:
        got = []
        with Console(got.append, lambda: None, stdin=r) as console:
            assert not console.is_tty and not console.raw and not console.forwarding
            os.write(w, b"data")
        assert got == []
    finally:
        os.close(r)
        os.close(w)


def test_pipe_stdin_forwarded_raw_when_asked():
    r, w = os.pipe()
    got = bytearray()
    done = threading.Event()
    console = Console(got.extend, done.set, stdin=r, forward_input=True)
    try:
        with console:
            os.write(w, b"x" + A + b"x" + A + A)
            os.close(w)
            w = -1
            console._thread.join(WAIT)
            assert console.eof
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    # No escape processing on a pipe: binary input reaches the guest untouched.
    assert bytes(got) == b"x" + A + b"x" + A + A
    assert not done.is_set()


def test_callback_error_is_kept(pty):
    def bad(data):
        raise ValueError("guest queue gone")

    with Console(bad, pty.quit.set, stdin=pty.slave) as console:
        os.write(pty.master, b"k")
        console._thread.join(WAIT)
    assert isinstance(console.error, ValueError)


# ----- ConsoleOutput -----

def test_output_to_a_path(tmp_path):
    path = tmp_path / "serial.log"
    with ConsoleOutput(path) as out:
        out(b"Linux version ")
        out.write(b"6.1\n")
        assert path.read_bytes() == b"Linux version 6.1\n"  # flushed on every write
    assert out.bytes_written == 18


def test_output_to_text_and_binary_streams():
    raw = io.BytesIO()
    ConsoleOutput(raw).write(b"\x00\xff")
    assert raw.getvalue() == b"\x00\xff"
    text = io.TextIOWrapper(io.BytesIO())
    ConsoleOutput(text).write(b"ok")
    assert text.buffer.getvalue() == b"ok"


def test_broken_pipe_is_quiet():
    r, w = os.pipe()
    os.close(r)
    try:
        out = ConsoleOutput(w)
        out.write(b"lost")
        out.write(b"also lost")
        out.flush()
        assert out.broken
        assert out.bytes_dropped == len(b"lost") + len(b"also lost")
    finally:
        os.close(w)


def test_stdout_epipe_exits_without_traceback():
    child = textwrap.dedent("""
        import sys
        from voidbox.console import ConsoleOutput
        out = ConsoleOutput()
        sys.stdin.readline()
        for _ in range(1000):
            out.write(b"guest says hello\\n")
        sys.exit(0 if out.broken else 3)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before the guest writes
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(WAIT) == 0
    assert stderr == b""


def test_a_full_output_stops_the_console_with_one_line():
    """stdout on /dev/full (a full disk): the guest's output is dropped and counted, one
    line says so, and the process exits without a traceback."""
    child = textwrap.dedent("""
        import sys
        from voidbox.console import ConsoleOutput
        out = ConsoleOutput()
        for _ in range(100):
            out.write(b"guest says hello\\n")
        out.flush()
        sys.exit(0 if out.broken and out.bytes_dropped == 100 * 17 else 3)
    """)
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-c", child], stdout=full,
                                stderr=subprocess.PIPE, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (b"voidbox: console output stopped (No space left on device); "
                             b"the guest's output from here on is dropped\n")


def test_background_terminal_is_left_alone(pty, monkeypatch):
    # Started with `&`: another process group owns the terminal. Raw mode would
    # stop us with SIGTTOU and reading with SIGTTIN.
    from voidbox import console as console_module

    monkeypatch.setattr(console_module.os, "tcgetpgrp", lambda fd: os.getpgrp() + 1)
    before = termios.tcgetattr(pty.slave)
    with Console(pty.on_input, pty.quit.set, stdin=pty.slave) as console:
        assert console.is_tty and not console.raw and not console.forwarding
        assert termios.tcgetattr(pty.slave) == before
    assert console_module.in_background(pty.slave)


def test_not_our_controlling_terminal_counts_as_foreground(pty):
    # This pty is not the test process's controlling terminal: tcgetpgrp fails
    # and no job control applies to it.
    from voidbox.console import in_background

    assert not in_background(pty.slave)


def test_reader_does_not_read_while_in_background(pty, monkeypatch):
    from voidbox import console as console_module

    owner = [os.getpgrp() + 1]
    checks = []
    checked_with_input_waiting = threading.Event()
    reads = []
    real_read = os.read

    def tcgetpgrp(fd):
        checks.append(owner[0])
        if len(checks) >= 3 and written.is_set():
            checked_with_input_waiting.set()
        return owner[0]

    def read(fd, n):
        reads.append(owner[0])
        return real_read(fd, n)

    written = threading.Event()
    monkeypatch.setattr(console_module.os, "tcgetpgrp", tcgetpgrp)
    monkeypatch.setattr(console_module.os, "read", read)
    with Console(pty.on_input, pty.quit.set, stdin=pty.slave, forward_input=True):
        os.write(pty.master, b"for the shell\n")  # canonical mode: a whole line
        checks.clear()
        written.set()
        # The reader has looked at least twice more with the line waiting.
        assert checked_with_input_waiting.wait(WAIT)
        assert reads == []
        owner[0] = os.getpgrp()  # brought back to the foreground (`fg`)
        pty.wait_for(b"for the shell")
    assert reads and all(r == os.getpgrp() for r in reads)
