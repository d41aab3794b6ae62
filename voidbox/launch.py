"""The `voidbox` entry point, without click.

Start-up is a feature: users boot many short-lived VMs. Importing click costs about 38 ms
here, as much as QEMU's whole run, so a plain `voidbox boot --opt value ...` is parsed
from BOOT_OPTIONS (options.py) directly and runs commands.boot_command without it. Anything
else (other commands, --help, short or unknown flags, a value that looks like a flag, a
number that does not parse) goes to the click CLI in cli.py, which builds its `boot`
command from the same table and owns every message about bad usage. Imports go one way:
launch -> options, commands, cli; cli -> options, commands.
"""

from __future__ import annotations

import sys

from .commands import boot_command, fail
from .errors import VoidboxError
from .options import parse_boot_fast


def main(argv: list[str] | None = None) -> None:
    """The `voidbox` command."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:3] == ["net", "serve", "--vmm-fd"] and len(args) == 4 and args[3].isdigit():
        # A VMM's child backend (voidbox.vhost_user.child): its start-up is the VM's.
        from .vhost_user.child import main as serve_for_vmm

        serve_for_vmm(int(args[3]))
    if args[:1] == ["boot"]:
        params = parse_boot_fast(args[1:])
        if params is not None:
            try:
                boot_command(**params)
            except VoidboxError as error:
                fail(error)
    from .cli import main as click_main

    click_main(args)
