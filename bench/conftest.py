"""Builds the benchmarks' own Cython modules: bench/_ring_bench.pyx (a Cython caller of
voidbox/_ring.pxd) and bench/_guest_driver.pyx (the bulk rig's guest driver)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # tests.virtio_driver, the driver mock


def build_ring_bench(build_dir: Path = BENCH / "build"):
    """Compile and import _ring_bench; None if voidbox._ring itself is not built."""
    try:
        import voidbox._ring  # noqa: F401
    except ImportError:
        return None
    return build_bench_module("_ring_bench", build_dir)


def build_bench_module(name: str, build_dir: Path = BENCH / "build"):
    """Compile bench/NAME.pyx into build_dir and import it."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    build_dir.mkdir(parents=True, exist_ok=True)
    ext = Extension(name, [str(BENCH / f"{name}.pyx")], extra_compile_args=["-O2"])
    dist = Distribution({"ext_modules": cythonize([ext], include_path=[str(ROOT)], quiet=True,
                                                  build_dir=str(build_dir))})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = str(build_dir)
    cmd.build_temp = str(build_dir / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    [path] = build_dir.glob(f"{name}.*.so")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ring_bench():
    module = build_ring_bench()
    if module is None:
        pytest.skip("voidbox._ring is not built: VOIDBOX_ONLY=_ring python setup.py build_ext --inplace")
    return module


RESULTS = []


@pytest.fixture
def record():
    """record(name, value, unit): a line of the summary printed after the benchmarks."""
    return lambda name, value, unit: RESULTS.append((name, value, unit))


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("voidbox ring: device-side throughput")
    for name, value, unit in RESULTS:
        terminalreporter.write_line(f"{name:<48} {value:>14,.0f} {unit}")
