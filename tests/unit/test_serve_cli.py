"""`voidbox blk serve` and `voidbox net serve --backend`, as processes on real sockets.

A protocol-level frontend (the vhost-user codec over the unix socket) reads what each
server offers; QEMU as the frontend is in tests/qemu/test_vhost_user_serve_qemu.py.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from tests.kvm.test_tap_fallback import NOBODY, PR_SET_DUMPABLE, preload
from tests.requires import requires
from voidbox.net import netns
from voidbox.vhost_user import protocol as p
from voidbox.virtio.blk import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO
from voidbox.virtio.device import VIRTIO_F_VERSION_1

SOCKET_WAIT = 30


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "voidbox", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_socket(proc: subprocess.Popen, path) -> None:
    deadline = time.monotonic() + SOCKET_WAIT
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the socket never appeared"
        time.sleep(0.05)


def ask(path, message: p.Message) -> bytes:
    """One request on a fresh connection; -> the reply's payload."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(p.encode_request(message)[0])
        _request, _flags, size = p.HEADER.unpack(sock.recv(p.VHOST_USER_HDR_SIZE, socket.MSG_WAITALL))
        return sock.recv(size, socket.MSG_WAITALL)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    finally:
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "readonly"])
def test_blk_serve_offers_the_image_until_sigterm(tmp_path, readonly):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (3 << 20))
    sock = tmp_path / "blk.sock"
    proc = start("blk", "serve", "--vhost-user", str(sock), *(["--readonly"] if readonly else []),
                 str(image))
    try:
        wait_for_socket(proc, sock)
        assert os.stat(sock).st_mode & 0o777 == 0o600
        (features,) = struct.unpack("<Q", ask(sock, p.GetFeatures()))
        assert features & (1 << VIRTIO_F_VERSION_1) and features & (1 << VIRTIO_BLK_F_FLUSH)
        assert bool(features & (1 << VIRTIO_BLK_F_RO)) == readonly
        reply = ask(sock, p.GetConfig(offset=0, flags=0, payload=bytes(8)))
        (capacity,) = struct.unpack_from("<Q", reply, p.CONFIG_HEADER.size)
        assert capacity == (3 << 20) // 512
    finally:
        status = stop(proc)
    assert status == 0 and not sock.exists()


