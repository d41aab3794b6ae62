"""What a test needs from the host, and what a missing need does to the run.

Off CI, a test whose tool, device, privilege, build or guest is missing skips with the
reason. Under CI (the CI variable set, as .ci/run does) scripts/bootstrap has installed all
of it, so the same skip is a failure with the same reason: a broken install can never pass
as a skip. Two skips stay skips under CI, their reasons printed by -ra:
- the hwkvm tier: hardware-assisted KVM is a property of the host, which bootstrap cannot add;
- the compiled twins when VOIDBOX_PURE=1 asked for the pure twins alone.

Tests call missing() or mark themselves with requires(); tests/conftest.py applies the same
rule, through is_failure_under_ci(), to every other skip (pytest.skip in a test or fixture,
a skipif mark), so no skip escapes it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from tests.twins import pure_only

# Every skip reason of these two kinds starts with one of these prefixes.
HWKVM_REASON = "needs hardware-assisted KVM"
PURE_REASON = "VOIDBOX_PURE=1"


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def is_failure_under_ci(reason: str) -> bool:
    """Whether a skip with this reason fails the run (always False off CI)."""
    if not under_ci():
        return False
    if reason.startswith(HWKVM_REASON):
        return False
    return not (reason.startswith(PURE_REASON) and pure_only())


def ci_failure_message(reason: str) -> str:
    return f"{reason} (under CI a skip is a failure)"


def missing(reason: str) -> NoReturn:
    """End the test for want of `reason`: a skip, or a failure under CI."""
    if is_failure_under_ci(reason):
        pytest.fail(ci_failure_message(reason), pytrace=False)
    pytest.skip(reason)


def requires(available: bool, reason: str) -> pytest.MarkDecorator:
    """Mark: unless `available`, the test ends as missing(reason) does."""
    return pytest.mark.skipif(not available, reason=reason)
