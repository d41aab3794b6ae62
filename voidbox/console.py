"""The host side of the guest's serial console: the user's terminal in, guest bytes out.

Input (`Console`): when stdin is a terminal it is put in raw mode for the life of
the context manager, the way QEMU's `-nographic` does it (no echo, no line editing,
no signals from the keyboard, so Ctrl-C and Ctrl-Z go to the guest; output
post-processing stays on so a guest's bare "\\n" still returns the carriage).
The terminal is restored on exit, on exceptions, at interpreter exit, and before
the process dies of SIGTERM, SIGHUP or stops on SIGTSTP (raw mode is re-entered
on SIGCONT). A thread reads stdin and hands bytes to `on_input` (the UART's
`enqueue_input`); it waits in poll() on stdin and a self-pipe, so `stop()` ends
it at once.

Escapes (QEMU's character-device multiplexer keys, `-echr` default Ctrl-A):
    Ctrl-A x        stop the VM (`on_quit`)
    Ctrl-A Ctrl-A   send one Ctrl-A to the guest
    Ctrl-A h or ?   print the key help
    Ctrl-A other    ignored, both bytes dropped (as QEMU does)
`EscapeParser` is the pure state machine behind it.

When stdin is not a terminal there is no raw mode and, unless `forward_input=True`,
no input forwarding; forwarded non-terminal input is passed through untouched
(no escape processing) unless `escape=True`. A terminal whose foreground is another
process group (voidbox started with `&`, or put in the background with `bg`) is
neither switched to raw mode nor read: either would stop voidbox with SIGTTOU or
SIGTTIN (POSIX job control); the reader waits until voidbox is in the foreground.

Output (`ConsoleOutput`): guest bytes to stdout, a file or a pipe, flushed on every
write (the UART already batches). A reader that goes away (EPIPE) ends the output
quietly: later bytes are counted and dropped, no traceback at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import select
import signal
import sys
import termios
import threading
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at start-up
if TYPE_CHECKING:
    from typing import BinaryIO, TextIO

CTRL_A = 0x01
ESCAPE_CHAR = CTRL_A
ESCAPE_QUIT = ord("x")
ESCAPE_HELP = (ord("h"), ord("?"))

HELP_TEXT = (
    "\n"
    "C-a h    print this help\n"
    "C-a x    exit voidbox (stops the VM)\n"
    "C-a C-a  send C-a to the guest\n"
)

READ_CHUNK = 4096

BACKGROUND_RECHECK_MS = 250
"""While in the background, how often the reader looks whether it is in the foreground."""

# termios attribute list indexes (termios.tcgetattr)
_IFLAG, _OFLAG, _CFLAG, _LFLAG, _ISPEED, _OSPEED, _CC = range(7)


def in_background(fd: int) -> bool:
    """True when `fd` is our controlling terminal and another process group owns it.

    Only the controlling terminal enforces job control; tcgetpgrp fails (ENOTTY)
    on any other terminal, which this process may then read and configure freely.
    """
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False


class EscapeParser:
    """Split terminal input into bytes for the guest and escape commands.

    feed(data) -> (bytes_for_guest, quit_requested). The escape state carries across
    calls, so a Ctrl-A at the end of one read pairs with the next read's first byte.
    After a quit request the rest of that input is discarded.
    """

    def __init__(self, escape_char: int = ESCAPE_CHAR,
                 on_help: Callable[[], None] | None = None):
        self.escape_char = escape_char
        self._on_help = on_help
        self._escaped = False
        self.help_requests = 0
        self.ignored_escapes = 0

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        # Fast path: most reads hold no escape character and no pending escape.
        if not self._escaped and self.escape_char not in data:
            return bytes(data), False
        out = bytearray()
        for byte in data:
            if not self._escaped:
                if byte == self.escape_char:
                    self._escaped = True
                else:
                    out.append(byte)
                continue
            self._escaped = False
            if byte == self.escape_char:
                out.append(byte)
            elif byte == ESCAPE_QUIT:
                return bytes(out), True
            elif byte in ESCAPE_HELP:
                self.help_requests += 1
                if self._on_help is not None:
                    self._on_help()
            else:
                self.ignored_escapes += 1
        return bytes(out), False


def raw_attributes(attrs: list) -> list:
    """Terminal attributes for the console, from the current ones (a new list).

    QEMU's stdio character device settings: input taken byte by byte with no
    echo, no line editing, no CR/NL translation, no flow control and no
    keyboard-generated signals (Ctrl-C, Ctrl-Z and Ctrl-\\ reach the guest);
    output post-processing left on.
    """
    new = [list(a) if isinstance(a, list) else a for a in attrs]
    new[_IFLAG] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                     | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    new[_OFLAG] |= termios.OPOST
    new[_LFLAG] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN
                     | termios.ISIG)
    new[_CFLAG] &= ~(termios.CSIZE | termios.PARENB)
    new[_CFLAG] |= termios.CS8
    new[_CC][termios.VMIN] = 1
    new[_CC][termios.VTIME] = 0
    return new


class Console:
    """Raw-mode terminal and an input thread feeding the guest; use as a context manager.

    on_input(bytes): called on the reader thread with bytes for the guest.
    on_quit(): called on the reader thread when the user types Ctrl-A x.
    stdin: a file descriptor or file object (default sys.stdin).
    forward_input: None forwards only when stdin is a terminal.
    escape: None interprets Ctrl-A escapes only when stdin is a terminal.
    help_stream: where Ctrl-A h prints (default sys.stderr).
    """

    def __init__(self, on_input: Callable[[bytes], None], on_quit: Callable[[], None], *,
                 stdin: int | TextIO | BinaryIO | None = None,
                 forward_input: bool | None = None,
                 escape: bool | None = None,
                 help_stream: TextIO | None = None):
        self._on_input = on_input
        self._on_quit = on_quit
        if stdin is None:
            stdin = sys.stdin
        self.fd = stdin if isinstance(stdin, int) else stdin.fileno()
        self.is_tty = os.isatty(self.fd)
        interactive = self.is_tty and not in_background(self.fd)
        self.forwarding = interactive if forward_input is None else forward_input
        use_escape = self.is_tty if escape is None else escape
        self._help_stream = help_stream
        self.parser = EscapeParser(on_help=self._print_help) if use_escape else None
        self._saved_attrs: list | None = None
        self._saved_handlers: dict[int, object] = {}
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.quit_requested = False
        self.eof = False

    # ----- lifecycle -----

    def __enter__(self) -> Console:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        try:
            if self.is_tty and not in_background(self.fd):
                self._enter_raw()
                self._install_signal_handlers()
                atexit.register(self.restore_terminal)
            if self.forwarding:
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                self._thread = threading.Thread(target=self._reader, name="voidbox-console",
                                                daemon=True)
                self._thread.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the reader thread and give the terminal back; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")
            if thread is not threading.current_thread():
                thread.join()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._restore_signal_handlers()
        self.restore_terminal()
        atexit.unregister(self.restore_terminal)

    @property
    def raw(self) -> bool:
        return self._saved_attrs is not None

    # ----- terminal -----

    def _enter_raw(self) -> None:
        attrs = termios.tcgetattr(self.fd)
        with self._lock:
            if self._saved_attrs is None:
                self._saved_attrs = attrs
        termios.tcsetattr(self.fd, termios.TCSANOW, raw_attributes(attrs))

    def restore_terminal(self) -> None:
        with self._lock:
            attrs, self._saved_attrs = self._saved_attrs, None
        if attrs is not None:
            # TCSAFLUSH would drop typed-ahead input meant for the shell; TCSADRAIN
            # lets pending guest output reach the screen first.
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, attrs)

    # ----- signals -----

    def _install_signal_handlers(self) -> None:
        # Only the main thread may set handlers, and a handler the program already
        # installed (the VMM's own SIGTERM handling) is left alone: it must unwind
        # through this context manager instead.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in ((signal.SIGTERM, self._on_fatal_signal),
                                (signal.SIGHUP, self._on_fatal_signal),
                                (signal.SIGTSTP, self._on_stop_signal)):
            if signal.getsignal(signum) == signal.SIG_DFL:
                self._saved_handlers[signum] = signal.signal(signum, handler)
        if signal.SIGTSTP in self._saved_handlers:
            self._saved_handlers[signal.SIGCONT] = signal.signal(signal.SIGCONT,
                                                                 self._on_continue)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        saved, self._saved_handlers = self._saved_handlers, {}
        for signum, handler in saved.items():
            signal.signal(signum, handler)

    def _on_fatal_signal(self, signum, frame) -> None:
        self.restore_terminal()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _on_stop_signal(self, signum, frame) -> None:
        self.restore_terminal()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # stops here until SIGCONT
        signal.signal(signum, self._on_stop_signal)

    def _on_continue(self, signum, frame) -> None:
        # Continued in the background (`bg`): leave the terminal to the shell.
        if self.is_tty and self._saved_handlers and not in_background(self.fd):
            with contextlib.suppress(termios.error, OSError):
                self._enter_raw()

    # ----- input -----

    def _print_help(self) -> None:
        stream = self._help_stream if self._help_stream is not None else sys.stderr
        with contextlib.suppress(OSError, ValueError):
            stream.write(HELP_TEXT)
            stream.flush()

    def _reader(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                if self.is_tty and in_background(self.fd):
                    # Reading now would stop the whole VMM with SIGTTIN; input that
                    # is waiting belongs to the foreground job, so watch only the
                    # self-pipe until we are brought back.
                    woken, _, _ = select.select([self._wake_r], [], [],
                                                BACKGROUND_RECHECK_MS / 1000)
                    if woken:
                        return
                    continue
                events = dict(poller.poll())
                if self._wake_r in events:
                    return
                if self.fd not in events:
                    continue
                try:
                    data = os.read(self.fd, READ_CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    # EIO: the terminal hung up (pty master closed).
                    if e.errno != errno.EIO:
                        raise
                    data = b""
                if not data:
                    self.eof = True
                    return
                quit_requested = False
                if self.parser is not None:
                    data, quit_requested = self.parser.feed(data)
                if data:
                    self._on_input(data)
                if quit_requested:
                    self.quit_requested = True
                    self._on_quit()
                    return
        except Exception as e:  # surfaced to the VMM through .error, never lost
            self.error = e


class ConsoleOutput:
    """Guest serial bytes to a terminal, file or pipe; callable as the UART's `output`.

    target: None (sys.stdout), a binary or text stream, a file descriptor, or a path
    (created or truncated).
    """

    def __init__(self, target: str | os.PathLike | int | BinaryIO | TextIO | None = None):
        self._owned = False
        if target is None:
            target = sys.stdout
        if isinstance(target, (str, os.PathLike)):
            self._stream: BinaryIO = open(target, "wb")  # closed in close()
            self._owned = True
        elif isinstance(target, int):
            self._stream = os.fdopen(target, "wb", closefd=False)
            self._owned = True
        else:
            # Text streams carry a binary buffer underneath (sys.stdout.buffer).
            self._stream = getattr(target, "buffer", target)
        self._lock = threading.Lock()
        self.broken = False
        self.bytes_written = 0
        self.bytes_dropped = 0

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.broken:
                self.bytes_dropped += len(data)
                return
            try:
                self._stream.write(data)
                self._stream.flush()
            except OSError as error:
                self._failed(error)
                self.bytes_dropped += len(data)
                return
            self.bytes_written += len(data)

    __call__ = write

    def flush(self) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                self._stream.flush()
            except OSError as error:
                self._failed(error)

    def close(self) -> None:
        self.flush()
        if self._owned:
            with contextlib.suppress(OSError):
                self._stream.close()

    def __enter__(self) -> ConsoleOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _failed(self, error: OSError) -> None:
        """The output refused the guest's bytes: a pipe whose reader left ends it quietly;
        anything else (a full disk or /dev/full, EIO) once, in one line. The VM runs on
        either way: its console is lost, not its work."""
        if not isinstance(error, BrokenPipeError):
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"voidbox: console output stopped ({error.strerror or error});"
                                 " the guest's output from here on is dropped\n")
                sys.stderr.flush()
        self._reader_gone()

    def _reader_gone(self) -> None:
        """The pipe's reader left: stop writing and keep the exit quiet.

        Python's advice (library/signal, "Note on SIGPIPE"): point the descriptor at
        /dev/null so the buffered bytes left behind flush harmlessly at exit instead
        of raising BrokenPipeError again from the interpreter's shutdown.
        """
        self.broken = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
