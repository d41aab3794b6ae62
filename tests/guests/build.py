"""Build the tiny freestanding test guests at test time.

    from tests.guests.build import build_guest
    elf = build_guest("hello", tmp_path)      # -> tmp_path / "hello.elf"

Each guest is tests/guests/<name>.c plus guest.h, linked at 1 MiB by guest.ld. The
flags keep gcc to general-purpose registers (no SSE: the guest never enables it,
and software-only KVM emulates every instruction) and make warnings errors, so a
guest that builds is a guest that compiled cleanly. A test that needs a guest ends
as tests/requires.missing() says (a skip, a failure under CI) when gcc is not installed.

Run as a script to build one guest by hand: python tests/guests/build.py hello OUTDIR
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent
LINKER_SCRIPT = GUESTS_DIR / "guest.ld"
HEADER = GUESTS_DIR / "guest.h"
GUEST_NAMES = ("hello", "io", "irq", "reset", "triple", "spin", "serial_irq", "virtio_blk", "virtio_blk_spin",
               "pio_loop", "virtio_net", "virtio_net_lenient", "virtio_net_relink")
GUEST_LOAD_ADDR = 0x100000  # layout.HIMEM_ADDR; guest.ld links here

CFLAGS = (
    "-ffreestanding", "-nostdlib", "-nostartfiles", "-static", "-fno-pic", "-no-pie",
    "-fno-stack-protector", "-mgeneral-regs-only", "-mno-red-zone", "-O2",
    # endbr64 and unwind tables have no use in a guest without CET or an unwinder.
    "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
    "-std=gnu11", "-Wall", "-Wextra", "-Werror",
    "-Wl,--build-id=none", f"-Wl,-T,{LINKER_SCRIPT}",
)

BUILD_TIMEOUT = 60


class GuestBuildError(RuntimeError):
    """gcc rejected a guest; the message carries its diagnostics."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


def build_guest(name: str, tmp_dir: str | os.PathLike) -> Path:
    """Compile tests/guests/<name>.c to <tmp_dir>/<name>.elf and return its path.

    Reuses an existing output newer than its sources (tmp_path_factory sharing).
    Calls tests.requires.missing when gcc is missing; raises GuestBuildError on any diagnostic.
    """
    source = GUESTS_DIR / f"{name}.c"
    if "/" in name or not source.is_file():
        raise ValueError(f"no such test guest: {name!r} (have {', '.join(GUEST_NAMES)})")
    cc = compiler()
    if cc is None:
        from tests.requires import missing

        missing("needs gcc to build the tiny test guests")
    out = Path(tmp_dir) / f"{name}.elf"
    inputs = (source, HEADER, LINKER_SCRIPT, *_included(source))
    newest_input = max(p.stat().st_mtime for p in inputs)
    if out.exists() and out.stat().st_mtime >= newest_input:
        return out
    result = subprocess.run(
        [cc, *CFLAGS, "-o", str(out), str(source)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
    )
    diagnostics = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or diagnostics:
        out.unlink(missing_ok=True)
        raise GuestBuildError(f"building guest {name!r} failed:\n{diagnostics}")
    return out


def _included(source: Path) -> list[Path]:
    """The guest sources `source` includes by a quoted name (a variant includes its base)."""
    names = re.findall(r'^#include "([^"]+)"', source.read_text(), re.MULTILINE)
    return [GUESTS_DIR / name for name in names if (GUESTS_DIR / name).is_file()]


def disassemble(elf: str | os.PathLike) -> str:
    """objdump -d output of a built guest (calls tests.requires.missing without objdump)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        from tests.requires import missing

        missing("needs objdump (binutils) to inspect the test guests")
    result = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(elf)],
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                            check=True)
    return result.stdout


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: build.py GUEST OUTDIR")
    print(build_guest(sys.argv[1], sys.argv[2]))
