"""voidbox's vhost-user net backend beside QEMU's slirp and passt: one guest, one run, one table.

    .venv/bin/python bench/vhost_user_peers.py [--seconds 5] [--conns 500] [--rrs 1000]
        [--backend voidbox --backend slirp --backend passt --backend passt-vhost-user]
        [--json out.json] [--profile-voidbox out.prof] [--serve-arg ARG] [--keep-logs DIR]

The default guest (tests/default_guest.py, voidbox.image) boots under QEMU TCG on
`-M microvm,acpi=on` with 512 MiB of shared memfd memory and one virtio-net-device; only the
netdev behind the card changes:

- voidbox: `python -m voidbox net serve --vhost-user SOCK`, QEMU `-chardev socket,path=SOCK
  -netdev vhost-user` (as tests/qemu/test_vhost_user_net_qemu.py);
- slirp: QEMU's own `-netdev user` (libslirp, inside the QEMU process);
- passt: Debian 12's `passt -f -4 -a 10.0.2.15 -n 24 -g 10.0.2.2 --no-dhcp-dns -s SOCK`,
  QEMU 7.2's `-netdev stream,server=off,addr.type=unix,addr.path=SOCK` (passt(1): "connecting
  to passt by means of a UNIX domain socket ... supported starting from qemu 7.2");
- passt-vhost-user: the same passt options plus `--vhost-user`, from Debian 13 (trixie:
  Debian 12's passt has no vhost-user). Its .deb and trixie's libc6 are fetched with
  `apt-get download` through a private apt state (own sources.list, lists and cache under
  the bench cache, the archive key from /usr/share/keyrings), unpacked with `dpkg-deb -x`
  and run through trixie's own dynamic loader; nothing on the system changes. If the fetch
  fails the row says why.

Every backend maps the guest's 10.0.2.2 to the host's loopback (voidbox and libslirp by
design; passt maps its gateway address, here given with -g, to the host unless
--no-map-gw), so the servers listen on 127.0.0.1 only: bench/net/echo_server.py (TCP echo,
TCP_NODELAY) and a one-off `iperf3 -s -1` per direction. The guest has no iperf3 and no
libc: a bench-only initramfs overlay (a cpio appended to the default guest's initrd; Linux
unpacks concatenated archives in order) carries Debian 12's iperf3 and the libraries it
loads, `netbench` (bench/guest_tools/netbench.c, built here with `gcc -O2 -static`) and the
guest script. No root disk is attached, so the guest stays in its initramfs shell on the
serial console, where the runner types the script's command line. The script, in order:
DHCP on eth0; connect+echo(8 B)+close `--conns` times; 1-byte request/response on one
TCP_NODELAY connection `--rrs` times (both after 20 warm-ups, p50/p99 from the guest's
clock); `iperf3 -c 10.0.2.2 -t --seconds -J` guest->host, then `-R` host->guest. Results
come back as `@@NB` lines on the console. The backend's CPU (all its threads, from
/proc/PID/task/*/schedstat) is read when the guest announces an op and when its result
arrives; slirp runs inside QEMU, so it has no figure of its own.

The guest CPU is emulated (TCG), so absolute figures are the emulator's; compare backends
only within one run. Benchmarks here never assert timings.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.default_guest, tests.qemu (run as a script)


def _load_net_compare():
    """bench/net_compare.py's host helpers (bench/ is not a package; sys.path stays as is)."""
    spec = importlib.util.spec_from_file_location("net_compare", BENCH / "net_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_nc = _load_net_compare()
LineReader, cmd_output, free_port = _nc.LineReader, _nc.cmd_output, _nc.free_port
listening, proc_cpu_seconds, stop = _nc.listening, _nc.proc_cpu_seconds, _nc.stop

NETBENCH_C = BENCH / "guest_tools" / "netbench.c"
ECHO_SERVER = BENCH / "net" / "echo_server.py"
BACKENDS = ("voidbox", "slirp", "passt", "passt-vhost-user", "boot", "boot-inprocess")
GUEST_IP, PREFIX_LEN, GATEWAY = "10.0.2.15", "24", "10.0.2.2"
LOOPBACK = "127.0.0.1"
WARMUP = 20
LATENCY_BUDGET = 30  # seconds per latency loop in the guest, whatever N is
IPERF_MARGIN = 25  # seconds beyond -t before the guest kills iperf3
SOCKET_WAIT = 30.0
BOOT_WAIT = 180.0  # spawn to the initramfs shell's prompt; TCG on a busy host
GB = 1e9
# Under TCG the clocksource watchdog often finds the TSC "skewed" against jiffies (the
# emulation stalls), marks it unstable and falls back to jiffies: 4 ms steps in every
# latency sample. microvm has no HPET or ACPI PM timer to fall back to; the TCG TSC is the
# host's, so it is trusted.
GUEST_APPEND = "tsc=reliable"
NO_ROOT_SHELL = b"voidbox-init: no root disk, starting shell"
SHELL_PROMPT = b"# "  # busybox ash's default PS1 for root, '\w \$ '

# Debian 12 packages for the guest's iperf3 (apt-cache depends iperf3 libiperf0).
GUEST_PACKAGES = ("iperf3", "libiperf0", "libsctp1", "libssl3", "libc6")
GUEST_APPLETS = ("ip", "udhcpc", "awk", "tr", "timeout", "cat", "sleep", "grep")
TRIXIE_SOURCES = ("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                  "http://deb.debian.org/debian trixie main\n")
TRIXIE_PACKAGES = ("passt", "libc6")
APT_TIMEOUT = 300

GUEST_SCRIPT = r"""#!/bin/sh
# The guest side of bench/vhost_user_peers.py (generated; bench-only initramfs overlay).
export PATH=/bench/bin:/bin:/sbin LD_LIBRARY_PATH=/bench/lib
gw=$1 echo_port=$2 up_port=$3 down_port=$4 conns=$5 rrs=$6 secs=$7 warm=$8 budget=$9
say() { echo "@@NB $1"; }
ip link set lo up
if udhcpc -i eth0 -s /bench/udhcpc.script -t 5 -T 1 -A 1 -n -q >/dev/null 2>&1; then
    addr=$(ip -4 addr show dev eth0 | awk '/inet /{print $2}')
    say "{\"op\":\"dhcp\",\"ok\":true,\"addr\":\"$addr\",\"mtu\":$(cat /sys/class/net/eth0/mtu),\"features\":\"$(cat /sys/class/net/eth0/device/features)\"}"
else
    say '{"op":"dhcp","ok":false}'
    say '{"op":"end"}'
    exit 1
fi
say '{"op":"begin","name":"connect"}'
netbench connect "$gw" "$echo_port" "$conns" "$warm" "$budget"
say '{"op":"begin","name":"rr"}'
netbench rr "$gw" "$echo_port" "$rrs" "$warm" "$budget"
for dir in up down; do
    port=$up_port flag=
    [ "$dir" = down ] && port=$down_port flag=-R
    say "{\"op\":\"begin\",\"name\":\"$dir\"}"
    timeout $((secs + @MARGIN@)) iperf3 -c "$gw" -p "$port" -t "$secs" -J \
        --connect-timeout 5000 $flag >/tmp/iperf.json 2>/tmp/iperf.err
    rc=$?
    # One line (whitespace dropped; still JSON) so the console cannot split it.
    echo "@@NBJ $dir $rc $(tr -d ' \t\r\n' </tmp/iperf.json)"
done
say '{"op":"end"}'
""".replace("@MARGIN@", str(IPERF_MARGIN))


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and its descendants: a sandboxed backend (`net serve`, a
    boot card's backend) serves from a grandchild of the process started."""
    from proctree import descendants

    total = 0.0
    for pid in descendants(root):
        with contextlib.suppress(OSError, ValueError):
            total += proc_cpu_seconds(pid)
    return total


class BenchError(Exception):
    """A backend cannot be run or measured; the reason goes into its row."""


# ---------------------------------------------------------------- pure helpers (unit-tested)

LINE_RE = re.compile(r"@@NB(J)? (.*)$")


def parse_console_line(line: str) -> dict | None:
    """One console line -> the guest's message, or None for any other output.

    `@@NB {json}` is a message as is; `@@NBJ NAME RC {iperf3 -J}` becomes
    {"op": NAME, "rc": RC, **iperf_summary(report)}. A line cut or garbled by console
    noise gives {"op": "garbled", "text": ...} instead of raising.
    """
    match = LINE_RE.search(line.replace("\r", ""))
    if not match:
        return None
    try:
        if not match.group(1):
            return json.loads(match.group(2))
        name, rc, report = match.group(2).split(" ", 2)
        return {"op": name, "rc": int(rc), **iperf_summary(json.loads(report) if report else {})}
    except ValueError:
        return {"op": "garbled", "text": line[:200]}


def iperf_summary(report: dict) -> dict:
    """The figures of one `iperf3 -c -J` report: the receiver's bytes and rate (sum_received,
    the same on either end once iperf3 exchanged results), the sender's retransmits."""
    if not report:
        return {"ok": False, "error": "iperf3 gave no JSON"}
    if "error" in report:
        return {"ok": False, "error": f"iperf3: {report['error'][:200]}"}
    end = report.get("end", {})
    received, sent = end.get("sum_received", {}), end.get("sum_sent", {})
    if not received.get("bytes"):
        return {"ok": False, "error": "iperf3: 0 bytes received"}
    return {"ok": True, "bytes": received["bytes"],
            "bits_per_second": received.get("bits_per_second", 0.0),
            "seconds": received.get("seconds"), "retransmits": sent.get("retransmits")}


def ldso_list(text: str) -> dict[str, str]:
    """`ld.so --list` output -> {soname: resolved path}; raises on `not found`."""
    libs = {}
    for line in text.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if not arrow or "/" in name:  # the interpreter's own line is a path
            continue
        path = rest.rsplit(" (", 1)[0].strip()
        if path == "not found":
            raise BenchError(f"{name} not found in the unpacked packages")
        libs[name] = path
    return libs


def cell_rate(res: dict | None) -> str:
    if not res:
        return "n/a"
    if not res.get("ok"):
        return res.get("error", "failed")
    retr = f" ({res['retransmits']} retr)" if res.get("retransmits") else ""
    return f"{res['bits_per_second'] / 1e9:.3f}{retr}"


def cell_latency(res: dict | None) -> str:
    if not res:
        return "n/a"
    if not res.get("n"):
        return res.get("first_error", "failed")
    note = f" ({res['errors']} failed: {res.get('first_error', '')})" if res.get("errors") else ""
    if res["n"] + res.get("errors", 0) < res["asked"]:
        # Out of time, or (RR) the one connection failed.
        note += f" (stopped after {res['n'] + res.get('errors', 0)}/{res['asked']})"
    return f"{res['p50_us']:.0f} / {res['p99_us']:.0f}{note}"


def cell_cpu(session: dict) -> str:
    if session.get("backend_pid") is None:
        return "in QEMU"
    parts = []
    for key in ("up", "down"):
        res = session.get("ops", {}).get(key) or {}
        if res.get("ok") and res.get("backend_cpu_s") is not None:
            parts.append(f"{res['backend_cpu_s'] / (res['bytes'] / GB):.2f}")
        else:
            parts.append("n/a")
    return " / ".join(parts)


def cell_mtu(session: dict) -> str:
    dhcp = session.get("dhcp") or {}
    return str(dhcp["mtu"]) if dhcp.get("ok") else "n/a"


COLUMNS = [
    ("backend", lambda s: s["backend"]),
    ("guest MTU", cell_mtu),
    ("guest->host Gbit/s", lambda s: cell_rate(s.get("ops", {}).get("up"))),
    ("host->guest Gbit/s", lambda s: cell_rate(s.get("ops", {}).get("down"))),
    ("connect+echo+close p50 / p99 µs", lambda s: cell_latency(s.get("ops", {}).get("connect"))),
    ("1-byte RR p50 / p99 µs", lambda s: cell_latency(s.get("ops", {}).get("rr"))),
    ("backend CPU s/GB up / down", cell_cpu),
]


def table(sessions: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for s in sessions:
        if s.get("error") and not s.get("ops"):
            cells = [s["backend"], f"unavailable: {s['error']}"] + [""] * (len(COLUMNS) - 2)
        else:
            cells = [cell(s) for _, cell in COLUMNS]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells)
                     + " |")
    return "\n".join(lines)


def median_session(rounds: list[dict]) -> dict:
    """One backend's sessions from several rounds as one: each figure the median of the
    rounds that gave it (p50 and p99 each on its own), so one round disturbed by the rest
    of the machine does not decide the row."""
    ok = [s for s in rounds if s.get("ops")]
    if not ok:
        return rounds[-1]
    out = {k: v for k, v in ok[-1].items() if k != "ops"}
    out["ops"] = {}
    for key in ("up", "down", "connect", "rr"):
        results = [s["ops"].get(key) or {} for s in ok]
        if key in ("up", "down"):
            good = [r for r in results if r.get("ok")]
            if not good:
                out["ops"][key] = results[-1]
                continue
            merged = dict(good[-1], bits_per_second=statistics.median(
                r["bits_per_second"] for r in good),
                retransmits=int(statistics.median(r.get("retransmits") or 0 for r in good)))
            cpu = [r["backend_cpu_s"] / (r["bytes"] / GB) for r in good
                   if r.get("backend_cpu_s") is not None]
            if cpu:
                merged.update(backend_cpu_s=statistics.median(cpu), bytes=GB)
        else:
            good = [r for r in results if r.get("n")]
            if not good:
                out["ops"][key] = results[-1]
                continue
            merged = dict(good[-1], p50_us=statistics.median(r["p50_us"] for r in good),
                          p99_us=statistics.median(r["p99_us"] for r in good))
        out["ops"][key] = merged
    return out


def ratios(sessions: list[dict], base: str = "voidbox") -> list[str]:
    """voidbox's figures over each peer's: throughput (higher is better) and p50 latency
    (lower is better), as 'x times'."""
    by_name = {s["backend"]: s.get("ops", {}) for s in sessions}
    mine = by_name.get(base)
    if not mine:
        return []
    out = []
    for peer, ops in by_name.items():
        if peer == base or not ops:
            continue
        bits = []
        for key, label in (("up", "guest->host"), ("down", "host->guest")):
            a, b = mine.get(key) or {}, ops.get(key) or {}
            if a.get("ok") and b.get("ok") and b["bits_per_second"]:
                bits.append(f"{label} {a['bits_per_second'] / b['bits_per_second']:.2f}x")
        for key, label in (("connect", "connect p50"), ("rr", "RR p50")):
            a, b = mine.get(key) or {}, ops.get(key) or {}
            if a.get("n") and b.get("n"):
                bits.append(f"{label} {a['p50_us'] / b['p50_us']:.2f}x")
        if bits:
            out.append(f"- {base} / {peer}: " + ", ".join(bits))
    return out


# ---------------------------------------------------------------- the guest overlay

def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "voidbox" / "bench" / "vhost_user_peers"


def run(argv: list, timeout: float = APT_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              timeout=timeout, check=False, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"{Path(str(argv[0])).name}: {e}") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"{' '.join(map(str, argv[:3]))} failed: {last[0][:200]}")
    return proc


def build_netbench(out: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc not found: the guest's netbench needs `gcc -O2 -static` "
                         "(apt-get install gcc libc6-dev)")
    if not out.exists() or out.stat().st_mtime < NETBENCH_C.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        run([gcc, "-O2", "-static", "-Wall", "-o", tmp, NETBENCH_C], timeout=120)
        tmp.replace(out)
    return out


def unpack_debs(packages: tuple[str, ...], debs: Path, root: Path,
                download) -> dict[str, str]:
    """Download (once) and unpack packages; -> {package: .deb file name}."""
    from voidbox.image import debian

    names = {}
    root.mkdir(parents=True, exist_ok=True)
    for package in packages:
        deb = debian.cached_deb(package, debs) or download(package, debs)
        debian.extract(deb, root)
        names[package] = deb.name
    return names


def guest_overlay(work: Path) -> tuple[bytes, dict]:
    """The bench's cpio (newc): /bench/{run.sh,udhcpc.script,bin,lib}, /lib64's loader, /tmp."""
    from voidbox.errors import VoidboxError
    from voidbox.image import debian, rootfs
    from voidbox.image.cpio import CpioWriter

    cache = cache_root() / "bookworm"
    netbench = build_netbench(cache_root() / "netbench")
    root = work / "bookworm-root"
    try:
        debs = unpack_debs(GUEST_PACKAGES, cache / "debs", root, debian.download)
    except VoidboxError as e:
        raise BenchError(f"guest packages: {e}") from None
    libdirs = [root / d for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")]
    ldso = root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    iperf3 = root / "usr/bin/iperf3"
    listed = run([ldso, "--list", "--library-path", ":".join(map(str, libdirs)), iperf3],
                 timeout=30).stdout
    libs = ldso_list(listed)
    buffer = io.BytesIO()
    with CpioWriter(buffer) as cpio:
        for d in ("bench", "bench/bin", "bench/lib", "lib64", "tmp"):
            cpio.add_dir(d, 0o1777 if d == "tmp" else 0o755)
        cpio.add_file("bench/run.sh", GUEST_SCRIPT.encode(), 0o755)
        cpio.add_file("bench/udhcpc.script", rootfs.UDHCPC_SCRIPT.encode(), 0o755)
        cpio.add_file("bench/bin/netbench", netbench.read_bytes(), 0o755)
        cpio.add_file("bench/bin/iperf3", iperf3.read_bytes(), 0o755)
        for applet in GUEST_APPLETS:
            cpio.add_symlink(f"bench/bin/{applet}", "/bin/busybox")
        cpio.add_file("bench/lib/ld-linux-x86-64.so.2", ldso.resolve().read_bytes(), 0o755)
        for soname, path in sorted(libs.items()):
            if soname != "ld-linux-x86-64.so.2":
                cpio.add_file(f"bench/lib/{soname}", Path(path).resolve().read_bytes(), 0o755)
        cpio.add_symlink("lib64/ld-linux-x86-64.so.2", "/bench/lib/ld-linux-x86-64.so.2")
    return buffer.getvalue(), {"guest_debs": debs, "guest_libs": sorted(libs)}


def bench_initrd(guest, work: Path) -> tuple[Path, dict]:
    overlay, info = guest_overlay(work)
    path = work / "initrd-bench.img"
    with open(path, "wb") as out:
        with open(guest.initrd, "rb") as base:
            shutil.copyfileobj(base, out)
        out.write(b"\0" * (-out.tell() % 4))  # the next archive starts 4-byte aligned
        out.write(overlay)
    info["overlay_bytes"] = len(overlay)
    return path, info


# ---------------------------------------------------------------- Debian 13's passt

def trixie_passt() -> tuple[list[str], str]:
    """(argv prefix running trixie's passt through trixie's loader, version) or BenchError."""
    base = cache_root() / "trixie"
    root = base / "root"
    ldso = root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    passt = root / "usr/bin/passt.avx2"
    stamp = base / "debs.json"
    if not (ldso.exists() and passt.exists() and stamp.exists()):
        for d in ("state/lists/partial", "cache/archives/partial", "debs"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "debs").chmod(0o755)
        (base / "sources.list").write_text(TRIXIE_SOURCES)
        opts = [f"-oDir::State={base / 'state'}", f"-oDir::Cache={base / 'cache'}",
                f"-oDir::Etc::sourcelist={base / 'sources.list'}", "-oDir::Etc::sourceparts=-",
                "-oAPT::Get::List-Cleanup=0", "-oDebug::NoLocking=1"]
        run(["apt-get", *opts, "update"])
        for old in (base / "debs").glob("*.deb"):
            old.unlink()
        run(["apt-get", *opts, "download", *TRIXIE_PACKAGES], cwd=base / "debs")
        shutil.rmtree(root, ignore_errors=True)
        names = {}
        for deb in sorted((base / "debs").glob("*.deb")):
            run(["dpkg-deb", "-x", deb, root])
            names[deb.name.split("_")[0]] = deb.name
        if set(names) != set(TRIXIE_PACKAGES):
            raise BenchError(f"trixie download gave {sorted(names)}")
        stamp.write_text(json.dumps(names))
    names = json.loads(stamp.read_text())
    # passt re-executes itself as `<its /proc/self/exe>.avx2` when the CPU has AVX2; under a
    # loader /proc/self/exe is the loader, so the AVX2 build is named directly (it runs on
    # when that re-exec fails, as Debian 12's /usr/bin/passt runs passt.avx2).
    prefix = [str(ldso), "--library-path", str(root / "usr/lib/x86_64-linux-gnu"), str(passt)]
    return prefix, names["passt"].removesuffix("_amd64.deb").replace("_", " ")


# ---------------------------------------------------------------- one backend, one boot

class Session:
    def __init__(self, backend: str, args, work: Path, guest, initrd: Path, ports: dict):
        self.backend, self.args, self.guest, self.initrd, self.ports = \
            backend, args, guest, initrd, ports
        self.dir = work / backend
        self.dir.mkdir()
        # passt drops root for nobody before Debian 12's binds its socket: the directory is
        # sticky and world-writable, like /tmp.
        (self.dir / "sock").mkdir(mode=0o1777)
        (self.dir / "sock").chmod(0o1777)
        self.sock = self.dir / "sock" / "net.sock"
        self.proc: subprocess.Popen | None = None  # the backend, when it is a process
        self.qemu: subprocess.Popen | None = None
        self.serial = bytearray()
        self._pending = b""
        self.messages: list[dict] = []
        self.done = threading.Event()
        self.prompt = threading.Event()
        self.begin_cpu: dict[str, tuple[float | None, float]] = {}
        self.out: dict = {"backend": backend, "ops": {}}

    # -- backends
    def _spawn(self, argv: list[str], env: dict | None = None) -> None:
        self.out["backend_argv"] = " ".join(argv)
        log = open(self.dir / "backend.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=env)
        log.close()
        deadline = time.monotonic() + SOCKET_WAIT
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{Path(argv[0]).name} did not create its socket "
                                 f"({self.backend_log()})")
            time.sleep(0.05)

    def netdev_argv(self) -> list[str]:
        vhost = ["-chardev", f"socket,id=vu,path={self.sock}",
                 "-netdev", "vhost-user,id=n0,chardev=vu"]
        passt_opts = ["-f", "-4", "-a", GUEST_IP, "-n", PREFIX_LEN, "-g", GATEWAY,
                      "--no-dhcp-dns", "-s", str(self.sock)]
        mtu = self.args.mtu
        if mtu:
            passt_opts += ["-m", str(mtu)]
        if self.backend == "voidbox":
            serve = ["-m", "voidbox", "net", "serve", "--vhost-user", str(self.sock), "--host-loopback"]
            if mtu:
                serve += ["--mtu", str(mtu)]
            serve += self.args.serve_arg or []
            if self.args.profile_voidbox:
                # The sandboxed server is a forked child that cannot write files: profile
                # an unsandboxed one, which serves in this process.
                serve = ["-m", "cProfile", "-o", self.args.profile_voidbox, *serve, "--no-sandbox"]
            # The voidbox of this bench's tree, whatever the working directory: -m would
            # put that first on sys.path (an A/B run from another tree measured that one).
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
            self._spawn([sys.executable, "-P", *serve], env)
            return vhost
        if self.backend == "slirp":
            return ["-netdev", f"user,id=n0,net=10.0.2.0/{PREFIX_LEN},host={GATEWAY}"]
        if self.backend == "passt":
            if not shutil.which("passt"):
                raise BenchError("passt not installed (Debian package passt)")
            self._spawn(["passt", *passt_opts])
            return ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={self.sock}"]
        prefix, version = trixie_passt()
        self.out["version"] = version
        self._spawn([*prefix, *passt_opts, "--vhost-user"])
        return vhost

    def qemu_argv(self) -> list[str]:
        from tests.qemu.test_default_guest_qemu import qemu_argv

        argv = qemu_argv(self.guest.vmlinux, self.initrd, GUEST_APPEND, None, False)
        at = argv.index("microvm,acpi=on")
        argv[at] = "microvm,acpi=on,memory-backend=mem"
        return argv + ["-object", "memory-backend-memfd,id=mem,size=512M,share=on",
                       *self.netdev_argv(), "-device", "virtio-net-device,netdev=n0",
                       "-global", "virtio-mmio.force-legacy=false"]

    def backend_log(self) -> str:
        with contextlib.suppress(OSError):
            text = (self.dir / "backend.log").read_text(errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip() and "syslog" not in ln]
            return " | ".join(lines[-3:])[:300] or "no output"
        return "no log"

    # -- the console
    def cpu(self) -> tuple[float | None, float]:
        backend = None
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                backend = tree_cpu_seconds(self.proc.pid)
        qemu = 0.0
        with contextlib.suppress(OSError, ValueError):
            qemu = proc_cpu_seconds(self.qemu.pid)
        return backend, qemu

    def on_message(self, msg: dict) -> None:
        self.messages.append(msg)
        op = msg.get("op")
        if op == "begin":
            self.begin_cpu[msg.get("name")] = self.cpu()
        elif op == "end":
            self.done.set()
        elif op == "dhcp":
            self.out["dhcp"] = msg
        elif op in ("connect", "rr", "up", "down"):
            (b0, q0), (b1, q1) = self.begin_cpu.get(op, (None, 0.0)), self.cpu()
            msg["backend_cpu_s"] = b1 - b0 if b0 is not None and b1 is not None else None
            msg["qemu_cpu_s"] = q1 - q0
            self.out["ops"][op] = msg

    def reader(self) -> None:
        while chunk := self.qemu.stdout.read1(65536):
            self.feed(chunk)
        self.done.set()

    def feed(self, chunk: bytes) -> None:
        """Console bytes from the guest."""
        self.serial.extend(chunk)
        if not self.prompt.is_set():
            at = self.serial.find(NO_ROOT_SHELL)
            if at >= 0 and self.serial.find(SHELL_PROMPT, at) >= 0:
                self.prompt.set()
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            msg = parse_console_line(line.decode(errors="replace"))
            if msg is not None:
                self.on_message(msg)

    def run(self) -> dict:
        busy0 = time.monotonic()
        try:
            argv = self.qemu_argv()
            self.out["qemu_argv"] = " ".join(argv)
            self.qemu = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT)
            thread = threading.Thread(target=self.reader, daemon=True)
            thread.start()
            if self.proc is not None:
                self.out["backend_exe"] = os.readlink(f"/proc/{self.proc.pid}/exe")
                self.out["backend_pid"] = self.proc.pid
            if not self.prompt.wait(BOOT_WAIT):
                raise BenchError(f"no shell prompt within {BOOT_WAIT:.0f} s")
            self.out["boot_s"] = round(time.monotonic() - busy0, 1)
            a = self.args
            line = (f"sh /bench/run.sh {GATEWAY} {self.ports['echo']} {self.ports['up']} "
                    f"{self.ports['down']} {a.conns} {a.rrs} {a.seconds} {WARMUP} "
                    f"{LATENCY_BUDGET}; poweroff -f\n")
            self.qemu.stdin.write(line.encode())
            self.qemu.stdin.flush()
            budget = 2 * LATENCY_BUDGET + 2 * (a.seconds + IPERF_MARGIN) + 60
            if not self.done.wait(budget):
                raise BenchError(f"the guest script did not finish within {budget} s")
            if self.out.get("dhcp", {}).get("ok") is False:
                raise BenchError(f"no DHCP lease on eth0 ({self.backend_log()})")
            self.qemu.wait(30)
        except (BenchError, OSError, subprocess.SubprocessError) as e:
            self.out["error"] = f"{e}"[:300]
        finally:
            self.close()
        garbled = [m for m in self.messages if m.get("op") == "garbled"]
        if garbled:
            self.out["garbled"] = garbled
        self.out["wall_s"] = round(time.monotonic() - busy0, 1)
        return self.out

    def close(self) -> None:
        if self.qemu is not None:
            stop(self.qemu)
            (self.dir / "serial.log").write_bytes(bytes(self.serial))
        stop(self.proc)
        if self.proc is not None:
            self.out["backend_rc"] = self.proc.returncode


class BootSession(Session):
    """`voidbox boot --accel qemu` itself (this process is the VMM, through the Python API):
    boot has the card's NAT in a child `net serve` (--net-isolation process, the default),
    boot-inprocess in the VMM's own network thread (--net-isolation none). The backend CPU
    is that child's, or that thread's; the QEMU figure is QEMU's process."""

    def __init__(self, *args):
        super().__init__(*args)
        self.vm = None

    def write(self, data: bytes) -> None:  # the VM's console output
        self.feed(bytes(data))

    def flush(self) -> None:
        pass

    def cpu(self) -> tuple[float | None, float]:
        backend = qemu = None
        vm = self.vm
        with contextlib.suppress(OSError, ValueError, AttributeError):
            qemu = proc_cpu_seconds(vm.process.pid)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if self.backend == "boot":
                backend = tree_cpu_seconds(vm.nics[0].pid)
            else:
                tid = vm.net_thread.native_id
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    backend = int(f.read().split()[0]) / 1e9
        return backend, qemu or 0.0

    def run(self) -> dict:
        from voidbox import VmConfig
        from voidbox.net.options import config_from_options
        from voidbox.qemu import QemuVm

        busy0 = time.monotonic()
        try:
            nat, policy = config_from_options(mtu=self.args.mtu, host_loopback=True)
            config = VmConfig(kernel=str(self.guest.vmlinux), initrd=str(self.initrd),
                              append=GUEST_APPEND, mem="512M", net=["slirp"], nat=nat,
                              policy=policy, console_output=self, accel="qemu",
                              net_isolation="process" if self.backend == "boot" else "none")
            self.vm = vm = QemuVm(config)
            self.out["backend_argv"] = f"QemuVm(net_isolation={config.net_isolation!r})"
            vm.start()
            self.out["qemu_argv"] = " ".join(vm.process.args)
            # The backend's own CPU figure: the child's, or the VMM's network thread's.
            self.out["backend_pid"] = (vm.nics[0].pid if self.backend == "boot"
                                       else f"{os.getpid()}/{vm.net_thread.native_id}")
            if not self.prompt.wait(BOOT_WAIT):
                raise BenchError(f"no shell prompt within {BOOT_WAIT:.0f} s")
            self.out["boot_s"] = round(time.monotonic() - busy0, 1)
            a = self.args
            vm.serial.enqueue_input(
                (f"sh /bench/run.sh {GATEWAY} {self.ports['echo']} {self.ports['up']} "
                 f"{self.ports['down']} {a.conns} {a.rrs} {a.seconds} {WARMUP} "
                 f"{LATENCY_BUDGET}; poweroff -f\n").encode())
            budget = 2 * LATENCY_BUDGET + 2 * (a.seconds + IPERF_MARGIN) + 60
            if not self.done.wait(budget):
                raise BenchError(f"the guest script did not finish within {budget} s")
            if self.out.get("dhcp", {}).get("ok") is False:
                raise BenchError("no DHCP lease on eth0")
            vm.wait(30)
        except (BenchError, OSError, subprocess.SubprocessError) as e:
            self.out["error"] = f"{e}"[:300]
        except Exception as e:  # noqa: BLE001 - a VoidboxError, reported in the table
            self.out["error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            if self.vm is not None:
                self.vm.close()
            (self.dir / "serial.log").write_bytes(bytes(self.serial))
        self.out["wall_s"] = round(time.monotonic() - busy0, 1)
        return self.out


@contextlib.contextmanager
def host_servers():
    """The echo server and two one-off iperf3 servers (up, down) on 127.0.0.1."""
    procs = []
    try:
        echo = subprocess.Popen([sys.executable, str(ECHO_SERVER), "--bind", LOOPBACK],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(echo)
        line = LineReader(echo.stdout.fileno()).readline(SOCKET_WAIT)
        if line is None:
            raise BenchError("echo server did not start")
        ports = {"echo": json.loads(line)["tcp"]}
        for key in ("up", "down"):
            port = free_port()
            procs.append(subprocess.Popen(["iperf3", "-s", "-1", "-B", LOOPBACK, "-p", str(port)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + SOCKET_WAIT
            while not listening(port):
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise BenchError("iperf3 server did not start")
                time.sleep(0.01)
            ports[key] = port
        yield ports
    finally:
        if procs:
            with contextlib.suppress(OSError):
                procs[0].stdin.close()
        for proc in procs:
            stop(proc)


def versions() -> dict:
    rev = cmd_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = cmd_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "voidbox"])
    if dirty.strip():
        rev += f" + {len(dirty.splitlines())} uncommitted file(s) under voidbox/"
    return {
        "voidbox": rev,
        "qemu": cmd_output(["qemu-system-x86_64", "--version"]).splitlines()[0],
        "passt (Debian 12)": cmd_output(["dpkg-query", "-W", "-f", "${Version}", "passt"]),
        "iperf3 (host)": cmd_output(["iperf3", "--version"]).splitlines()[0],
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="default: all")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 -t")
    parser.add_argument("--conns", type=int, default=500, help="sequential connections")
    parser.add_argument("--rrs", type=int, default=1000, help="1-byte round trips")
    parser.add_argument("--mtu", type=int,
                        help="MTU for voidbox (net serve --mtu) and passt (-m); default: "
                             "each backend's own (voidbox and slirp 1500, passt 65520). "
                             "QEMU 7.2's -netdev user has no MTU option: slirp stays at 1500")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--profile-voidbox", metavar="FILE",
                        help="run `net serve` under cProfile (unsandboxed), stats to FILE")
    parser.add_argument("--serve-arg", action="append", metavar="ARG",
                        help="one more argument for `voidbox net serve` (repeatable), "
                             "e.g. --serve-arg=--pcap --serve-arg=/tmp/vb.pcap")
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="keep each backend's serial and backend logs here")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every backend this many times, taking turns, and table "
                             "the median of each figure (each round's table is printed too)")
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    backends = args.backend or list(BACKENDS)
    missing = [b for b in ("qemu-system-x86_64", "iperf3", "apt-get", "dpkg-deb")
               if not shutil.which(b)]
    if missing:
        sys.exit(f"missing: {' '.join(missing)}")
    from tests.default_guest import require_default_guest

    try:
        guest = require_default_guest(build=True)
    except BaseException as e:  # tests.requires.missing raises pytest's Skipped
        sys.exit(f"no default guest: {e}")
    started = time.monotonic()
    info = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": " ".join([sys.executable, *sys.argv]), "versions": versions(),
            "cpus": os.cpu_count(), "load_before": os.getloadavg(),
            "guest_kernel": guest.kernel_version}
    rounds: list[list[dict]] = []
    work = Path(args.keep_logs) if args.keep_logs else Path(tempfile.mkdtemp(
        prefix="voidbox-vu-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    if "passt" in backends:
        # Debian 12's passt binds its socket after it drops to nobody, who must be able
        # to walk down to the sticky socket directory (mkdtemp makes this one 0700).
        work.chmod(0o711)
    try:
        try:
            initrd, overlay = bench_initrd(guest, work)
        except BenchError as e:
            sys.exit(f"cannot build the guest overlay: {e}")
        info.update(overlay)
        for round_no in range(args.rounds):
            sessions = []
            round_work = work / f"round{round_no + 1}" if args.rounds > 1 else work
            round_work.mkdir(exist_ok=True)
            for backend in backends:
                print(f"# {backend} (round {round_no + 1}/{args.rounds}) ...", file=sys.stderr,
                      flush=True)
                try:
                    with host_servers() as ports:
                        kind = BootSession if backend.startswith("boot") else Session
                        session = kind(backend, args, round_work, guest, initrd, ports).run()
                except BenchError as e:
                    session = {"backend": backend, "error": str(e)}
                sessions.append(session)
                if session.get("version"):
                    info["versions"][f"{backend}"] = session["version"]
            rounds.append(sessions)
    finally:
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
    info["load_after"] = os.getloadavg()
    info["wall_s"] = round(time.monotonic() - started, 1)
    v = info["versions"]
    print(f"## vhost-user net: voidbox vs QEMU slirp vs passt, guest under QEMU TCG "
          f"({info['date']})\n")
    print(f"- command: `{info['argv']}`")
    print("- " + "; ".join(f"{k}: {val}" for k, val in v.items()))
    print(f"- guest: default guest, kernel {info['guest_kernel']}, initramfs shell + bench "
          f"overlay ({', '.join(d.removesuffix('_amd64.deb') for d in info['guest_debs'].values())}"
          f"); 1 vCPU, 512 MiB memfd (share=on) for every backend")
    print(f"- CPUs: {info['cpus']}; load average before "
          f"{'/'.join(f'{x:.2f}' for x in info['load_before'])}, after "
          f"{'/'.join(f'{x:.2f}' for x in info['load_after'])}; wall {info['wall_s']} s")
    print(f"- MTU: {args.mtu or 'each backend hands out its default by DHCP'}; "
          "the guest MTU column is what the guest's eth0 got")
    print(f"- iperf3 -t {args.seconds}, one stream, receiver's rate (retr = sender's "
          f"retransmits); connect N {args.conns}, RR N {args.rrs}, after {WARMUP} warm-ups, "
          f"guest clock; backend CPU = the backend process's CPU seconds per GB received "
          f"(10^9 B)\n")
    if args.rounds > 1:
        for round_no, round_sessions in enumerate(rounds, 1):
            print(f"Round {round_no}:\n\n{table(round_sessions)}\n")
        sessions = [median_session([r[i] for r in rounds]) for i in range(len(backends))]
        print(f"Median of {args.rounds} rounds:\n")
    else:
        sessions = rounds[0]
    print(table(sessions))
    extra = ratios(sessions)
    if extra:
        print("\nRatios (throughput: >1 is voidbox faster; p50: <1 is voidbox faster):")
        print("\n".join(extra))
    errors = [f"- {s['backend']}: {s['error']}" for r in rounds for s in r if s.get("error")]
    if errors:
        print("\nErrors:\n" + "\n".join(errors))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "sessions": sessions, "rounds": rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
