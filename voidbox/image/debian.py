"""Fetch and unpack Debian packages without root: `apt-get download` and `dpkg-deb -x`.

`apt-get download` fetches a package's .deb into the current directory as any user, using the
host's package lists; `dpkg-deb -x` unpacks it anywhere. Nothing is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from voidbox.errors import VoidboxError

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# The meta package depends on the versioned image, e.g. linux-image-6.1.0-57-cloud-amd64;
# some releases ship only the -unsigned flavour under that name.
KERNEL_PACKAGE_RE = re.compile(r"^linux-image-(?P<version>\d[\w.+~-]*-cloud-amd64)(?:-unsigned)?$")
APT_TIMEOUT = 600  # seconds; a kernel .deb is ~30 MB

NO_APT_HINT = (
    "voidbox image build needs apt-get and dpkg-deb (a Debian or Ubuntu host); "
    "on other hosts pass --kernel and --initrd instead"
)
NO_LISTS_HINT = "run `apt-get update` (as root) first so apt knows the package"


def require_tools() -> None:
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise VoidboxError(f"{tool} not found: {NO_APT_HINT}")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _missing_lists(stderr: str) -> bool:
    return any(
        phrase in stderr
        for phrase in ("Unable to locate package", "has no installation candidate",
                       "Can't select candidate version", "No packages found")
    )


def _run(argv: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                              timeout=APT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise VoidboxError(f"{' '.join(argv)} did not finish in {APT_TIMEOUT} s") from None
    except OSError as exc:
        raise VoidboxError(f"cannot run {argv[0]}: {exc.strerror}") from None


def kernel_package(meta: str = KERNEL_META_PACKAGE) -> tuple[str, str]:
    """Resolve the meta package to (package name, kernel version) with `apt-cache depends`."""
    result = _run(["apt-cache", "depends", meta])
    if result.returncode != 0 or _missing_lists(result.stderr):
        if _missing_lists(result.stderr) or not result.stdout.strip():
            raise VoidboxError(f"apt does not know {meta}: {NO_LISTS_HINT}")
        raise VoidboxError(f"apt-cache depends {meta} failed: {_last_line(result.stderr)}")
    return parse_kernel_depends(result.stdout, meta)


def parse_kernel_depends(text: str, meta: str = KERNEL_META_PACKAGE) -> tuple[str, str]:
    """Pick the versioned kernel image out of `apt-cache depends` output.

    Lines look like `  Depends: linux-image-6.1.0-57-cloud-amd64`; alternatives are prefixed
    with `|` and virtual packages are shown in angle brackets (skipped: not downloadable).
    """
    for line in text.splitlines():
        kind, sep, name = line.strip().lstrip("|").partition(":")
        if not sep or kind.strip() not in ("Depends", "PreDepends"):
            continue
        match = KERNEL_PACKAGE_RE.match(name.strip())
        if match:
            return match.group(0), match.group("version")
    raise VoidboxError(f"{meta} depends on no linux-image-<version>-cloud-amd64 package")


def download(package: str, dest: Path) -> Path:
    """`apt-get download PACKAGE` into `dest`; returns the .deb path.

    The download lands in a private temporary directory first and is renamed into `dest`
    only when complete, so a cached .deb is always a whole one.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        # apt's sandbox user (_apt) must be able to write here when we run as root.
        Path(tmp).chmod(0o755)
        result = _run(["apt-get", "download", "-q", package], cwd=tmp)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if result.returncode != 0 or len(debs) != 1:
            if _missing_lists(result.stderr):
                raise VoidboxError(f"apt cannot find {package}: {NO_LISTS_HINT}")
            raise VoidboxError(f"apt-get download {package} failed: {_last_line(result.stderr)}")
        final = dest / debs[0].name
        debs[0].replace(final)
    for stale in dest.glob(f"{package}_*.deb"):
        if stale != final:
            stale.unlink()
    return final


def cached_deb(package: str, dest: Path) -> Path | None:
    debs = sorted(dest.glob(f"{package}_*.deb")) if dest.is_dir() else []
    return debs[-1] if len(debs) == 1 else None


def extract(deb: Path, dest: Path) -> None:
    """`dpkg-deb -x`: unpack the package's files (no maintainer scripts run)."""
    result = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if result.returncode != 0:
        raise VoidboxError(f"dpkg-deb -x {deb.name} failed: {_last_line(result.stderr)}")
