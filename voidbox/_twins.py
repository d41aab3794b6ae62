"""Which twin of a hot-path module the process uses: the compiled one, unless
VOIDBOX_PURE=1 (the test suite runs both) or it was not built (a source checkout without
build_ext: the same API, slower). tests/unit/test_compiled_in_use.py checks that a build
really uses its compiled modules."""

import importlib
import os


def pick(compiled: str, pure: str):
    """The module named `compiled`, or `pure` as above."""
    if os.environ.get("VOIDBOX_PURE") != "1":
        try:
            return importlib.import_module(compiled)
        except ImportError:
            pass
    return importlib.import_module(pure)
