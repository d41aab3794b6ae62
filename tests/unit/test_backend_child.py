"""voidbox.vhost_user.child without a VM: what the VMM tells its card's backend process,
and the wire between them (a length, a JSON object, file descriptors)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from voidbox.net.config import Forward, NatConfig
from voidbox.net.policy import Policy
from voidbox.vhost_user import child


def roundtrip(nat: NatConfig) -> NatConfig:
    return child._nat_from_document(json.loads(json.dumps(child._nat_document(nat))))


def test_the_nat_configuration_arrives_as_the_vmm_validated_it():
    nat = NatConfig(mtu=9000, max_flows=17, max_conn_rate=2.5, guest_mac="02:00:00:00:00:07",
                    forwards=[Forward("tcp", "127.0.0.1", 8080, 80), Forward("udp", "0.0.0.0", 5353, 53)],
                    dns_upstreams=[("192.0.2.53", 5300)], tcp_idle_timeout=None,
                    udp_idle_timeout=7.5, hostname="box")
    assert roundtrip(nat) == nat
    assert roundtrip(NatConfig()) == NatConfig()


def test_the_policy_is_rebuilt_from_its_inputs_without_reading_the_host_again():
    policy = Policy(allow=("10.0.2.2:8080",), deny=("192.0.2.0/24:80",),
                    host_addrs=("198.51.100.7",))
    rebuilt = Policy(policy.allow, policy.deny, policy.host_loopback, policy.host_addrs)
    for dst, port, guest in [("127.0.0.1", 8080, "10.0.2.2"), ("127.0.0.1", 22, "10.0.2.2"),
                             ("198.51.100.7", 22, None), ("192.0.2.9", 80, None),
                             ("192.0.2.9", 443, None), ("169.254.169.254", 80, None)]:
        assert rebuilt.allows("tcp", dst, port, guest) == policy.allows("tcp", dst, port, guest)
    assert rebuilt.host_addrs == ("198.51.100.7",)


def test_a_document_and_its_descriptors_cross_the_socket():
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        child._send(a, {"hello": "x" * 200_000}, [r])
        doc, fds = child._receive(b, 5)
        assert doc == {"hello": "x" * 200_000}
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(r).st_ino
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize("payload, error", [
    (child._LENGTH.pack(child.MAX_DOCUMENT + 1), ValueError),  # refused before reading it
    (child._LENGTH.pack(2) + b"[]", ValueError),  # not an object
    (child._LENGTH.pack(5) + b"{}", EOFError),  # cut short
    (b"", EOFError),
])
def test_a_bad_document_is_refused_and_its_descriptors_closed(payload, error):
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        if payload:
            socket.send_fds(a, [payload], [r])
        a.shutdown(socket.SHUT_WR)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(error):
            child._receive(b, 5)
        assert len(os.listdir("/proc/self/fd")) == before  # what came with it is closed
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_net_serve_vmm_fd_without_a_vmm_is_one_line_and_exit_2():
    a, b = socket.socketpair()
    a.sendall(b"not a document")
    a.close()
    result = subprocess.run([sys.executable, "-m", "voidbox", "net", "serve", "--vmm-fd",
                             str(b.fileno())], pass_fds=(b.fileno(),), capture_output=True,
                            text=True, timeout=60)
    b.close()
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("voidbox: net serve --vmm-fd: no configuration from the VMM: ")
    assert result.stderr.count("\n") == 1, result.stderr


def test_the_child_runs_this_voidbox_not_one_in_the_working_directory(tmp_path):
    """A `voidbox` package in the directory the VMM was started from (anyone may leave one
    in /tmp) is never what the child imports: python -c would put the working directory
    first on sys.path."""
    marker = tmp_path / "decoy-ran"
    decoy = tmp_path / "voidbox"
    decoy.mkdir()
    for name in ("__init__.py", "launch.py"):
        (decoy / name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    a, b = socket.socketpair()
    a.sendall(b"not a document")
    a.close()
    argv, env = child.child_command(b.fileno())
    result = subprocess.run(argv, pass_fds=(b.fileno(),), env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    b.close()
    assert not marker.exists()
    # This voidbox ran: the one-line answer of `net serve --vmm-fd` without a VMM.
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("voidbox: net serve --vmm-fd: no configuration from the VMM: ")


class FakeProcess:
    """Popen's face for BackendProcess: a child that runs until told otherwise."""

    pid = 4242
    returncode = None

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.returncode = 0
        return 0

    kill = terminate = lambda self: None


def test_a_hostile_childs_documents_reach_the_vmm_only_checked():
    """Once it has served a guest the child may be the guest's: its ready message and
    counters are checked, and descriptors it sends are closed, never kept."""
    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    backend = child.BackendProcess(FakeProcess(), ours, "net0")
    try:
        before = len(os.listdir("/proc/self/fd"))
        child._send(theirs, {"ready": True, "backend": "Slirp\x1b[2J\nBackend", "pid": "1; rm",
                             "sandbox": "ok\x1b]0;title\x07\nsecond line"}, [r])
        backend.wait_ready()
        assert len(os.listdir("/proc/self/fd")) == before  # the fd it sent is closed
        assert backend.backend_name == "SlirpBackend"  # the default: the name was refused
        assert backend.serving_pid == FakeProcess.pid
        assert "\n" not in backend.sandbox and "\x1b" not in backend.sandbox
        counters = {f"k{i}": i for i in range(5000)}
        counters.update({"bad key\n": 1, "x=1 y": 2, "rx_frames": 3, "list": [1], "s": "text"})
        child._send(theirs, {"counters": counters})
        theirs.close()
        backend.finish()
        assert len(backend.counters) == child.MAX_COUNTERS
        assert all(child._NAME.fullmatch(k) and type(v) is int for k, v in backend.counters.items())
    finally:
        for fd in (r, w):
            os.close(fd)


def test_a_childs_start_up_error_is_one_printable_line():
    ours, theirs = socket.socketpair()
    backend = child.BackendProcess(FakeProcess(), ours, "net0")
    child._send(theirs, {"error": "bad\nthing\x1b[31m", "status": 99})
    with pytest.raises(child.VoidboxError) as caught:
        backend.wait_ready()
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
    assert int(caught.value.exit_status) == 1  # an unknown status is an error's
    theirs.close()
    ours.close()
