"""Lint is part of the test suite: ruff on Python, cython-lint on Cython; warnings fail."""

import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool(name):
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else shutil.which(name)


def test_ruff():
    ruff = tool("ruff")
    assert ruff, "ruff is not installed: pip install -e '.[test]'"
    result = subprocess.run([ruff, "check", "voidbox", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cython_lint():
    linter = tool("cython-lint")
    assert linter, "cython-lint is not installed: pip install -e '.[test]'"
    sources = glob.glob(os.path.join(ROOT, "voidbox", "**", "*.pyx"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "voidbox", "**", "*.pxd"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "bench", "*.pyx"))  # the benchmarks' own
    assert sources, "no Cython sources found"
    # cython-lint runs pycodestyle from the same environment.
    env = dict(os.environ, PATH=os.path.dirname(linter) + os.pathsep + os.environ.get("PATH", ""))
    result = subprocess.run([linter, *sources], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