def test_a_served_image_is_locked_against_a_second_server(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    first = start("blk", "serve", "--vhost-user", str(tmp_path / "a.sock"), str(image))
    try:
        wait_for_socket(first, tmp_path / "a.sock")
        second = subprocess.run([sys.executable, "-m", "voidbox", "blk", "serve", "--vhost-user",
                                 str(tmp_path / "b.sock"), str(image)],
                                capture_output=True, text=True, timeout=30)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr  # as `boot` says it
        assert lines[0].startswith("voidbox: error:") and "in use" in lines[0], second.stderr
        assert not (tmp_path / "b.sock").exists()
    finally:
        assert stop(first) == 0


@pytest.mark.parametrize("args, message", [
    (["blk", "serve", "--vhost-user", "S", "/nonexistent.img"], "does not exist"),
    (["net", "serve", "--vhost-user", "S", "--backend", "none"], "bad --backend 'none'"),
    (["net", "serve", "--vhost-user", "S", "--backend", "tap:"], "bad --backend 'tap:'"),
    (["net", "serve", "--vhost-user", "S", "--net-fallback", "maybe"], "--net-fallback"),
])
def test_bad_serve_arguments_are_one_line_usage_errors(tmp_path, args, message):
    args = [str(tmp_path / "s.sock") if a == "S" else a for a in args]
    result = subprocess.run([sys.executable, "-m", "voidbox", *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("where, message", [
    ("missing/dir/s.sock", "cannot listen on"),  # no such directory
    ("a" * 120 + ".sock", "cannot listen on"),  # longer than sun_path holds
    ("file/s.sock", "cannot use"),  # a regular file where a directory should be
])
@pytest.mark.parametrize("command", [["net", "serve"], ["blk", "serve"]])
def test_a_socket_path_that_cannot_be_bound_is_a_one_line_error(tmp_path, where, message,
                                                                command):
    """The socket path is the user's input: a path the server cannot bind is one line and
    exit status 1, not a traceback."""
    (tmp_path / "file").write_bytes(b"")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    extra = [str(image)] if command[0] == "blk" else []
    result = subprocess.run([sys.executable, "-m", "voidbox", *command, "--vhost-user",
                             str(tmp_path / where), *extra],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voidbox: error: ") and message in lines[0], \
        result.stderr


@pytest.mark.parametrize("command", [["net", "serve"], ["blk", "serve"]])
def test_an_empty_socket_path_is_a_one_line_error(tmp_path, command):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    extra = [str(image)] if command[0] == "blk" else []
    result = subprocess.run([sys.executable, "-m", "voidbox", *command, "--vhost-user", "",
                             *extra], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert result.stderr == "voidbox: error: the vhost-user socket path is empty\n"


def serve_as_nobody(workdir: pathlib.Path, fallback: str) -> tuple[int, str]:
    """`voidbox net serve --backend tap:vbnope1 --net-fallback fallback` as uid nobody (who
    cannot open /dev/net/tun) in a forked child, stopped by SIGTERM once its socket is up;
    -> (exit status, stderr)."""
    preload()
    err = workdir / f"err-{fallback}"
    sock = workdir / f"net-{fallback}.sock"
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            sys.stderr = open(err, "w")  # noqa: SIM115 (the child exits without closing)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            netns._libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
            from voidbox.launch import main

            try:
                main(["net", "serve", "--vhost-user", str(sock), "--backend", "tap:vbnope1",
                      "--net-fallback", fallback])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 98
        except BaseException as e:  # the child must never return into pytest
            sys.__stderr__.write(f"unprivileged serve failed: {e!r}\n")
        finally:
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + SOCKET_WAIT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), err.read_text()
        if sock.exists():
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"net serve neither exited nor served: {err.read_text()}")


@requires(os.geteuid() == 0, "needs root to drop to uid nobody")
@pytest.mark.parametrize("fallback", ["slirp", "fail"])
def test_net_serve_tap_fallback_as_an_unprivileged_user(fallback):
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="voidbox-serve-"))
    os.chmod(workdir, 0o777)
    try:
        status, err = serve_as_nobody(workdir, fallback)
    finally:
        shutil.rmtree(workdir)
    reason = "tap:vbnope1 unusable (cannot open /dev/net/tun: Permission denied)"
    if fallback == "slirp":
        assert err.splitlines() == [f"voidbox: {reason}: the guest's card uses the user-mode NAT"], err
        assert status == 0, err
    else:
        assert err.splitlines() == [f"voidbox: error: {reason}: --net-fallback is fail"], err
        assert status == 1, err


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_net_serve_serves_from_its_sandbox_and_removes_its_socket(tmp_path):
    """`net serve` (sandboxed by default): the process that reads the frontend's frames
    is voidbox.sandbox's, seen in /proc; the first process stays outside and removes the
    socket (which the sandbox could not) when SIGTERM ends them all."""
    sock = tmp_path / "net.sock"
    proc = start("net", "serve", "--vhost-user", str(sock))
    try:
        wait_for_socket(proc, sock)
        # It serves: a frontend's question is answered, and only the sandboxed server's
        # loop answers (the socket listens before the sandbox is entered).
        (features,) = struct.unpack("<Q", ask(sock, p.GetFeatures()))
        assert features & (1 << VIRTIO_F_VERSION_1)
        (waiter,) = children_of(proc.pid)  # supervisor -> waiter -> the sandboxed server
        (server,) = children_of(waiter)
        with open(f"/proc/{server}/status") as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1", fields
        assert int(fields["CapEff"], 16) == 0 and os.listdir(f"/proc/{server}/root") == []
    finally:
        status = stop(proc)
    assert status == 0
    assert not sock.exists()


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.4])
def test_net_serve_sigterm_while_entering_the_sandbox_still_ends_it(tmp_path, delay):
    """SIGTERM at any moment of the start-up (the forks of the sandbox's entry included)
    ends every process and removes the socket: none is lost between a fork and the
    handler that relays it, and a stop before the loop runs is kept."""
    sock = tmp_path / "net.sock"
    proc = start("net", "serve", "--vhost-user", str(sock))
    try:
        wait_for_socket(proc, sock)
        time.sleep(delay)
    finally:
        status = stop(proc)
    assert status == 0
    assert not sock.exists()


def test_net_serve_no_sandbox_serves_from_its_own_process(tmp_path):
    sock = tmp_path / "net.sock"
    proc = start("net", "serve", "--vhost-user", str(sock), "--no-sandbox")
    try:
        wait_for_socket(proc, sock)
        (features,) = struct.unpack("<Q", ask(sock, p.GetFeatures()))
        assert features & (1 << VIRTIO_F_VERSION_1)
        assert children_of(proc.pid) == []
    finally:
        assert stop(proc) == 0
    assert not sock.exists()
