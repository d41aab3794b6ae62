"""Load a script of bench/ by path, for the tests of its pure helpers (bench/ is not a
package, and CI's pytest never collects it)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(filename: str, name: str | None = None):
    """bench/FILENAME run as a module named `name` (default: the file's stem)."""
    spec = importlib.util.spec_from_file_location(name or Path(filename).stem, BENCH / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
