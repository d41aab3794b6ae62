"""Error types and the exit statuses `voidbox boot` promises its users."""

import enum


class ExitStatus(enum.IntEnum):
    """Process exit statuses of `voidbox boot` (documented in the README)."""

    POWEROFF = 0
    ERROR = 1
    USAGE = 2
    TIMEOUT = 3
    RESET = 4
    GUEST_CRASH = 5  # triple fault, KVM emulation failure or internal error
    SIGINT = 130
    SIGPIPE = 141  # standard output's reader left (`voidbox doctor | head -1`)
    SIGTERM = 143


class VoidboxError(Exception):
    """An error voidbox reports as one line and exit status 1."""

    exit_status = ExitStatus.ERROR


class UsageError(VoidboxError):
    """Bad flags, paths, sizes or counts: one line and exit status 2."""

    exit_status = ExitStatus.USAGE


class GuestMemoryError(VoidboxError):
    """A guest-physical access outside guest RAM."""
