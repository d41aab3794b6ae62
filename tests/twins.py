"""Choosing between a compiled module and its pure-Python twin in tests.

The compiled side is never skipped silently: a missing extension fails the test, unless
the run asked for the pure twins alone (VOIDBOX_PURE=1), when the compiled cases skip
with that reason.
"""

import importlib
import os

import pytest


def pure_only() -> bool:
    return os.environ.get("VOIDBOX_PURE") == "1"


def load_ring(name: str):
    """`name` is "pure" or "cython"."""
    if name == "pure":
        return importlib.import_module("voidbox._ring_py")
    return load_compiled("voidbox._ring")


def load_compiled(module: str):
    if pure_only():
        pytest.skip(f"VOIDBOX_PURE=1: the pure twin only, {module} not exercised")
    return importlib.import_module(module)
