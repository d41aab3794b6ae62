"""`pip wheel .` gives a wheel that installs and runs on its own (compiled modules inside)."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_wheel_builds_installs_and_runs(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), ROOT],
        capture_output=True, text=True, timeout=900,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("voidbox-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("_kvm", "_ring", "_slirp"):
        assert any(n.startswith(f"voidbox/{module}.") and n.endswith(".so") for n in names), module
    assert not any(n.startswith("tests/") for n in names)
    # A fresh environment that borrows only the third-party dependencies of this one: a
    # plain path line in a .pth file adds the directory without running its .pth files,
    # so this tree's editable-install hook stays out.
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "outer-deps.pth"), "w") as pth:
        pth.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    env = dict(os.environ, PYTHONPATH="")
    check = subprocess.run(
        [str(py), "-c", "import voidbox, voidbox._kvm, voidbox._ring, voidbox._slirp; print(voidbox.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert check.returncode == 0, check.stderr
    assert str(venv) in check.stdout  # the installed copy, not the source tree
    doctor = subprocess.run([str(venv / "bin" / "voidbox"), "doctor"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert doctor.returncode == 0 and "kvm:" in doctor.stdout, doctor.stderr
