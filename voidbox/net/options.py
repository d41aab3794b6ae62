"""Strict numbers for `voidbox net run` options: ports, port ranges, the MTU, counts, rates.

Python's int() and float() take '+80', ' 80', '8_0', fullwidth or other scripts' digits,
'nan', 'inf' and '1e3'; click's int type is int(). What a user types here is plain ASCII
decimal digits (a rate may have a decimal fraction, '2.5') or a one-line usage error.
Python callers may pass an int (or, for a rate, a float) instead of the text.
"""

from __future__ import annotations

import math
import re

from voidbox.errors import UsageError

INTEGER = re.compile(r"[0-9]+")
RATE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
# More digits than any limit here needs; also keeps int() clear of its digit limit.
MAX_DIGITS = 20


def parse_int(value: str | int, what: str, lo: int, hi: int | None = None, where: str = "") -> int:
    """value as an int in [lo, hi] (no upper bound if hi is None), else UsageError.

    what names the number in the message ('port', '--mtu'); where is appended to it
    (" in 'tcp:80:80'").
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and INTEGER.fullmatch(value):
        number = int(value) if len(value) <= MAX_DIGITS else None
    else:
        raise UsageError(f"bad {what} {value!r}{where}: expected a decimal number")
    if number is None or number < lo or (hi is not None and number > hi):
        shown = value if number is not None else f"{value[:MAX_DIGITS]}..."
        bounds = f"out of range {lo}-{hi}" if hi is not None else f"must be at least {lo}"
        raise UsageError(f"{what} {shown} {bounds}{where}")
    return number


def parse_rate(value: str | float, what: str) -> float:
    """value as a finite, positive float ('2.5', '100'), else UsageError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and RATE.fullmatch(value):
        number = float(value)
    else:
        raise UsageError(f"bad {what} {value!r}: expected a decimal number such as 10 or 2.5")
    if not (math.isfinite(number) and number > 0):
        shown = value if len(str(value)) <= MAX_DIGITS else f"{str(value)[:MAX_DIGITS]}..."
        raise UsageError(f"{what} {shown} must be finite and greater than 0")
    return number
