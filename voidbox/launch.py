"""The `voidbox` entry point, without click.

Start-up is a feature: users boot many short-lived VMs. Importing click costs about 38 ms
here, as much as QEMU's whole run, so a plain `voidbox boot --opt value ...` is parsed
from BOOT_OPTIONS (options.py) directly and runs commands.boot_command without it. Anything
else (other commands, --help, short or unknown flags, a value that looks like a flag, a
number that does not parse) goes to the click CLI in cli.py, which builds its `boot`
command from the same table and owns every message about bad usage. Imports go one way:
launch -> options, commands, cli; cli -> options, commands.

When `voidbox boot` is the program (main() without argv), it ends without the
interpreter's teardown, as the card's backend process does: by then the VM has closed
everything it opened, and freeing every module and object one by one costs ~10 ms of a
trivial boot.
"""

from __future__ import annotations

import gc
import sys


def main(argv: list[str] | None = None) -> None:
    """The `voidbox` command."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:3] == ["net", "serve", "--vmm-fd"] and len(args) == 4 and args[3].isdigit():
        # A VMM's child backend (voidbox.vhost_user.child): its start-up is the VM's, so it
        # imports nothing of the boot path.
        from .vhost_user.child import main as serve_for_vmm

        serve_for_vmm(int(args[3]))
    booting, collecting = args[:1] == ["boot"], gc.isenabled()
    if booting:
        # Start-up makes tens of thousands of long-lived objects (modules, classes,
        # functions) and next to no garbage: the collector's passes over them cost ~5 ms.
        # commands.run_vm turns it back on once the VM runs.
        gc.disable()
    from .commands import boot_command, fail
    from .errors import VoidboxError
    from .options import parse_boot_fast

    if booting:
        params = parse_boot_fast(args[1:])
        if params is not None:
            try:
                try:
                    boot_command(**params)
                except VoidboxError as error:
                    fail(error)
            except SystemExit as done:
                if argv is None:
                    exit_now(done.code)
                raise
            finally:
                if collecting:  # an in-process caller's collector, as it was
                    gc.enable()
    if collecting:
        gc.enable()
    from .cli import main as click_main

    click_main(args)


def exit_now(code) -> None:
    """End the process with `code` as SystemExit(code) would, without the interpreter's
    teardown: the atexit handlers run (the console's terminal restore, logging's flush) and
    stdout and stderr are flushed. Anything unusual (a code that is not a number, a stream
    that cannot be flushed) takes the interpreter's own way out, which reports it."""
    import atexit
    import os

    if code is None:
        code = 0
    if not isinstance(code, int) or not 0 <= code <= 255:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        raise SystemExit(code) from None
    os._exit(code)
