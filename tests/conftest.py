"""Test tiers as pytest markers; each skip says why, and none hides a failure.

Under CI every skip is a failure with its reason, except the hwkvm tier and the compiled
twins under VOIDBOX_PURE=1 (tests/requires.py has the rule and why).
"""

import os
import shutil

import pytest

from tests.requires import HWKVM_REASON, ci_failure_message, is_failure_under_ci
from voidbox.host import kvm_info

SLOW_TIMEOUT = 1200
"""Seconds (pytest-timeout) for a test marked slow; the default for the rest is in pyproject."""


def pytest_collection_modifyitems(config, items):
    kvm = kvm_info()
    skips = {
        "kvm": None if kvm.usable else f"needs /dev/kvm: {kvm.reason}",
        "hwkvm": (
            None
            if kvm.usable and not kvm.software_only
            else f"{HWKVM_REASON}: "
            + ("this host's KVM is software-only (kvm_pvm) and cannot run a stock kernel to init"
               if kvm.software_only else kvm.reason or "no KVM")
        ),
        "qemu": None if shutil.which("qemu-system-x86_64") else "needs qemu-system-x86_64",
        "netns": None if os.geteuid() == 0 else "needs root to create network namespaces",
    }
    for item in items:
        if "slow" in item.keywords and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def _fail_skip_under_ci(report):
    """Turn a skipped report into a failure when the CI rule says so."""
    if not report.skipped or hasattr(report, "wasxfail") or not isinstance(report.longrepr, tuple):
        return report
    reason = report.longrepr[2].removeprefix("Skipped: ")
    if is_failure_under_ci(reason):
        report.outcome = "failed"
        report.longrepr = ci_failure_message(reason)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _fail_skip_under_ci((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _fail_skip_under_ci((yield))
