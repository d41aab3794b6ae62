"""The CI rule of tests/requires.py: under CI a skip is a failure, with two exceptions."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.requires import HWKVM_REASON, PURE_REASON, is_failure_under_ci, missing

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_off_ci_nothing_fails(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert not is_failure_under_ci("needs gcc")
    with pytest.raises(pytest.skip.Exception, match="needs gcc"):
        missing("needs gcc")


def test_under_ci_a_missing_need_fails_with_its_reason(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert is_failure_under_ci("needs root to create network namespaces")
    with pytest.raises(pytest.fail.Exception, match="needs gcc"):
        missing("needs gcc")


def test_under_ci_hwkvm_and_pure_twins_still_skip(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert not is_failure_under_ci(f"{HWKVM_REASON}: this host's KVM is software-only")
    monkeypatch.setenv("VOIDBOX_PURE", "1")
    assert not is_failure_under_ci(f"{PURE_REASON}: pure twin only")
    monkeypatch.delenv("VOIDBOX_PURE")
    # Claiming the pure mode in a reason does not excuse a missing build.
    assert is_failure_under_ci(f"{PURE_REASON}: pure twin only")


INNER_TESTS = f"""
import pytest

@pytest.mark.skipif(True, reason="needs a tool")
def test_skipif_mark():
    pass

@pytest.fixture
def device():
    pytest.skip("needs a device")

def test_fixture_skip(device):
    pass

def test_in_test_skip():
    pytest.skip("needs a privilege")

def test_hwkvm_tier():
    pytest.skip("{HWKVM_REASON}: none here")

def test_passes():
    pass
"""


def test_conftest_turns_every_other_skip_into_a_failure_under_ci(tmp_path):
    """Skips that do not go through missing() (marks, fixtures, plain pytest.skip) fail too."""
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"
    )
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO)}
    env.pop("VOIDBOX_PURE", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    out = result.stdout
    assert result.returncode == 1, out
    assert "1 failed, 1 passed, 1 skipped, 2 errors" in out, out
    for reason in ("needs a tool", "needs a device", "needs a privilege"):
        assert f"{reason} (under CI a skip is a failure" in out, out
    assert f"SKIPPED [1] test_inner.py:19: {HWKVM_REASON}: none here" in out, out
