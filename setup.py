"""Build switches for voidbox's Cython extensions; metadata lives in pyproject.toml.

Every voidbox/_*.pyx is an extension. VOIDBOX_CYTHON_DEBUG=1 turns bounds and
wraparound checks back on for a debug build.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("VOIDBOX_CYTHON_DEBUG") == "1"
# Development convenience: VOIDBOX_ONLY=_ring builds just voidbox/_ring.pyx.
ONLY = os.environ.get("VOIDBOX_ONLY")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

extensions = [
    Extension(
        "voidbox." + os.path.splitext(os.path.basename(path))[0],
        [path],
        extra_compile_args=["-O2"] + (["-O0", "-g"] if DEBUG else []),
        define_macros=[("VOIDBOX_DEBUG", "1")] if DEBUG else [],
    )
    for path in sorted(glob.glob("voidbox/_*.pyx"))
    if not ONLY or os.path.basename(path) == ONLY + ".pyx"
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
